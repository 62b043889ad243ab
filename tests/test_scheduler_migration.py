"""The scheduler's migration option end to end (DESIGN.md sections 8 and 9, the paper's case).

Two real nodes with their Serf agents on loopback, each device budget holding one model. X holds
`beta` in DRAM but its device is busy with a long `alpha` request; Y holds `alpha` on SSD. A
request for `beta` reaches the cluster through Y: placement finds that moving alpha's request to
Y and loading beta on X beats waiting for alpha to finish, so alpha's request moves (its client,
connected to X, sees one unbroken stream equal to an unmigrated run) and beta loads on X and
answers as it does alone. Both requests' stats say so.
"""
from __future__ import annotations

import shutil
import time

import pytest

from cluster_helpers import BackgroundStream, ClusterNode, close_all, start_all, write_cluster_key
from daemon_helpers import remove_tree, short_tempdir
from sllmd import store

pytestmark = pytest.mark.skipif(shutil.which("serf") is None, reason="serf is not installed (make setup installs it)")

PROMPT = "a story " * 40   # long enough that its prefill times the node's rate per token (the move's a)
LONG = 3000    # alpha's request: long enough that waiting for it costs far more than moving it
SHORT = 16


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    from conftest import make_tiny_model
    from test_inference import tiny_tokenizer
    tok = tiny_tokenizer()
    tok.eos_token = None
    sources = {}
    for seed, name in enumerate(("alpha", "beta")):
        model = make_tiny_model("llama", seed=seed, vocab_size=len(tok), max_position_embeddings=100_000,
                                eos_token_id=None)
        sources[name] = store.save_model(model, tmp_path_factory.mktemp(name) / name, tokenizer=tok)
    root = short_tempdir("sllm-room-")
    key = root / "cluster.key"
    write_cluster_key(key)
    # each model takes one 2 MiB arena granule on the CPU device: 3 MiB holds one instance, not two
    extra = ("--compute-dtype", "fp32", "--keep-alive", "-1", "--device-memory", "3MiB", "--room-wait", "60")
    x = ClusterNode(root / "x", "X", key, None, *extra)
    y = ClusterNode(root / "y", "Y", key, x.gossip, *extra)
    try:
        start_all([x, y])
        with x.client() as c:
            c.import_model("alpha", str(sources["alpha"]))
            c.import_model("beta", str(sources["beta"]))
        with y.client() as c:
            c.import_model("alpha", str(sources["alpha"]))
        deadline = time.monotonic() + 30
        while True:
            with y.client() as c:
                if sorted(r["name"] for r in c.nodes() if r["status"] == "alive") == ["X", "Y"]:
                    break
            assert time.monotonic() < deadline, "the two nodes did not see each other"
            time.sleep(0.2)
        yield {"X": x, "Y": y}
    finally:
        close_all([x, y])
        remove_tree(root)


def _tokens(events) -> list[int]:
    return [e["token_id"] for e in events if e["type"] == "token"]


def _run(at, model, max_tokens, **kw) -> list[dict]:
    with at.client() as c, c.infer(model, PROMPT, max_tokens=max_tokens, temperature=0.0, chat=False, **kw) as s:
        return list(s.events())


def _wait_for(cond, what, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def test_a_request_for_a_model_held_by_a_busy_node_moves_the_running_request_away(pair):
    x, y = pair["X"], pair["Y"]
    beta_alone = _tokens(_run(x, "beta", SHORT, node="X"))          # the references, each run unmigrated
    with x.client() as c:
        c.evict("beta")                                               # beta stays in X's DRAM
        assert "dram" in next(m for m in c.models() if m["name"] == "beta")["tiers"]
    alpha_alone = _tokens(_run(x, "alpha", LONG, node="X"))
    assert len(alpha_alone) == LONG

    stream = BackgroundStream(x, "alpha", PROMPT, max_tokens=LONG, temperature=0.0, chat=False, node="X")
    got = stream.events
    try:
        assert stream.started.wait(60)

        with x.client() as c:
            (rid,) = [r["id"] for r in c.requests() if r["model"] == "alpha"]

        def y_sees_it():   # this request: Y's view may still list the reference run's, already finished
            with y.client() as c:
                return any(r.get("node") == "X" and r.get("id") == rid and r.get("tokens_out")
                           for r in c.requests(all=True))
        _wait_for(y_sees_it, "Y never saw alpha's request running on X")

        beta = _run(y, "beta", SHORT)                                 # placed by Y, not forced anywhere
    finally:
        assert stream.join(180)

    done = beta[-1]
    assert done["type"] == "done", beta[-1]
    placement = done["stats"]["placement"]
    assert placement["node"] == "X" and placement["path"] == "migration", placement
    assert placement["winner"]["detail"]["moves"][0]["to"] == "Y", placement["winner"]
    (moved,) = placement["made_room"]
    assert moved["ok"] and moved["ran_on"] == "Y", moved
    assert _tokens(beta) == beta_alone                                # beta answers as it does alone

    tokens = [e for e in got if e["type"] == "token"]
    assert [e["index"] for e in tokens] == list(range(LONG))         # no gap, no repeat
    assert [e["token_id"] for e in tokens] == alpha_alone             # identical to the unmigrated run
    alpha_done = got[-1]
    assert alpha_done["type"] == "done"
    migration = alpha_done["stats"]["migration"]
    assert migration["ran_on"] == "Y" and migration["reason"].startswith("room for a request on X"), migration
    with x.client() as c:                                             # X's device now holds beta, not alpha
        assert [p["name"] for p in c.ps()] == ["beta"]
