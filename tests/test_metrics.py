"""Prometheus metrics from a real sllmd (--http, no API key): /metrics parsed with
prometheus_client's own parser; the counters move by the right amounts after a cold infer
(from SSD), a warm one (already loaded), an eviction, a load from the DRAM tier and failed
requests (an unknown model, a prompt over the context); requests count the same whether
they came over IPC or HTTP; every metric name keeps the naming rules; `sllmctl metrics`
prints the same text over the local socket (and parsed with --json)."""
from __future__ import annotations

import json
import re

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import make_tiny_model
from daemon_helpers import DaemonProcess, remove_tree, short_tempdir, sllmctl
from test_inference import tiny_tokenizer
from sllmd.client import Client
from sllmd.errors import InvalidRequestError, ModelNotFoundError

try:
    import httpx2 as httpx   # what this openai release is built on
except ImportError:
    import httpx

MODEL = "tiny"
UNITS = ("_seconds", "_bytes", "_tokens", "_requests", "_evictions", "_loads", "_migrations", "_nodes", "_models",
         "_loaded", "_in_flight", "_running", "_queued")


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    from sllmd import store
    tok = tiny_tokenizer()
    ckpt = tmp_path_factory.mktemp("metrics") / MODEL
    store.save_model(make_tiny_model("llama", seed=5, vocab_size=len(tok)), ckpt, tokenizer=tok)
    root = short_tempdir()
    d = DaemonProcess(root, "--http", "127.0.0.1:0", "--keep-alive", "-1", dram="64MiB",
                      device_memory="512MiB").start()
    try:
        run = sllmctl("import", MODEL, str(ckpt), socket_path=d.socket)
        assert run.returncode == 0, run.stderr + d.log()
        url = next(m.group(1) for n in d.notifications if (m := re.search(r"http on (http://\S+)", n)))
        d.url = url
        yield d
    finally:
        d.close()
        remove_tree(root)


class Scrape:
    """One parsed /metrics: value(name, **labels) of a sample, 0 when absent."""

    def __init__(self, text: str):
        self.text = text
        self.families = list(text_string_to_metric_families(text))
        self.samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in self.families for s in f.samples}

    def value(self, name: str, **labels) -> float:
        return self.samples.get((name, tuple(sorted(labels.items()))), 0.0)


def scrape(d) -> Scrape:
    r = httpx.get(d.url + "/metrics", timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return Scrape(r.text)


def infer(d, prompt: str = "hello there", max_tokens: int = 5) -> dict:
    with Client(d.socket) as c, c.infer(MODEL, prompt, max_tokens=max_tokens, temperature=0, chat=False) as s:
        s.text()
        return s.stats


def moved(before: Scrape, after: Scrape, name: str, **labels) -> float:
    return after.value(name, **labels) - before.value(name, **labels)


def test_cold_warm_evict_dram_and_failed_requests_move_the_counters(daemon):
    d = daemon
    s0 = scrape(d)
    assert s0.value("sllmd_tier_used_bytes", tier="ssd") > 0
    assert s0.value("sllmd_tier_capacity_bytes", tier="device") == 512 << 20
    assert s0.value("sllmd_tier_capacity_bytes", tier="dram") == 64 << 20
    assert s0.value("sllmd_tier_capacity_bytes", tier="ssd") >= s0.value("sllmd_tier_used_bytes", tier="ssd")
    assert s0.value("sllmd_cluster_nodes", status="alive") == 1
    assert s0.value("sllmd_cluster_nodes", status="failed") == 0

    cold = infer(d)                                         # on SSD only: loaded for this request
    assert cold["load_tier"] == "ssd"
    s1 = scrape(d)
    assert moved(s0, s1, "sllmd_requests_total", model=MODEL, outcome="ok") == 1
    assert moved(s0, s1, "sllmd_prompt_tokens_total", model=MODEL) == cold["prompt_tokens"]
    assert moved(s0, s1, "sllmd_generation_tokens_total", model=MODEL) == cold["tokens"] > 0
    assert moved(s0, s1, "sllmd_time_to_first_token_seconds_count", model=MODEL, load_tier="ssd") == 1
    assert moved(s0, s1, "sllmd_time_to_first_token_seconds_sum", model=MODEL, load_tier="ssd") == \
        pytest.approx(cold["ttft_s"])
    assert moved(s0, s1, "sllmd_time_to_first_token_seconds_bucket", model=MODEL, load_tier="ssd", le="+Inf") == 1
    assert moved(s0, s1, "sllmd_load_seconds_count", tier="ssd") == 1
    assert moved(s0, s1, "sllmd_loads_total", outcome="ok") == 1
    assert s1.value("sllmd_tier_used_bytes", tier="dram") > 0   # the load cached the checkpoint in DRAM
    with Client(d.socket) as c:
        ckpt_bytes = next(m for m in c.models() if m["name"] == MODEL)["checkpoint_bytes"]
    read = moved(s0, s1, "sllmd_loader_read_bytes_total", source="disk") + \
        moved(s0, s1, "sllmd_loader_read_bytes_total", source="page_cache")
    assert read >= ckpt_bytes   # every stored byte was read (O_DIRECT reads whole blocks: a little more)
    assert moved(s0, s1, "sllmd_host_to_device_bytes_total") == ckpt_bytes   # a CPU host: the load's bytes
    assert s1.value("sllmd_tier_used_bytes", tier="device") > 0
    assert s1.value("sllmd_models_loaded") == 1
    assert s1.value("sllmd_requests_running", model=MODEL) == 0
    assert s1.value("sllmd_requests_queued", model=MODEL) == 0

    warm = infer(d)                                         # already on the device: no load
    assert warm["load_tier"] == "device"
    s2 = scrape(d)
    assert moved(s1, s2, "sllmd_requests_total", model=MODEL, outcome="ok") == 1
    assert moved(s1, s2, "sllmd_time_to_first_token_seconds_count", model=MODEL, load_tier="device") == 1
    assert moved(s1, s2, "sllmd_time_to_first_token_seconds_count", model=MODEL, load_tier="ssd") == 0
    assert moved(s1, s2, "sllmd_load_seconds_count", tier="ssd") == 0
    assert moved(s1, s2, "sllmd_generation_tokens_total", model=MODEL) == warm["tokens"]
    assert moved(s1, s2, "sllmd_host_to_device_bytes_total") == 0

    with Client(d.socket) as c:
        c.evict(MODEL)                                      # device only: its DRAM copy stays
    s3 = scrape(d)
    assert moved(s2, s3, "sllmd_evictions_total", tier="device", reason="manual") == 1
    assert moved(s2, s3, "sllmd_evictions_total", tier="dram", reason="manual") == 0
    assert s3.value("sllmd_models_loaded") == 0
    assert s3.value("sllmd_tier_used_bytes", tier="device") == 0

    from_dram = infer(d)                                    # loaded again, from the DRAM tier: no disk read
    assert from_dram["load_tier"] == "dram"
    s4 = scrape(d)
    assert moved(s3, s4, "sllmd_load_seconds_count", tier="dram") == 1
    assert moved(s3, s4, "sllmd_time_to_first_token_seconds_count", model=MODEL, load_tier="dram") == 1
    assert moved(s3, s4, "sllmd_loader_read_bytes_total", source="disk") == 0
    assert moved(s3, s4, "sllmd_loader_read_bytes_total", source="page_cache") == 0
    assert moved(s3, s4, "sllmd_loader_dram_bytes_total") > 0

    with Client(d.socket) as c:
        with pytest.raises(ModelNotFoundError):
            c.generate("no-such-model", "hi", max_tokens=2)
        with pytest.raises(InvalidRequestError):            # the tiny model's context is 128 tokens
            c.generate(MODEL, " ".join(["word"] * 400), max_tokens=2, chat=False)
    s5 = scrape(d)
    assert moved(s4, s5, "sllmd_requests_total", model="_unknown", outcome="model_not_found") == 1
    assert moved(s4, s5, "sllmd_requests_total", model=MODEL, outcome="invalid_request") == 1
    assert moved(s4, s5, "sllmd_requests_total", model=MODEL, outcome="ok") == 0
    assert moved(s4, s5, "sllmd_prompt_tokens_total", model=MODEL) == 0
    assert moved(s4, s5, "sllmd_time_to_first_token_seconds_count", model=MODEL, load_tier="device") == 0


def test_a_request_counts_the_same_over_http_as_over_ipc(daemon):
    d = daemon
    before = scrape(d)
    r = httpx.post(d.url + "/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 3,
                                                    "temperature": 0}, timeout=60)
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    after = scrape(d)
    assert moved(before, after, "sllmd_requests_total", model=MODEL, outcome="ok") == 1
    assert moved(before, after, "sllmd_generation_tokens_total", model=MODEL) == usage["completion_tokens"]
    assert moved(before, after, "sllmd_prompt_tokens_total", model=MODEL) == usage["prompt_tokens"]
    assert moved(before, after, "sllmd_http_requests_total", route="/v1/completions", status="200") == 1
    r = httpx.post(d.url + "/v1/completions", json={"model": "nope", "prompt": "hi"}, timeout=60)
    assert r.status_code == 404
    assert moved(after, scrape(d), "sllmd_requests_total", model="_unknown", outcome="model_not_found") == 1


def test_every_metric_keeps_the_naming_rules(daemon):
    infer(daemon)   # so that the labelled families have samples
    s = scrape(daemon)
    names = {f.name: f for f in s.families}
    required = {"sllmd_requests", "sllmd_time_to_first_token_seconds", "sllmd_load_seconds", "sllmd_tier_used_bytes",
                "sllmd_tier_capacity_bytes", "sllmd_loader_read_bytes", "sllmd_host_to_device_bytes",
                "sllmd_evictions", "sllmd_prompt_tokens", "sllmd_generation_tokens", "sllmd_requests_running",
                "sllmd_requests_queued", "sllmd_migrations", "sllmd_cluster_nodes"}
    assert required <= set(names), required - set(names)
    types = dict(re.findall(r"^# TYPE (\S+) (\S+)$", s.text, re.M))
    helps = dict(re.findall(r"^# HELP (\S+) (.*)$", s.text, re.M))
    for family in s.families:
        name = family.name   # the parser strips a counter's _total
        assert name.startswith("sllmd_"), name
        assert re.fullmatch(r"[a-z_][a-z0-9_]*", name), name
        assert family.documentation.strip(), f"{name} has no help text"
        if family.type == "counter":
            assert types.get(name + "_total", types.get(name)) == "counter"
            assert all(smp.name == name + "_total" for smp in family.samples), name
            assert not name.endswith("_total")
        else:
            assert not name.endswith("_total"), f"{name}: only counters end in _total"
        assert name.endswith(UNITS) or name.removesuffix("_total").endswith(UNITS), f"{name}: no unit suffix"
        assert not re.search(r"_(milli|micro|kilo|mega|giga)|_ms$|_mb$|_kb$", name), f"{name}: not a base unit"
    for name in types:
        assert helps.get(name, "").strip(), f"{name} has no help text"
    for smp in names["sllmd_requests"].samples:
        assert smp.labels["outcome"] and smp.labels["model"]


def test_sllmctl_metrics_prints_the_same_metrics_over_the_socket(daemon):
    run = sllmctl("metrics", socket_path=daemon.socket)
    assert run.returncode == 0, run.stderr
    over_ipc = Scrape(run.stdout)
    over_http = scrape(daemon)
    assert {f.name for f in over_ipc.families} == {f.name for f in over_http.families}
    assert over_ipc.value("sllmd_tier_capacity_bytes", tier="device") == 512 << 20
    run = sllmctl("metrics", "--json", socket_path=daemon.socket)
    assert run.returncode == 0, run.stderr
    families = {f["name"]: f for f in json.loads(run.stdout)}
    assert families["sllmd_requests"]["type"] == "counter"
    assert any(smp["labels"] == {"tier": "device"} for smp in families["sllmd_tier_used_bytes"]["samples"])
    with Client(daemon.socket) as c:
        assert "# TYPE sllmd_requests_total counter" in c.metrics()


# --- a cluster: a forwarded request counts once, where it ran ---------------------------------------
def ipc_scrape(node) -> Scrape:
    with Client(node.socket) as c:
        return Scrape(c.metrics())


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    import shutil
    if shutil.which("serf") is None:
        pytest.skip("serf is not installed (make setup installs it)")
    from cluster_helpers import close_all, make_nodes, start_all
    from sllmd import store
    tok = tiny_tokenizer()
    ckpt = tmp_path_factory.mktemp("metrics-cluster") / MODEL
    store.save_model(make_tiny_model("llama", seed=5, vocab_size=len(tok)), ckpt, tokenizer=tok)
    root = short_tempdir("sllm-mcl-")
    nodes = make_nodes(root, ["A", "B"], "--keep-alive", "-1", dram="64MiB", device_memory="512MiB")
    try:
        start_all(nodes)
        run = nodes[1].ctl("import", MODEL, str(ckpt))   # on B only
        assert run.returncode == 0, run.stderr
        yield nodes
    finally:
        close_all(nodes)
        remove_tree(root)


def _wait(what: str, predicate, timeout: float = 30.0):
    import time
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting until {what}")


def test_a_forwarded_request_counts_where_it_ran_and_the_cluster_nodes_by_status(two_nodes):
    a, b = two_nodes
    _wait("A sees both nodes alive", lambda: ipc_scrape(a).value("sllmd_cluster_nodes", status="alive") == 2)

    def placed_on_b() -> bool:   # A has pulled B's state, with the model servable there
        with a.client() as c:
            return any(m.get("node") == "B" and m.get("state") not in (None, "importing")
                       for m in c.models(all=True) if m["name"] == MODEL)
    _wait("A knows B holds the model", placed_on_b)
    a0, b0 = ipc_scrape(a), ipc_scrape(b)
    with a.client() as c, c.infer(MODEL, "hello", max_tokens=4, temperature=0, chat=False) as s:
        s.text()
        assert s.stats["placement"]["node"] == "B"
    a1, b1 = ipc_scrape(a), ipc_scrape(b)
    assert moved(b0, b1, "sllmd_requests_total", model=MODEL, outcome="ok") == 1      # where it ran
    assert moved(b0, b1, "sllmd_generation_tokens_total", model=MODEL) == s.stats["tokens"]
    assert moved(b0, b1, "sllmd_load_seconds_count", tier="ssd") == 1
    assert moved(a0, a1, "sllmd_requests_total", model=MODEL, outcome="ok") == 0      # not where it arrived
    assert moved(a0, a1, "sllmd_generation_tokens_total", model=MODEL) == 0
    assert moved(a0, a1, "sllmd_forwarded_requests_total") == 1
    assert moved(b0, b1, "sllmd_forwarded_requests_total") == 0

    b.kill9()
    _wait("A counts B failed", lambda: ipc_scrape(a).value("sllmd_cluster_nodes", status="failed") == 1)
    s = ipc_scrape(a)
    assert s.value("sllmd_cluster_nodes", status="alive") == 1


def test_node_stats_buckets_are_cumulative_with_le_inclusive():
    from sllmd.errors import BusyError
    from sllmd.observability.counters import NodeStats, outcome_of
    st = NodeStats()
    for v in (0.005, 0.006, 1.0, 99.0):
        st.request_ended("m", "ok", prompt_tokens=3, generation_tokens=2, ttft_s=v, load_tier="ssd")
    st.request_ended("m", outcome_of(BusyError("full")))
    snap = st.snapshot()
    buckets = dict(snap["ttft"][("m", "ssd")].cumulative())
    assert buckets["0.005"] == 1 and buckets["0.01"] == 2 and buckets["1.0"] == 3 and buckets["60.0"] == 3
    assert buckets["+Inf"] == 4 and snap["ttft"][("m", "ssd")].sum == pytest.approx(100.011)
    assert snap["requests"] == {("m", "ok"): 4, ("m", "busy"): 1}
    assert snap["prompt_tokens"] == {"m": 12} and snap["generation_tokens"] == {"m": 8}
    assert outcome_of(GeneratorExit()) == "cancelled" and outcome_of(ValueError("x")) == "internal"


# --- live migration: counted on the source as migrated, where it finished as ok ------------------------
@pytest.fixture(scope="module")
def migration_pair(tmp_path_factory):
    import shutil
    if shutil.which("serf") is None:
        pytest.skip("serf is not installed (make setup installs it)")
    from cluster_helpers import close_all, make_nodes, start_all
    from sllmd import store
    tok = tiny_tokenizer()
    tok.eos_token = None   # no end token: it answers until max_tokens
    ckpt = store.save_model(make_tiny_model("llama", seed=0, vocab_size=len(tok), max_position_embeddings=100_000,
                                            eos_token_id=None), tmp_path_factory.mktemp("metrics-mig") / MODEL,
                            tokenizer=tok)
    root = short_tempdir("sllm-mmg-")
    nodes = make_nodes(root, ["A", "B"], "--compute-dtype", "fp32", "--keep-alive", "-1")
    try:
        start_all(nodes)
        for n in nodes:
            with n.client() as c:
                c.import_model(MODEL, str(ckpt))
        _wait("A sees B alive", lambda: ipc_scrape(nodes[0]).value("sllmd_cluster_nodes", status="alive") == 2)
        yield nodes
    finally:
        close_all(nodes)
        remove_tree(root)


def test_a_migrated_request_counts_as_migrated_on_the_source_and_its_tokens_once(migration_pair):
    a, b = migration_pair
    tokens = 1000
    a0, b0 = ipc_scrape(a), ipc_scrape(b)
    from cluster_helpers import BackgroundStream
    stream = BackgroundStream(a, MODEL, "a story", max_tokens=tokens, temperature=0.0, chat=False, node="A")
    got = stream.events
    assert stream.started.wait(60)
    with a.client() as c:
        rid = next(r["id"] for r in c.requests() if r["model"] == MODEL)
        assert c.migrate(rid, "B")["ran_on"] == "B"
    assert stream.join(120) and got[-1]["type"] == "done"
    prompt_tokens = got[-1]["stats"]["prompt_tokens"]
    a1, b1 = ipc_scrape(a), ipc_scrape(b)
    assert moved(a0, a1, "sllmd_migrations_total", outcome="ok") == 1
    assert moved(a0, a1, "sllmd_requests_total", model=MODEL, outcome="migrated") == 1
    assert moved(a0, a1, "sllmd_requests_total", model=MODEL, outcome="ok") == 0
    assert moved(b0, b1, "sllmd_requests_total", model=MODEL, outcome="ok") == 1
    assert moved(b0, b1, "sllmd_migrations_total", outcome="ok") == 0
    generated = moved(a0, a1, "sllmd_generation_tokens_total", model=MODEL) + \
        moved(b0, b1, "sllmd_generation_tokens_total", model=MODEL)
    assert generated == tokens                                   # each token counted once, where it was made
    assert moved(a0, a1, "sllmd_generation_tokens_total", model=MODEL) >= 50
    assert moved(b0, b1, "sllmd_prompt_tokens_total", model=MODEL) == prompt_tokens
    assert moved(a0, a1, "sllmd_prompt_tokens_total", model=MODEL) == 0
    ttft_b = sum(moved(b0, b1, "sllmd_time_to_first_token_seconds_count", model=MODEL, load_tier=t)
                 for t in ("device", "dram", "ssd"))
    assert ttft_b == 0                                           # a resumed request has no first token of its own
    assert moved(a0, a1, "sllmd_time_to_first_token_seconds_count", model=MODEL, load_tier="ssd") == 1   # A's


def test_a_request_its_client_leaves_counts_as_cancelled_with_the_tokens_it_streamed(migration_pair):
    import time
    a, _ = migration_pair
    before = ipc_scrape(a)
    with a.client() as c:
        s = c.infer(MODEL, "a story", max_tokens=5000, temperature=0.0, chat=False, node="A")
        n = 0
        for ev in s.events():
            n += ev["type"] == "token"
            if n == 10:
                break
        s.close()   # the client leaves: the daemon cancels the request
        deadline = time.monotonic() + 30
        while c.requests() and time.monotonic() < deadline:
            time.sleep(0.05)
    _wait("the cancel is counted",
          lambda: moved(before, ipc_scrape(a), "sllmd_requests_total", model=MODEL, outcome="cancelled") == 1)
    after = ipc_scrape(a)
    assert moved(before, after, "sllmd_requests_total", model=MODEL, outcome="ok") == 0
    assert 10 <= moved(before, after, "sllmd_generation_tokens_total", model=MODEL) < 5000
    assert after.value("sllmd_requests_running", model=MODEL) == 0
