"""Three real sllmd processes, each with its own Serf agent, on loopback.

The fixture starts A, B and C in parallel (A first joins nobody; B and C join A), imports the
SmolLM2 checkpoint on B and C, leaves it in B's DRAM (loaded, then evicted from the device) and
only on C's SSD. A holds nothing, so a request reaching A must be placed and forwarded.
"""
from __future__ import annotations

import importlib.util
import json
import shutil
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from cluster_helpers import ClusterNode, close_all, start_all, write_cluster_key
from daemon_helpers import remove_tree, short_tempdir

_PARTS = ("sllmd.cluster.membership", "sllmd.cluster.peer_server", "sllmd.cluster.peer_transport",
          "sllmd.cluster.curve_keys")
_MISSING = [m for m in _PARTS if importlib.util.find_spec(m) is None]
pytestmark = [pytest.mark.skipif(shutil.which("serf") is None, reason="serf is not installed (make setup installs it)"),
              pytest.mark.skipif(bool(_MISSING), reason=f"cluster parts not built yet: {', '.join(_MISSING)}")]

MODEL = "smol"
PROMPT = "Name three colours."
FAIL_BOUND_S = 30.0     # Serf's failure detection with -profile=local, with room for a loaded machine


def _generate(at: ClusterNode, **kw) -> tuple[str, dict]:
    with at.client() as c, c.infer(MODEL, PROMPT, max_tokens=12, temperature=0.0, **kw) as stream:
        text = "".join(stream)
        return text, stream.stats


def _nodes(node: ClusterNode) -> dict[str, dict]:
    out = node.ctl("nodes", "--json")
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    return {r["name"]: r for r in rows}


def _wait(what, predicate, timeout: float):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(0.2)
    raise AssertionError(f"{what}: not within {timeout} s (last: {last!r})")


def _model_tiers(node: ClusterNode) -> list[str]:
    with node.client() as c:
        for m in c.models():
            if m["name"] == MODEL:
                return list(m.get("tiers") or [])
    return []


@pytest.fixture(scope="module")
def cluster(smollm2_checkpoint):
    root = short_tempdir("sllm-cl-")
    key = root / "cluster.key"
    write_cluster_key(key)
    sizes = {"dram": "1GiB", "device_memory": "1GiB"}   # room for SmolLM2 (~270 MB in bf16) in each tier
    a = ClusterNode(root / "a", "A", key, None, **sizes)
    b = ClusterNode(root / "b", "B", key, a.gossip, **sizes)
    c = ClusterNode(root / "c", "C", key, a.gossip, **sizes)
    nodes = [a, b, c]
    try:
        start_all(nodes)
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(lambda n: n.client().import_model(MODEL, str(smollm2_checkpoint)), (b, c)))
        with b.client() as cb:
            cb.load(MODEL)
            cb.evict(MODEL, tier="device")
        assert "dram" in _model_tiers(b) and "device" not in _model_tiers(b), _model_tiers(b)
        with c.client() as cc:
            if "dram" in _model_tiers(c):
                cc.evict(MODEL, tier="dram")
        yield {"A": a, "B": b, "C": c}
    finally:
        close_all(nodes)
        remove_tree(root)


def test_three_nodes_list_each_other_alive(cluster):
    for node in cluster.values():
        rows = _wait(f"{node.name} sees three alive nodes",
                     lambda: (lambda r: r if sorted(k for k, v in r.items() if v["status"] == "alive")
                              == ["A", "B", "C"] else None)(_nodes(node)), 30)
        assert all(r.get("public_key") for r in rows.values())   # operators can check each node's key


def test_request_at_a_is_placed_on_b_holding_it_in_dram(cluster):
    a, b = cluster["A"], cluster["B"]

    def sees_b_dram():   # A's placement works from B's pulled state: it must show the DRAM copy
        state = _nodes(a).get("B", {}).get("state") or {}
        return any(m.get("name") == MODEL and "dram" in (m.get("tiers") or []) for m in state.get("models") or [])
    _wait("A has B's state with the model in DRAM", sees_b_dram, 30)
    text, stats = _generate(a)
    placement = stats["placement"]
    assert placement["node"] == "B", json.dumps(placement, indent=1)
    assert placement["winner"]["path"] == "dram", placement
    assert {e["node"] for e in placement["candidates"]} >= {"B", "C"}, placement
    direct, direct_stats = _generate(b, node="B")
    assert direct_stats["placement"]["node"] == "B"
    assert text == direct and text.strip()


def test_forced_node_runs_there(cluster):
    _, stats = _generate(cluster["A"], node="C")
    assert stats["placement"]["node"] == "C" and stats["placement"]["forced"]


def test_unknown_forced_node_is_a_clear_error(cluster):
    out = cluster["A"].ctl("infer", MODEL, PROMPT, "--node", "nosuch", "--max-tokens", "2")
    assert out.returncode == 1
    assert "nosuch" in out.stderr and "Traceback" not in out.stderr


def test_cancelling_a_forwarded_stream_stops_it_on_the_node_running_it(cluster):
    a, b = cluster["A"], cluster["B"]
    with a.client() as c:
        stream = c.infer(MODEL, "Count from one to one thousand.", max_tokens=4000, node="B")
        pieces = iter(stream)
        next(pieces)
        _wait("B runs the forwarded request",
              lambda: [r for r in b.client().requests() if r.get("model") == MODEL], 60)
        stream.close()
    _wait("B stopped it after the cancel", lambda: not b.client().requests(), 30)


def _peer_socket(node: ClusterNode, public: bytes, secret: bytes):
    import zmq
    server_public = next(r["public_key"] for r in _nodes(node).values() if r["self"]).encode()
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.CURVE_SERVERKEY, server_public)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, public)
    sock.setsockopt(zmq.CURVE_SECRETKEY, secret)
    sock.connect(node.peer)
    return ctx, sock


def test_a_key_that_is_no_members_gets_nothing_from_the_peer_port(cluster):
    import msgpack
    import zmq
    b = cluster["B"]
    ctx, sock = _peer_socket(b, *zmq.curve_keypair())
    try:
        sock.send(msgpack.packb({"type": "peer_hello", "id": 1, "version": 1}))
        sock.send(msgpack.packb({"type": "state_pull", "id": 2}))
        assert not sock.poll(2000, zmq.POLLIN)
    finally:
        sock.close()
        ctx.term()
    text, _ = _generate(cluster["A"], node="B")   # B serves on
    assert text.strip()


def test_a_member_sending_malformed_frames_is_refused_and_served_on(cluster):
    import msgpack
    import zmq
    from sllmd.cluster import curve_keys
    a, b = cluster["A"], cluster["B"]
    ctx, sock = _peer_socket(b, *curve_keys.load_or_create(a.root / "state"))   # A's identity: a member's
    try:
        def ask(frame: bytes) -> dict:
            sock.send(frame)
            assert sock.poll(10_000, zmq.POLLIN), "no answer"
            return msgpack.unpackb(sock.recv())
        assert ask(b"\x00\xffnot msgpack")["code"] == "bad_message"
        assert ask(msgpack.packb({"type": "peer_hello", "id": 1, "version": 1, "node": "A"}))["type"] == "welcome"
        assert ask(msgpack.packb({"type": "infer", "id": 2, "model": MODEL, "prompt": "x"}))["code"] == "unknown_type"
        assert ask(msgpack.packb({"type": "peer_infer", "id": 3, "model": "../etc"}))["code"] == "bad_message"
    finally:
        sock.close()
        ctx.term()
    text, _ = _generate(a, node="B")
    assert text.strip()


def test_killed_node_shows_failed_and_the_next_request_goes_to_c(cluster):
    a, b = cluster["A"], cluster["B"]
    b.kill9()
    _wait("A sees B failed", lambda: _nodes(a).get("B", {}).get("status") == "failed", FAIL_BOUND_S)
    text, stats = _generate(a)
    assert stats["placement"]["node"] == "C", stats["placement"]
    assert text.strip()
