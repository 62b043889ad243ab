"""Live migration between two real sllmd nodes (each with its Serf agent and peer socket) on loopback.

A tiny fp32 llama without an end token (it answers until max_tokens) is imported on A and B. A
greedy request runs on A; mid-stream `migrate` moves it to B; the client's stream, still from
A, must equal an unmigrated run token for token, with no gap and no repeat.
"""
from __future__ import annotations

import shutil
import threading
import time

import pytest

from cluster_helpers import BackgroundStream, ClusterNode, close_all, start_all, write_cluster_key
from daemon_helpers import remove_tree, short_tempdir
from sllmd import store
from sllmd.errors import InvalidRequestError, NodeNotFoundError, RequestNotFoundError

pytestmark = pytest.mark.skipif(shutil.which("serf") is None, reason="serf is not installed (make setup installs it)")

MODEL = "tiny"
PROMPT = "a story"
TOKENS = 1500


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    from conftest import make_tiny_model
    from test_inference import tiny_tokenizer
    tok = tiny_tokenizer()
    tok.eos_token = None
    model = make_tiny_model("llama", seed=0, vocab_size=len(tok), max_position_embeddings=100_000, eos_token_id=None)
    source = store.save_model(model, tmp_path_factory.mktemp("src") / "tiny", tokenizer=tok)
    root = short_tempdir("sllm-mig-")
    key = root / "cluster.key"
    write_cluster_key(key)
    extra = ("--compute-dtype", "fp32", "--keep-alive", "-1")
    a = ClusterNode(root / "a", "A", key, None, *extra)
    b = ClusterNode(root / "b", "B", key, a.gossip, *extra)
    try:
        start_all([a, b])
        for n in (a, b):
            with n.client() as c:
                c.import_model(MODEL, str(source))
        deadline = time.monotonic() + 30
        while True:   # A admits B's key only once it is a member: wait for both views
            with a.client() as c:
                if sorted(r["name"] for r in c.nodes() if r["status"] == "alive") == ["A", "B"]:
                    break
            assert time.monotonic() < deadline, "the two nodes did not see each other"
            time.sleep(0.2)
        yield {"A": a, "B": b, "source": source, "root": root, "key": key, "extra": extra}
    finally:
        close_all([a, b])
        remove_tree(root)


def _events(at, **kw) -> list[dict]:
    with at.client() as c, c.infer(MODEL, PROMPT, max_tokens=TOKENS, temperature=0.0, chat=False, **kw) as s:
        return list(s.events())


def test_a_request_migrated_mid_stream_equals_an_unmigrated_run(pair):
    a, b = pair["A"], pair["B"]
    reference = [e["token_id"] for e in _events(a, node="A") if e["type"] == "token"]
    assert len(reference) == TOKENS
    stream = BackgroundStream(a, MODEL, PROMPT, max_tokens=TOKENS, temperature=0.0, chat=False, node="A")
    got = stream.events
    assert stream.started.wait(60)
    with a.client() as c:
        rid = next(r["id"] for r in c.requests() if r["model"] == MODEL)
    shown: list[dict] = []
    moving = threading.Event()

    def poll():   # what `sllmctl requests` shows while it moves (B loads the model first: a long window)
        with a.client() as c:
            while not moving.is_set():
                shown.extend(r for r in c.requests() if r["id"] == rid)
                time.sleep(0.01)
    poller = threading.Thread(target=poll)
    poller.start()
    try:
        with a.client() as c:
            moved = c.migrate(rid, "B")
    finally:
        moving.set()
        poller.join(30)
    assert any(r["state"] == "migrating" and r["migrating_to"] == "B" for r in shown), shown[:3]
    assert stream.join(120)
    assert moved["ran_on"] == "B" and moved["source"] == "A" and moved["tokens_sent"] > 0, moved
    assert moved["rounds"] >= 2 and moved["tokens_in_rounds"] > 0, moved   # B prefilled ahead of the handoff
    assert moved["estimate_s"] > 0                                          # what a*(t_in+t_out)+b0 said before
    with a.client() as c:                                                   # ... and the fit learnt from it
        me = next(n for n in c.nodes() if n["self"])
        assert me["state"]["migration"]["samples"] >= 1, me["state"].get("migration")
    tokens = [e for e in got if e["type"] == "token"]
    assert [e["index"] for e in tokens] == list(range(len(tokens)))        # no gap, no repeat
    assert [e["token_id"] for e in tokens] == reference                     # identical to the unmigrated run
    done = got[-1]
    assert done["type"] == "done" and done["stats"]["migration"]["ran_on"] == "B", done
    with b.client() as c:
        assert not c.requests() and any(p["name"] == MODEL for p in c.ps())  # B ran it and it ended there


def test_migrating_a_finished_or_unknown_request_is_a_clear_error(pair):
    a = pair["A"]
    with a.client() as c:
        with pytest.raises(RequestNotFoundError):
            c.migrate("0123456789abcdef", "B")
        with pytest.raises(NodeNotFoundError):
            c.migrate("0123456789abcdef", "nosuch")


def test_migration_to_itself_is_refused(pair):
    a = pair["A"]
    with a.client() as c, c.infer(MODEL, PROMPT, max_tokens=TOKENS, chat=False, node="A") as s:
        it = s.events()
        next(it)
        rid = next(r["id"] for r in c.requests() if r["model"] == MODEL)
        with pytest.raises(InvalidRequestError):
            c.migrate(rid, "A")


def test_a_destination_that_refuses_leaves_the_request_running_on_the_source(pair):
    from sllmd.errors import ModelNotFoundError
    a, b = pair["A"], pair["B"]
    reference = [e["token_id"] for e in _events(a, node="A") if e["type"] == "token"]
    with b.client() as c:
        c.remove(MODEL, force=True)          # B can no longer load it: prepare fails, nothing moves
    with a.client() as c, c.infer(MODEL, PROMPT, max_tokens=TOKENS, temperature=0.0, chat=False, node="A") as s:
        events = s.events()
        got = [next(events) for _ in range(20)]
        rid = next(r["id"] for r in c.requests() if r["model"] == MODEL)
        with pytest.raises(ModelNotFoundError):
            c.migrate(rid, "B")
        row = next(r for r in c.requests() if r["id"] == rid)   # it stays here, shown running again
        assert row["state"] in ("running", "prefill") and row["migrating_to"] is None, row
        got += list(events)
    assert [e["token_id"] for e in got if e["type"] == "token"] == reference
    assert "migration" not in got[-1]["stats"]


def _wait(cond, what, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def _migrate_in_background(at, rid, to):
    out: dict = {}

    def run():
        try:
            with at.client() as c:
                out["result"] = c.migrate(rid, to)
        except Exception as e:
            out["error"] = e
    t = threading.Thread(target=run)
    t.start()
    return t, out


def _on_b(pair):
    with pair["B"].client() as c:
        if not any(m["name"] == MODEL for m in c.models()):   # the refusal test removed it
            c.import_model(MODEL, str(pair["source"]))


def _state_of(at, rid):
    with at.client() as c:
        return next((r for r in c.requests() if r["id"] == rid), None)


def test_a_seeded_request_moved_into_a_busy_batch_continues_its_seed_stream(pair):
    a, b = pair["A"], pair["B"]
    _on_b(pair)
    seeded = dict(max_tokens=400, temperature=0.9, seed=7, chat=False)
    with a.client() as c, c.infer(MODEL, PROMPT, node="A", **seeded) as s:
        reference = [e["token_id"] for e in s.events() if e["type"] == "token"]
    with b.client() as cb, cb.infer(MODEL, "another story", max_tokens=TOKENS, chat=False, node="B") as busy, \
            a.client() as c, c.infer(MODEL, PROMPT, node="A", **seeded) as s:
        next(busy.events())                                   # B is decoding a batch of its own
        events = s.events()
        got = [next(events) for _ in range(40)]
        rid = next(r["id"] for r in c.requests() if r["model"] == MODEL)
        moved = c.migrate(rid, "B")
        assert moved["ran_on"] == "B", moved
        assert any(r["model"] == MODEL for r in cb.requests()) # the busy request still runs beside it
        got += list(events)
    assert [e["token_id"] for e in got if e["type"] == "token"] == reference   # the same draws, in order
    assert got[-1]["stats"]["migration"]["ran_on"] == "B"


def test_a_client_that_leaves_mid_migration_frees_the_request_on_both_nodes(pair):
    a, b = pair["A"], pair["B"]
    _on_b(pair)
    with b.client() as c:
        c.evict(MODEL)                                        # B loads it again: the migration takes a while
    with a.client() as c:
        s = c.infer(MODEL, PROMPT, max_tokens=TOKENS, chat=False, node="A")
        events = s.events()
        for _ in range(30):
            next(events)
        rid = next(r["id"] for r in c.requests() if r["model"] == MODEL)
        mover, out = _migrate_in_background(a, rid, "B")
        _wait(lambda: (_state_of(a, rid) or {}).get("state") == "migrating" or out, "it never showed migrating")
        s.close()                                             # the client goes away mid-migration
    mover.join(60)
    assert not mover.is_alive()

    def freed():
        with a.client() as ca, b.client() as cb:
            return not ca.requests() and not cb.requests()
    _wait(freed, "a node kept the request of a client that left", timeout=20)
    with a.client() as c:                                      # and both still serve
        assert len([e for e in c.infer(MODEL, PROMPT, max_tokens=5, chat=False, node="B").events()
                    if e["type"] == "token"]) == 5


def test_a_destination_that_dies_mid_migration_leaves_the_stream_whole_on_the_source(pair):
    """C (a third node, killed -9 while the move is under way: preparing, in its rounds or just
    after the handoff, as the timing falls) never costs the client a token."""
    a = pair["A"]
    c_node = ClusterNode(pair["root"] / "c", "C", pair["key"], a.gossip, *pair["extra"])
    try:
        c_node.start()
        with c_node.client() as c:
            c.import_model(MODEL, str(pair["source"]))

        def a_sees_c():
            with a.client() as c:
                return any(r["name"] == "C" and r["status"] == "alive" for r in c.nodes())
        _wait(a_sees_c, "A never saw C", timeout=30)
        reference = [e["token_id"] for e in _events(a, node="A") if e["type"] == "token"]
        with a.client() as c, c.infer(MODEL, PROMPT, max_tokens=TOKENS, temperature=0.0, chat=False,
                                      node="A") as s:
            events = s.events()
            got = [next(events) for _ in range(30)]
            rid = next(r["id"] for r in c.requests() if r["model"] == MODEL)
            mover, out = _migrate_in_background(a, rid, "C")
            _wait(lambda: (_state_of(a, rid) or {}).get("state") == "migrating" or out, "it never showed migrating")
            c_node.kill9()
            got += list(events)
            mover.join(60)
        tokens = [e for e in got if e["type"] == "token"]
        assert [e["index"] for e in tokens] == list(range(len(tokens)))
        assert [e["token_id"] for e in tokens] == reference
        stats = got[-1]["stats"]
        if "error" in out:      # C died before the handoff: the request never left A
            assert "migration" not in stats, stats
        else:                   # after it: A resumed it from what C had sent, or before C's first token
            m = stats["migration"]
            assert m.get("recovered", {}).get("on") == "A" or m.get("ran_on") == "A", m
        assert _state_of(a, rid) is None
    finally:
        close_all([c_node])


def test_a_destination_killed_after_the_handoff_leaves_the_stream_whole(pair):
    """B dies (kill -9) while it answers the migrated request: A resumes it from what B had sent.
    (Last: B stays dead.)"""
    a, b = pair["A"], pair["B"]
    _on_b(pair)
    reference = [e["token_id"] for e in _events(a, node="A") if e["type"] == "token"]
    with a.client() as c, c.infer(MODEL, PROMPT, max_tokens=TOKENS, temperature=0.0, chat=False, node="A") as s:
        events = s.events()
        got = [next(events) for _ in range(30)]
        rid = next(r["id"] for r in c.requests() if r["model"] == MODEL)
        assert c.migrate(rid, "B")["ran_on"] == "B"
        got.append(next(events))                 # B answers now
        b.kill9()
        got += list(events)
    tokens = [e for e in got if e["type"] == "token"]
    assert [e["index"] for e in tokens] == list(range(len(tokens)))
    assert [e["token_id"] for e in tokens] == reference
    recovered = got[-1]["stats"]["migration"]["recovered"]
    assert recovered["failed_node"] == "B" and recovered["on"] == "A", got[-1]["stats"]
