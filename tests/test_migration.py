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

from cluster_helpers import ClusterNode, close_all, start_all, write_cluster_key
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
        yield {"A": a, "B": b, "source": source}
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
    got: list[dict] = []
    started = threading.Event()

    def consume():
        with a.client() as c, c.infer(MODEL, PROMPT, max_tokens=TOKENS, temperature=0.0, chat=False,
                                      node="A") as s:
            for ev in s.events():
                got.append(ev)
                if len(got) == 50:
                    started.set()

    reader = threading.Thread(target=consume)
    reader.start()
    assert started.wait(60)
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
    reader.join(120)
    assert not reader.is_alive()
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


def test_a_destination_killed_after_the_handoff_leaves_the_stream_whole(pair):
    """B dies (kill -9) while it answers the migrated request: A resumes it from what B had sent.
    (Last: B stays dead.)"""
    a, b = pair["A"], pair["B"]
    with b.client() as c:
        if not any(m["name"] == MODEL for m in c.models()):   # the refusal test removed it
            c.import_model(MODEL, str(pair["source"]))
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
