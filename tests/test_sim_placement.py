"""place()'s holder index and memos (what makes it fast for the simulator and large clusters):
table tests that it answers as the plain formula would, as states change between calls."""
import random

import pytest

from sllmd.cluster import placement
from sllmd.cluster.locality import NodeView
from sllmd.cluster.placement import PATH_RANK, CANDIDATE_STATUS, Estimate, node_estimates, place

GB = 10**9
NOW = 500.0


def state(models=(), bw=None, q=0.0, instances=()):
    return {"models": [dict(m) for m in models], "instances": list(instances), "queue_delay_s": q,
            "bandwidths": dict({"dram_device": 10 * GB, "ssd_device": 2 * GB} if bw is None else bw)}


def held(name, tiers, size=GB, **kw):
    return dict({"name": name, "state": "x", "tiers": list(tiers), "checkpoint_bytes": size, "ssd_bytes": size}, **kw)


def view(name, st, status="alive", age=0.0):
    return NodeView(name, status, st, 1, NOW - age)


def brute(model, views, now, *, stale_after_s=10.0, exclude=frozenset(), prefer=None, repository=None,
          migration=None):
    """Every live node through node_estimates (the per-node formula), the same order key, all candidates."""
    live = [v for v in views if v.status in CANDIDATE_STATUS and v.name not in exclude]
    fb = placement._Fallbacks(live)
    holders = {}
    for v in live:
        info = placement._models(v.state or {}).get(model)
        if info is not None and "ssd" in (info.get("tiers") or ()) and now - v.fetched_at <= stale_after_s:
            holders[v.name] = placement._size(info)
    best = {}
    for v in live:
        options = node_estimates(model, v, holders, fb, repository or {})
        if migration is not None and (e := migration(model, v)) is not None:
            options.append(e)
        for e in options:
            key = (now - v.fetched_at > stale_after_s, e.seconds, e.node != prefer, PATH_RANK.get(e.path, 9), e.node)
            if e.node not in best or key < best[e.node][0]:
                best[e.node] = (key, e)
    return [(e.node, e.path, e.seconds) for _, e in sorted(best.values(), key=lambda kp: kp[0])]


def got(decision):
    return [(e.node, e.path, e.seconds) for e in decision.candidates]


def test_a_changed_state_at_a_position_is_seen():
    a, b = view("a", state([held("m", ["ssd"])])), view("b", state())
    assert got(place("m", [a, b], NOW)) == [("a", "ssd", 0.5)]
    b2 = view("b", state([held("m", ["ssd", "dram"])]))     # b's next pull: a new dict
    assert got(place("m", [a, b2], NOW)) == [("b", "dram", 0.1), ("a", "ssd", 0.5)]
    a2 = view("a", state())                                   # a dropped its copy
    assert got(place("m", [a2, b2], NOW)) == [("b", "dram", 0.1)]


@pytest.mark.parametrize("order", [[0, 1, 2], [2, 1, 0], [1, 2], [0], [2, 0, 1, 3], []],
                         ids=["same", "reversed", "shrunk", "one", "grown", "empty"])
def test_lists_that_shrink_grow_and_reorder(order):
    pool = [view("a", state([held("m", ["ssd"])])), view("b", state([held("m", ["ssd", "dram"])])),
            view("c", state([held("m", ["ssd"], size=2 * GB)], bw={"ssd_device": 8 * GB})),
            view("d", state([held("m", ["ssd", "dram", "device"])],
                            instances=[{"name": "m", "state": "loaded", "queued": 1, "service_s": 0.3}]))]
    place("m", pool, NOW)      # the index holds the full list first
    views = [pool[i] for i in order]
    assert got(place("m", views, NOW, max_candidates=None)) == brute("m", views, NOW)


def test_a_borrowed_bandwidth_follows_the_other_nodes():
    # a has no bandwidths of its own: it borrows the median of the others', which is not memoized
    a = view("a", state([held("m", ["ssd"])], bw={}))
    x, y = view("x", state(bw={"ssd_device": 3 * GB})), view("y", state(bw={"ssd_device": 5 * GB}))
    assert place("m", [a, x, y], NOW).winner.seconds == pytest.approx(GB / (4 * GB))
    x2 = view("x", state(bw={"ssd_device": 7 * GB}))
    assert place("m", [a, x2, y], NOW).winner.seconds == pytest.approx(GB / (6 * GB))
    assert place("m", [a, x2, y], NOW, exclude={"y"}).winner.seconds == pytest.approx(GB / (7 * GB))


def test_the_same_state_under_a_new_view_keeps_its_status_and_age():
    st = state([held("m", ["ssd", "dram"])])
    other = view("c", state([held("m", ["ssd"])]))
    assert place("m", [view("b", st), other], NOW).winner.node == "b"
    assert place("m", [view("b", st, status="failed"), other], NOW).winner.node == "c"
    d = place("m", [view("b", st, age=60.0), other], NOW)
    assert [e.node for e in d.candidates] == ["c", "b"] and d.candidates[1].detail["stale"]


FETCH = {"dram_device": 10 * GB, "ssd_device": 2 * GB, "peer_ssd": 1 * GB, "repo_ssd": 0.25 * GB}


@pytest.mark.parametrize("case,repo,expect", [
    ("peer from the smallest copy", None, [("f", "peer", 1.5), ("h", "ssd", 10.5)]),
    ("repo when it is faster", {"m": GB // 100}, [("f", "repo", 0.045), ("g", "repo", 0.045), ("h", "ssd", 10.5)]),
    ("a holder is not its own source", None, [("f", "peer", 1.5), ("h", "ssd", 10.5)]),
], ids=lambda x: x if isinstance(x, str) else "")
def test_fetching_nodes(case, repo, expect):
    vs = [view("f", state(bw=FETCH)), view("h", state([held("m", ["ssd"])], q=10.0)),
          view("g", state(bw=dict(FETCH, peer_ssd=None)))]
    d = place("m", vs, NOW, repository=repo, max_candidates=None)
    assert [(n, p, pytest.approx(s)) for n, p, s in expect] == got(d)
    assert got(d) == brute("m", vs, NOW, repository=repo)
    assert d.winner.detail["bytes"] > 0


def test_the_migration_hook_sees_every_live_node_once():
    vs = [view("a", state([held("m", ["ssd"])])), view("b", state()), view("c", state(), status="failed"),
          view("d", state())]
    seen = []

    def hook(model, v):
        seen.append(v.name)
        return Estimate(v.name, "migration", 0.25, {}) if v.name == "d" else None
    d = place("m", vs, NOW, migration=hook, exclude={"b"})
    assert seen == ["a", "d"] and got(d) == [("d", "migration", 0.25), ("a", "ssd", 0.5)]


def test_random_clusters_with_churn_match_the_formula():
    rng = random.Random(7)
    models = [f"m{i}" for i in range(12)]

    def random_state():
        ms, inst = [], []
        for name in rng.sample(models, rng.randint(0, 6)):
            roll = rng.random()
            tiers = ["ssd"] + (["dram"] if roll < 0.5 else []) + (["device"] if roll < 0.2 else [])
            ms.append(held(name, tiers, size=rng.choice((1, 2, 4)) * GB,
                           error="bad" if rng.random() < 0.05 else None))
            if "device" in tiers:
                inst.append({"name": name, "state": "loaded", "active_requests": rng.randint(0, 1),
                             "queued": rng.randint(0, 3), "queue_depth": 3, "service_s": rng.uniform(0.1, 2)})
        bw = rng.choice([{}, {"ssd_device": rng.uniform(1, 4) * GB}, dict(FETCH),
                         {"ssd_dram": 1 * GB, "dram_device": 5 * GB, "repo_ssd": 0.5 * GB}])
        return state(ms, bw=bw, q=rng.choice((0.0, 0.5, 2.0)), instances=inst)

    views = [view(f"n{i}", random_state(), age=rng.choice((0.0, 1.0, 30.0))) for i in range(40)]
    repo = {m: GB for m in models[:6]}
    for step in range(200):
        i = rng.randrange(len(views))
        views[i] = view(views[i].name, random_state() if rng.random() < 0.7 else views[i].state,
                        status=rng.choice(("alive", "alive", "alive", "failed")), age=rng.choice((0.0, 30.0)))
        model = rng.choice(models)
        ex = {f"n{rng.randrange(40)}"} if rng.random() < 0.3 else frozenset()
        d = place(model, views, NOW, repository=repo, exclude=ex, prefer="n3", max_candidates=None)
        assert got(d) == brute(model, views, NOW, repository=repo, exclude=ex, prefer="n3"), step


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_many_fetching_nodes_are_ranked_as_the_formula_ranks_them(seed):
    """More fetching nodes than placement.LIST_FETCHERS: ranked with arrays, walked fastest first,
    stopped after max_candidates fresh ones; ties (equal bandwidths), stale, excluded and failed
    nodes, and a node whose SSD rate borrows the median must still give the formula's top 8."""
    rng = random.Random(seed)
    n = 3 * placement.LIST_FETCHERS

    def random_state():
        bw = rng.choice([dict(FETCH), dict(FETCH), dict(FETCH, peer_ssd=rng.choice((0.5, 2.0)) * GB),
                         {"repo_ssd": 0.25 * GB, "ssd_dram": 1 * GB},          # borrows ssd_device's median
                         dict(FETCH, repo_ssd=None), {"ssd_device": 3 * GB}])  # peer only; cannot fetch
        ms = [held("m", ["ssd"] + (["dram"] if rng.random() < 0.5 else []), size=rng.choice((1, 2)) * GB)] \
            if rng.random() < 0.1 else []
        return state(ms, bw=bw, q=rng.choice((0.0, 0.0, 1.0, 7.5)))

    views = [view(f"n{i:03d}", random_state(), age=rng.choice((0.0, 0.0, 30.0))) for i in range(n)]
    repo = {"m": GB}
    for step in range(60):
        i = rng.randrange(n)
        views[i] = view(views[i].name, random_state(), status=rng.choice(("alive", "alive", "failed")),
                        age=rng.choice((0.0, 30.0)))
        ex = {f"n{rng.randrange(n):03d}" for _ in range(rng.randint(0, 3))}
        prefer = f"n{rng.randrange(n):03d}"
        for model, r in (("m", repo), ("m", None), ("absent", repo)):
            d = place(model, views, NOW, repository=r, exclude=ex, prefer=prefer)
            assert got(d) == brute(model, views, NOW, repository=r, exclude=ex, prefer=prefer)[:8], step


def test_a_borrowed_stage_of_the_ssd_rate_follows_the_other_nodes():
    # a measured its disk read only: its SSD rate takes the copy stage from the cluster's median
    a = view("a", state([held("m", ["ssd"])], bw={"ssd_dram": 5 * GB}))
    x, y = view("x", state(bw={"dram_device": 2 * GB})), view("y", state(bw={"dram_device": 4 * GB}))
    assert place("m", [a, x, y], NOW).winner.seconds == pytest.approx(GB / (3 * GB))
    x2 = view("x", state(bw={"dram_device": 8 * GB}))
    assert place("m", [a, x2, y], NOW).winner.seconds == pytest.approx(GB / (5 * GB))
    assert got(place("m", [a, x2, y], NOW)) == brute("m", [a, x2, y], NOW)
