"""Placement table tests: each path, ties, stale state, refused admission, changed bandwidths."""
import pytest

from sllmd.cluster.bandwidth import Bandwidths, Ewma
from sllmd.cluster.locality import NodeView
from sllmd.cluster.placement import DEFAULT_BANDWIDTHS, Estimate, place

GB = 10**9
NOW = 1000.0
M = "smol"


def model(tiers, size=GB, **kw):
    return dict({"name": M, "state": "loaded" if "device" in tiers else "dram" if "dram" in tiers else "ssd",
                 "tiers": list(tiers), "checkpoint_bytes": size, "ssd_bytes": size}, **kw)


def view(name, models=(), instances=(), bw=None, q=0.0, status="alive", age=0.0, device=None):
    state = {"models": list(models), "instances": list(instances), "queue_delay_s": q, "device": device,
             "bandwidths": dict({"dram_device": 10 * GB, "ssd_device": 2 * GB} if bw is None else bw)}
    return NodeView(name=name, status=status, state=state, version=1, fetched_at=NOW - age)


def inst(active=0, queued=0, depth=4, service=0.5):
    return {"name": M, "state": "loaded", "active_requests": active, "queued": queued, "queue_depth": depth,
            "service_s": service}


CASES = [
    # (id, views, winner node, winner path, seconds)
    ("instance idle beats dram", [view("a", [model(["ssd", "dram", "device"])], [inst()]),
                                  view("b", [model(["ssd", "dram"])])], "a", "instance", 0.0),
    ("instance queue delay", [view("a", [model(["ssd", "dram", "device"])], [inst(active=1, queued=1)])],
     "a", "instance", 1.0),
    ("dram beats ssd", [view("b", [model(["ssd", "dram"])]), view("c", [model(["ssd"])])], "b", "dram", 0.1),
    ("ssd path", [view("c", [model(["ssd"])]), view("d")], "c", "ssd", 0.5),
    ("queue delay of the node counts", [view("b", [model(["ssd", "dram"])], q=1.0), view("c", [model(["ssd"])])],
     "c", "ssd", 0.5),
    ("busy instance loses to a dram copy elsewhere",
     [view("a", [model(["ssd", "dram", "device"])], [inst(active=1, queued=3, service=2.0)]),
      view("b", [model(["ssd", "dram"])])], "b", "dram", 0.1),
    ("ssd stages on a GPU: the slower one (they overlap)",
     [view("c", [model(["ssd"])], bw={"ssd_dram": 1 * GB, "dram_device": 4 * GB}, device="cuda:0")], "c", "ssd", 1.0),
    ("ssd stages on a CPU device: their times add (same cores, same memory)",
     [view("c", [model(["ssd"])], bw={"ssd_dram": 1 * GB, "dram_device": 4 * GB}, device="cpu")], "c", "ssd", 1.25),
    ("an unmeasured stage counts at its default, never as free",
     [view("c", [model(["ssd"])], bw={"dram_device": 4 * GB}, device="cpu")], "c", "ssd",
     1 / DEFAULT_BANDWIDTHS["ssd_dram"] * GB + 0.25),
    ("a CPU node's DRAM copy beats another's SSD copy over the same copy rate",
     [view("b", [model(["ssd", "dram"])], bw={"dram_device": 4 * GB}, device="cpu"),
      view("c", [model(["ssd"])], bw={"dram_device": 4.5 * GB}, device="cpu")], "b", "dram", 0.25),
    ("peer copy when the node can fetch", [view("a", bw={"peer_ssd": 1 * GB, "ssd_device": 2 * GB}),
                                           view("b", [model(["ssd"])], q=10.0)], "a", "peer", 1.5),
    ("failed/left/suspect nodes are no candidates", [view("a", [model(["ssd", "dram"])], status="failed"),
                                                     view("s", [model(["ssd", "dram"])], status="suspect"),
                                                     view("c", [model(["ssd"])])], "c", "ssd", 0.5),
    ("broken copy is no candidate", [view("a", [model(["ssd"], error="checksum")]), view("c", [model(["ssd"])])],
     "c", "ssd", 0.5),
]


@pytest.mark.parametrize("views,node,path,seconds", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_paths(views, node, path, seconds):
    d = place(M, views, NOW)
    assert (d.winner.node, d.winner.path) == (node, path)
    assert d.winner.seconds == pytest.approx(seconds)
    assert [c.node for c in d.candidates][0] == node
    assert d.runner_up is (d.candidates[1] if len(d.candidates) > 1 else None)


def test_saturated_instance_is_not_reloaded_there():
    d = place(M, [view("a", [model(["ssd", "dram", "device"])], [inst(queued=4, depth=4)])], NOW)
    assert d.winner is None and d.candidates == []


def test_nobody_holds_it():
    d = place(M, [view("a"), view("b")], NOW)
    assert d.winner is None and d.runner_up is None


def test_repository_path_needs_a_measured_fetch():
    views = [view("a", bw={"repo_ssd": 0.5 * GB, "ssd_device": 1 * GB}), view("b")]
    d = place(M, views, NOW, repository={M: GB})
    assert (d.winner.node, d.winner.path, d.winner.seconds) == ("a", "repo", pytest.approx(3.0))
    assert [c.node for c in d.candidates] == ["a"]   # b cannot fetch from the repository


def test_ties_prefer_the_coordinator_then_the_name():
    views = [view("b", [model(["ssd", "dram"])]), view("a", [model(["ssd", "dram"])])]
    assert place(M, views, NOW).winner.node == "a"
    d = place(M, views, NOW, prefer="b")
    assert (d.winner.node, d.runner_up.node) == ("b", "a")


def test_tie_between_paths_prefers_the_faster_kind():
    # equal seconds: an instance with 0.1 s of queue vs a dram copy needing 0.1 s
    views = [view("b", [model(["ssd", "dram"])]),
             view("z", [model(["ssd", "dram", "device"])], [inst(active=1, service=0.1)])]
    assert place(M, views, NOW).winner.path == "instance"


def test_stale_state_never_wins_over_known():
    views = [view("b", [model(["ssd", "dram"])], age=30.0), view("c", [model(["ssd"])], q=5.0)]
    d = place(M, views, NOW, stale_after_s=10.0)
    assert d.winner.node == "c"
    assert [c.node for c in d.candidates] == ["c", "b"]
    assert d.candidates[1].detail["stale"] is True
    fresh = place(M, views, NOW, stale_after_s=60.0)
    assert fresh.winner.node == "b"


def test_only_stale_nodes_still_get_tried():
    d = place(M, [view("b", [model(["ssd"])], age=99.0)], NOW)
    assert d.winner.node == "b" and d.winner.detail["stale"]


def test_refused_admission_moves_to_the_runner_up():
    views = [view("a", [model(["ssd", "dram", "device"])], [inst()]), view("b", [model(["ssd", "dram"])]),
             view("c", [model(["ssd"])])]
    first = place(M, views, NOW)
    assert [c.node for c in first.candidates] == ["a", "b", "c"]
    again = place(M, views, NOW, exclude={first.winner.node})
    assert again.winner.node == "b" and again.runner_up.node == "c"
    assert place(M, views, NOW, exclude={"a", "b", "c"}).winner is None


def test_a_node_whose_measured_bandwidth_changed():
    b = view("b", [model(["ssd"], size=4 * GB)], bw={"ssd_device": 8 * GB})
    c = view("c", [model(["ssd"], size=4 * GB)], bw={"ssd_device": 4 * GB})
    assert place(M, [b, c], NOW).winner.node == "b"
    # b's disk slows down: its EWMA, fed by real loads, moves below c's
    bws = Bandwidths(alpha=0.5)
    bws.observe("ssd_device", 8 * GB, 1.0)
    for _ in range(4):
        bws.observe("ssd_device", 1 * GB, 1.0)
    assert bws.get("ssd_device") < 4 * GB
    b = view("b", [model(["ssd"], size=4 * GB)], bw=bws.to_dict())   # its next pulled state
    d = place(M, [b, c], NOW)
    assert d.winner.node == "c" and d.runner_up.node == "b"
    assert d.runner_up.seconds == pytest.approx(4 * GB / bws.get("ssd_device"))


def test_unmeasured_path_borrows_the_clusters_median():
    views = [view("a", [model(["ssd"])], bw={}), view("x", bw={"ssd_device": 3 * GB}),
             view("y", bw={"ssd_device": 5 * GB})]
    d = place(M, views, NOW)
    assert d.winner.seconds == pytest.approx(GB / (4 * GB)) and d.winner.detail["measured"] is False
    alone = place(M, [view("a", [model(["ssd"])], bw={})], NOW)
    assert alone.winner.seconds == pytest.approx(GB / DEFAULT_BANDWIDTHS["ssd_device"])


def test_migration_hook_adds_a_candidate():
    views = [view("a", [model(["ssd"])]), view("b")]
    hook = lambda m, v: Estimate(v.name, "migration", 0.2, {"a": 0.01}) if v.name == "b" else None  # noqa: E731
    d = place(M, views, NOW, migration=hook)
    assert (d.winner.node, d.winner.path) == ("b", "migration") and d.runner_up.node == "a"


def test_ewma_and_bandwidth_input_checks():
    e = Ewma(alpha=0.5)
    assert e.add("k", 10.0) == 10.0 and e.add("k", 20.0) == 15.0
    bws = Bandwidths()
    bws.observe("dram_device", 100, 1.0)   # too small to measure bandwidth
    bws.observe("dram_device", 1 << 30, 0.0)
    assert bws.get("dram_device") is None
    with pytest.raises(ValueError):
        bws.observe("nvme_moon", 1 << 30, 1.0)
    with pytest.raises(ValueError):
        Ewma(alpha=0)


def test_a_node_with_a_repository_configured_is_priced_at_the_default_until_it_measured_one():
    a = view("a", bw={"ssd_device": 1 * GB})
    a.state["fetch"] = ["repo"]                      # --repository set, nothing downloaded yet
    d = place(M, [a, view("b")], NOW, repository={M: GB})
    assert (d.winner.node, d.winner.path) == ("a", "repo")
    assert d.winner.seconds == pytest.approx(GB / DEFAULT_BANDWIDTHS["repo_ssd"] + 1.0)
    assert d.winner.detail["measured"] is False and [c.node for c in d.candidates] == ["a"]
    a.state["fetch"] = []                            # no repository configured there: no repo path
    assert place(M, [NodeView("a", "alive", dict(a.state), 1, NOW)], NOW, repository={M: GB}).winner is None
