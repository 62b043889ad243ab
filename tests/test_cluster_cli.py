"""The cluster-wide reads (`nodes`, `requests`, `models --all`, `ps --all`) on a node without a cluster:
a real engine for the request list, a real sllmd for the verbs (the node lists itself)."""
from __future__ import annotations

import json
import shutil

import pytest

from daemon_helpers import DaemonProcess, remove_tree, short_tempdir, sllmctl
from sllmd.client import Client
from sllmd.inference.engine import Instance
from sllmd.inference.request import InferRequest, SamplingParams
from test_inference import _long_running, tiny_tokenizer


def test_an_instance_lists_its_running_then_queued_requests():
    tok = tiny_tokenizer()
    model, long_req = _long_running(tok)
    inst = Instance("m", model, tok, device="cpu", nbytes=0, queue_depth=4)
    try:
        assert inst.requests() == []
        running = inst.submit(long_req)
        it = iter(running)
        next(it)   # it is running and has sampled a token
        queued = inst.submit(InferRequest("m", prompt="hello there", sampling=SamplingParams(max_tokens=3)))
        first, second = inst.requests()
        assert first["id"] == long_req.request_id and first["state"] in ("running", "prefill")
        assert first["model"] == "m" and first["tokens_in"] >= 1 and first["tokens_out"] >= 1
        assert first["max_tokens"] == 50_000 and first["age_s"] >= 0
        assert second["id"] == queued.request.request_id and second["state"] == "queued"
        assert second["tokens_out"] == 0 and second["tokens_in"] > first["tokens_in"]
        running.cancel()
        assert list(queued)[-1]["type"] == "done"
        assert inst.requests() == []
    finally:
        running.cancel()
        assert inst.close(timeout=10)


@pytest.fixture(scope="module")
def daemon():
    root = short_tempdir()
    proc = DaemonProcess(root, "--node-name", "solo").start()
    yield proc
    proc.close()
    remove_tree(root)


def test_nodes_without_a_cluster_lists_this_node(daemon):
    run = sllmctl("nodes", "--json", socket_path=daemon.socket)
    assert run.returncode == 0, run.stderr
    (me,) = json.loads(run.stdout)
    assert me["name"] == "solo" and me["status"] == "alive" and me["self"] is True
    table = sllmctl("nodes", socket_path=daemon.socket).stdout.splitlines()
    assert table[0].split()[:2] == ["NAME", "STATUS"] and table[1].split()[:3] == ["solo", "*", "alive"]
    with Client(daemon.socket) as c:
        assert [n["name"] for n in c.nodes()] == ["solo"]


def test_requests_and_the_all_reads_carry_the_node(daemon, tiny_models, tmp_path):
    from sllmd import store
    tok = tiny_tokenizer()
    store.save_model(tiny_models("llama", vocab_size=len(tok)), tmp_path / "ckpt", tokenizer=tok)
    assert sllmctl("import", "tiny", str(tmp_path / "ckpt"), socket_path=daemon.socket).returncode == 0
    with Client(daemon.socket) as c:
        assert c.requests() == [] and c.requests(all=True) == []
        rows = c.models(all=True)
        assert [(m["node"], m["name"]) for m in rows] == [("solo", "tiny")]
        assert [m["name"] for m in c.models()] == ["tiny"] and "node" not in c.models()[0]
        c.load("tiny")
        assert [(i["node"], i["name"]) for i in c.ps(all=True)] == [("solo", "tiny")]
        assert c.generate("tiny", "hi", max_tokens=2) is not None
        assert c.requests() == []   # finished requests are not listed
    models = sllmctl("models", "--all", socket_path=daemon.socket).stdout.splitlines()
    assert models[0].split()[:2] == ["NODE", "NAME"] and models[1].split()[:2] == ["solo", "tiny"]
    ps = sllmctl("ps", "--all", socket_path=daemon.socket).stdout.splitlines()
    assert ps[0].split()[:2] == ["NODE", "NAME"] and ps[1].split()[:2] == ["solo", "tiny"]
    assert sllmctl("ps", socket_path=daemon.socket).stdout.split()[0] == "NAME"
    run = sllmctl("requests", socket_path=daemon.socket)
    assert run.returncode == 0 and run.stdout.split()[:3] == ["NODE", "ID", "MODEL"]
    assert json.loads(sllmctl("requests", "--all", "--json", socket_path=daemon.socket).stdout) == []


# --- the same verbs across three real nodes (the cluster fixture of test_cluster.py) ------------------------------
from test_cluster import MODEL, _MISSING, _wait, cluster  # noqa: E402,F401  (a module-scoped cluster of our own)

needs_cluster = [pytest.mark.skipif(shutil.which("serf") is None, reason="serf is not installed"),
                 pytest.mark.skipif(bool(_MISSING), reason=f"cluster parts not built yet: {', '.join(_MISSING)}")]


@needs_cluster[0]
@needs_cluster[1]
def test_all_reads_and_nodes_span_the_cluster(cluster):
    a = cluster["A"]
    rows = _wait("A lists B's and C's models", lambda: (lambda r: r if {x["node"] for x in r if x["name"] == MODEL}
                                                       >= {"B", "C"} else None)(
        json.loads(a.ctl("models", "--all", "--json").stdout)), 30)
    assert not [x for x in rows if x["node"] == "A"]   # A holds nothing
    table = a.ctl("models", "--all").stdout.splitlines()
    assert table[0].split()[:2] == ["NODE", "NAME"] and {ln.split()[0] for ln in table[1:]} >= {"B", "C"}
    nodes = a.ctl("nodes").stdout.splitlines()
    assert nodes[0].split()[:2] == ["NAME", "STATUS"] and len(nodes) == 4, nodes

    with a.client() as ca:   # a long request forced onto C shows in A's `requests --all`, with C's name
        stream = ca.infer(MODEL, "Count from one to one hundred.", max_tokens=400, node="C")
        with stream:
            events = stream.events()
            next(e for e in events if e["type"] == "token")
            seen = _wait("A lists C's running request", lambda: [
                r for r in json.loads(a.ctl("requests", "--all", "--json").stdout)
                if r.get("node") == "C" and r.get("model") == MODEL and r.get("state") in ("running", "prefill")], 30)
            assert seen[0]["tokens_in"] > 0
            with cluster["C"].client() as cc:
                (local,) = cc.requests()
                assert local["node"] == "C" and local["state"] == "running"
            _wait("A lists C's instance", lambda: [r for r in ca.ps(all=True)
                                                   if r["node"] == "C" and r["name"] == MODEL], 30)
