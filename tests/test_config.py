"""Config: sizes, Ollama durations, defaults per environment, file < env < flags; the systemd unit."""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sllmd.config import (SETTINGS, GiB, MiB, Config, ConfigError, add_flags, as_dict, default_cpu_device_memory,
                          default_dram_bytes, default_socket_path, default_store_dir, flags_from_args, format_size,
                          load_config, parse_duration, parse_mode, parse_size)

REPO = Path(__file__).resolve().parent.parent
BASE_ENV = {"HOME": "/home/u"}            # no XDG dirs, no config file: only what a test adds
CPU = {"device": "cpu"}                   # never resolve "auto" (that imports torch)


@pytest.mark.parametrize("text, expected", [
    (4096, 4096), ("4096", 4096), ("8GiB", 8 * GiB), ("8G", 8 * GiB), ("8gib", 8 * GiB), ("512M", 512 * MiB),
    ("512MiB", 512 * MiB), ("1.5G", int(1.5 * GiB)), ("100KB", 100_000), ("2GB", 2_000_000_000), ("1k", 1024),
    (" 16 MiB ", 16 * MiB), ("0", 0), ("1T", 1 << 40), ("7B", 7),
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "x", "-1", -1, "8XB", "1..5G", True, "G"])
def test_parse_size_refuses(text):
    with pytest.raises(ConfigError):
        parse_size(text)


@pytest.mark.parametrize("text, expected", [
    ("5m", 300.0), ("30s", 30.0), ("1h", 3600.0), ("1h30m", 5400.0), ("1.5h", 5400.0), ("500ms", 0.5),
    ("-1", -1.0), ("-1m", -60.0), ("300", 300.0), ("0", 0.0), (0, 0.0), (-1, -1.0), (2.5, 2.5), ("+10s", 10.0),
    ("1m30s", 90.0), ("10us", 1e-5),
])
def test_parse_duration_ollama_grammar(text, expected):
    assert parse_duration(text) == pytest.approx(expected)


@pytest.mark.parametrize("text", ["", "5x", "m", "5 m", "--1", "nan", "1h-5m", True])
def test_parse_duration_refuses(text):
    with pytest.raises(ConfigError):
        parse_duration(text)


def test_parse_mode_refuses_world_access():
    assert parse_mode("0660") == 0o660 and parse_mode(0o600) == 0o600
    for bad in ("0666", "0601", "abc", "01777"):
        with pytest.raises(ConfigError):
            parse_mode(bad)


def test_default_paths_follow_the_environment():
    assert default_socket_path({"XDG_RUNTIME_DIR": "/run/user/7"}) == "/run/user/7/sllm/sllmd.sock"
    assert default_socket_path({"RUNTIME_DIRECTORY": "/run/sllmd", "XDG_RUNTIME_DIR": "/x"}) == "/run/sllmd/sllmd.sock"
    assert default_socket_path({}).startswith("/tmp/sllm-") and default_socket_path({}).endswith("/sllmd.sock")
    assert default_store_dir({"STATE_DIRECTORY": "/var/lib/sllmd"}) == Path("/var/lib/sllmd/store")
    assert default_store_dir({"XDG_DATA_HOME": "/d"}) == Path("/d/sllm/store")
    assert default_store_dir({"HOME": "/home/u"}) == Path("/home/u/.local/share/sllm/store")


def test_defaults(tmp_path):
    cfg = load_config(CPU, env=BASE_ENV)
    assert cfg.keep_alive_s == 300.0 and cfg.queue_depth == 16 and cfg.chunk_size == 16 * MiB
    assert cfg.max_frame_bytes == 16 * MiB and cfg.verify_checksums and cfg.socket_mode == 0o600
    assert cfg.ssd_capacity_bytes is None and cfg.device == "cpu" and cfg.dram_bytes > 0
    assert cfg.store_dir == Path("/home/u/.local/share/sllm/store")


def test_precedence_file_then_env_then_flags(tmp_path):
    f = tmp_path / "sllmd.toml"
    f.write_text('[sllmd]\ndram = "1GiB"\nkeep_alive = "10m"\nqueue_depth = 4\nstore = "/from/file"\n')
    env = dict(BASE_ENV, SLLMD_KEEP_ALIVE="-1", SLLMD_QUEUE_DEPTH="8")
    cfg = load_config(dict(CPU, queue_depth="2"), env=env, config_file=f)
    assert cfg.dram_bytes == GiB                  # file
    assert cfg.keep_alive_s == -1.0               # env over file
    assert cfg.queue_depth == 2                   # flag over env
    assert cfg.store_dir == Path("/from/file")


def test_config_file_from_env_and_from_systemd_configuration_directory(tmp_path):
    (tmp_path / "sllmd.toml").write_text('keep_alive = 42\n')   # top-level keys work too
    assert load_config(CPU, env=dict(BASE_ENV, SLLMD_CONFIG=str(tmp_path / "sllmd.toml"))).keep_alive_s == 42
    assert load_config(CPU, env=dict(BASE_ENV, CONFIGURATION_DIRECTORY=str(tmp_path))).keep_alive_s == 42
    xdg = tmp_path / "xdg"
    (xdg / "sllm").mkdir(parents=True)
    (xdg / "sllm" / "sllmd.toml").write_text('keep_alive = "1m"\n')
    assert load_config(CPU, env=dict(BASE_ENV, XDG_CONFIG_HOME=str(xdg))).keep_alive_s == 60


def test_systemd_environment_gives_systemd_paths():
    cfg = load_config(CPU, env={"RUNTIME_DIRECTORY": "/run/sllmd", "STATE_DIRECTORY": "/var/lib/sllmd"})
    assert cfg.socket == "/run/sllmd/sllmd.sock" and cfg.store_dir == Path("/var/lib/sllmd/store")


@pytest.mark.parametrize("content, match", [
    ('dram = "lots"\n', "dram .*config file.*not a size"),
    ('colour = "blue"\n', "unknown setting"),
    ('dram = \n', "cannot read"),
    ('chunk_size = "1000"\n', "chunk_size"),
    ('max_frame = "1K"\n', "max_frame"),
])
def test_bad_files_say_what_and_where(tmp_path, content, match):
    f = tmp_path / "bad.toml"
    f.write_text(content)
    with pytest.raises(ConfigError, match=match):
        load_config(CPU, env=BASE_ENV, config_file=f)


def test_bad_env_and_flags_name_their_origin(tmp_path):
    with pytest.raises(ConfigError, match="environment"):
        load_config(CPU, env=dict(BASE_ENV, SLLMD_VERIFY_CHECKSUMS="maybe"))
    with pytest.raises(ConfigError, match="flags"):
        load_config(dict(CPU, keep_alive="soon"), env=BASE_ENV)
    with pytest.raises(ConfigError, match="not found"):
        load_config(CPU, env=BASE_ENV, config_file=tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match="longer than"):
        load_config(dict(CPU, socket="/tmp/" + "x" * 120), env=BASE_ENV)


def test_flags_are_generated_from_the_settings():
    parser = argparse.ArgumentParser()
    add_flags(parser)
    args = parser.parse_args(["--dram", "1G", "--keep-alive", "-1", "--no-verify-checksums", "--device", "cpu"])
    cfg = load_config(flags_from_args(args), env=BASE_ENV)
    assert cfg.dram_bytes == GiB and cfg.keep_alive_s == -1 and cfg.verify_checksums is False
    assert flags_from_args(parser.parse_args([]))["dram"] is None     # not given: does not override


def test_config_is_frozen_and_printable():
    cfg = Config(store_dir=Path("/s"), socket="/tmp/x.sock")
    with pytest.raises(Exception):
        cfg.dram_bytes = 1
    assert as_dict(cfg)["store"] == "/s" and as_dict(cfg)["socket_mode"] == "0600"


def test_the_example_config_is_valid():
    cfg = load_config({"device": "cpu"}, env=BASE_ENV, config_file=REPO / "systemd" / "sllmd.toml.example")
    assert cfg.socket_mode == 0o660 and cfg.keep_alive_s == 300
    assert cfg.dram_bytes == default_dram_bytes()        # no hard-coded pool size: the host's default


def test_the_systemd_unit():
    unit = (REPO / "systemd" / "sllmd.service").read_text()
    for line in ("Type=notify", "RuntimeDirectory=sllmd", "StateDirectory=sllmd", "Restart=on-failure",
                 "NoNewPrivileges=yes", "ProtectSystem=strict", "RestartPreventExitStatus=78"):
        assert line in unit.splitlines()
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    run = subprocess.run(["systemd-analyze", "verify", str(REPO / "systemd" / "sllmd.service")],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr


@pytest.mark.parametrize("ram, dram, cpu_budget", [
    (24 * GiB, 3 * GiB, 3 * GiB), (64 * GiB, 4 * GiB, 4 * GiB), (1024 * GiB, 4 * GiB, 4 * GiB),
    (2 * GiB, 256 * MiB, 256 * MiB), (100 * MiB, 16 * MiB, 12 * MiB),   # at least one chunk; 2MiB granules
])
def test_default_sizes_take_a_modest_share_of_the_host(ram, dram, cpu_budget):
    assert default_dram_bytes(16 * MiB, physical=ram) == dram
    assert default_cpu_device_memory(physical=ram) == cpu_budget


def test_default_pool_and_cpu_budget_together_stay_under_a_quarter_of_ram():
    cfg = load_config(CPU, env=BASE_ENV)
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert cfg.dram_bytes <= min(4 * GiB, ram // 8) and cfg.device_memory_bytes <= min(4 * GiB, ram // 8)
    assert cfg.dram_bytes + cfg.device_memory_bytes <= ram // 4
    assert cfg.dram_bytes % cfg.chunk_size == 0


@pytest.mark.parametrize("n, text", [(4 * GiB, "4GiB"), (3 * GiB // 2, "1.5GiB"), (512 * MiB, "512MiB"),
                                     (100, "100B"), (1 << 50, "1024TiB"), (1023 * 1024, "1023KiB")])
def test_format_size_reads_back(n, text):
    assert format_size(n) == text and parse_size(text) == n


def sllmd(*args: str, home: Path) -> subprocess.CompletedProcess:
    """The real `sllmd` entry point, isolated from the user's config and SLLMD_* settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLLMD_") and k != "XDG_CONFIG_HOME"}
    env["HOME"] = str(home)
    return subprocess.run([sys.executable, "-m", "sllmd", "--config", "/dev/null", *args], capture_output=True,
                          text=True, timeout=120, env=env)


def test_help_shows_every_default(tmp_path):
    run = sllmd("--help", home=tmp_path)
    assert run.returncode == 0, run.stderr
    entries: dict[str, str] = {}          # "--flag ..." -> its help text (argparse wraps it over lines)
    for line in run.stdout.splitlines():
        if line.startswith("  -"):
            flag = line.split()[0].rstrip(",")
            entries[flag] = line
        elif entries and line.startswith("   "):
            entries[flag] += " " + line.strip()
    for s in SETTINGS:
        assert "(default: " in entries[s.flag], f"{s.flag} does not show its default: {entries[s.flag]}"
    text = " ".join(run.stdout.split())
    assert f"min(4GiB, RAM/8), {format_size(default_dram_bytes())} here" in text


def _cuda_is_usable() -> bool:
    import torch
    return torch.cuda.is_available()


BAD_SETTINGS = [
    pytest.param(["--device", "cuda:0"], "device", id="cuda-on-cpu-torch"),
    pytest.param(["--device", "cuda:99"], "device", id="no-such-cuda-device"),
    pytest.param(["--device", "cpu", "--store", "/proc/nope"], "store", id="store-in-proc"),
    pytest.param(["--device", "cpu", "--dram", "100TiB"], "dram", id="dram-beyond-ram"),
    pytest.param(["--device", "cpu", "--dram", "-1GiB"], "dram", id="negative-dram"),
    pytest.param(["--device", "cpu", "--device-memory", "100TiB"], "device_memory", id="cpu-budget-beyond-ram"),
    pytest.param(["--device", "cpu", "--ssd-capacity", "100PiB"], "ssd_capacity", id="ssd-beyond-disk"),
    pytest.param(["--device", "cpu", "--keep-alive", "soon"], "keep_alive", id="bad-duration"),
    pytest.param(["--device", "cpu", "--store", "/etc/passwd"], "store", id="store-is-a-file"),
    pytest.param(["--device", "cpu", "--socket", "/proc/nope/s.sock"], "socket", id="socket-dir-in-proc"),
]


@pytest.mark.parametrize("args, names", BAD_SETTINGS)
def test_every_bad_setting_is_one_line_and_exit_78(tmp_path, args, names):
    if args[:2] == ["--device", "cuda:0"] and _cuda_is_usable():
        pytest.skip("torch sees a GPU here: cuda:0 is a good setting")
    store = [] if "--store" in args else ["--store", str(tmp_path / "store")]
    sock = [] if "--socket" in args else ["--socket", str(tmp_path / "s.sock")]
    run = sllmd(*sock, *store, *args, home=tmp_path)
    assert run.returncode == 78, (run.returncode, run.stderr)
    lines = run.stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in run.stderr, run.stderr
    assert lines[0].startswith(f"sllmd: {names}"), lines[0]
    assert not (tmp_path / "s.sock").exists()            # refused before anything started


def test_bad_sizes_are_refused_by_print_config_too(tmp_path):
    run = sllmd("--device", "cpu", "--dram", "100TiB", "--print-config", home=tmp_path)
    assert run.returncode == 78 and run.stdout == "" and "more than this host's memory" in run.stderr


def test_values_may_start_with_a_dash(tmp_path):
    import json
    run = sllmd("--device", "cpu", "--keep-alive", "-1m", "--print-config", home=tmp_path)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["keep_alive"] == -60.0


def test_the_units_stop_timeout_covers_the_daemons_stop():
    from sllmd.daemon import stop_bound_s
    unit = (REPO / "systemd" / "sllmd.service").read_text().splitlines()
    (line,) = [ln for ln in unit if ln.startswith("TimeoutStopSec=")]
    timeout = parse_duration(line.split("=", 1)[1])
    bound = stop_bound_s(load_config(CPU, env=BASE_ENV))
    assert bound < timeout <= bound + 30      # systemd never kills a stop the daemon bounds itself


def test_the_readmes_exit_code_table_matches_the_error_registry():
    import re

    from sllmd.errors import REGISTRY, Exit
    readme = (REPO / "README.md").read_text()
    section = readme.split("### Exit codes", 1)[1].split("\n#", 1)[0]
    rows = {int(m.group(1)): m.group(2) for m in re.finditer(r"^\| (\d+) \| (.*)\|$", section, re.MULTILINE)}
    assert sorted(rows) == sorted(int(e) for e in Exit)
    listed = {n: set(re.findall(r"`([a-z_]+)`", row)) & set(REGISTRY) for n, row in rows.items()}
    for n, codes in listed.items():
        for code in codes:
            assert REGISTRY[code].exit_code == n, f"README says {code} exits {n}, it exits {REGISTRY[code].exit_code}"
    for code, cls in REGISTRY.items():
        if cls.exit_code != Exit.ERROR:       # the 1 row gives examples; every other row is complete
            assert code in listed[int(cls.exit_code)], f"README's {int(cls.exit_code)} row lacks {code}"
