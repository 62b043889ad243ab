"""Locality state from a real Node: tiers, instances, bandwidths measured by its loads, and the
placement decision it leads to."""
import time

import pytest

from sllmd.cluster.bandwidth import probe
from sllmd.cluster.locality import NodeView, local_state
from sllmd.cluster.placement import place
from test_node import infer, node_factory, sources, tok  # noqa: F401  (fixtures)


def view(node, name="n", age=0.0):
    state = local_state(node)
    return NodeView(name=name, status="alive", state=state, version=state["version"],
                    fetched_at=time.monotonic() - age)


def entry(state, name):
    return next(m for m in state["models"] if m["name"] == name)


def test_state_follows_the_tiers_and_loads_measure_bandwidths(node_factory, sources):
    node = node_factory()
    node.import_model("m0", str(sources["m0"]))
    s0 = local_state(node)
    m = entry(s0, "m0")
    assert m["tiers"] == ["ssd"] and m["checkpoint_bytes"] > 0
    assert s0["instances"] == [] and s0["bandwidths"] == {} and s0["queue_delay_s"] == 0.0
    assert s0["tiers"]["dram"]["capacity_bytes"] == 16 << 20
    assert s0["tiers"]["device"]["free_bytes"] == s0["tiers"]["device"]["capacity_bytes"]
    assert place("m0", [view(node)], time.monotonic()).winner.path == "ssd"

    infer(node, "m0")                      # a cold load: SSD -> DRAM -> device
    s1 = local_state(node)
    assert s1["version"] > s0["version"]
    assert set(s1["bandwidths"]) == {"ssd_device"} and s1["bandwidths"]["ssd_device"] > 0
    [inst] = s1["instances"]
    assert (inst["name"], inst["active_requests"], inst["queued"], inst["queue_depth"]) == ("m0", 0, 0, 4)
    assert inst["service_s"] > 0 and inst["queue_delay_s"] == 0.0
    assert entry(s1, "m0")["tiers"] == ["ssd", "dram", "device"]
    assert s1["tiers"]["device"]["used_bytes"] > 0
    d = place("m0", [view(node)], time.monotonic())
    assert (d.winner.path, d.winner.seconds) == ("instance", 0.0)

    node.evict("m0")                       # the DRAM copy stays
    s2 = local_state(node)
    assert entry(s2, "m0")["tiers"] == ["ssd", "dram"] and s2["instances"] == []
    d = place("m0", [view(node)], time.monotonic())
    assert d.winner.path == "dram" and d.winner.detail["measured"] is False   # not yet measured here

    infer(node, "m0")                      # a DRAM hit measures dram_device
    node.evict("m0")
    s3 = local_state(node)
    assert s3["bandwidths"]["dram_device"] > 0
    d = place("m0", [view(node)], time.monotonic())
    assert d.winner.path == "dram" and d.winner.detail["measured"] is True
    assert d.winner.seconds == pytest.approx(entry(s3, "m0")["checkpoint_bytes"] / s3["bandwidths"]["dram_device"])


def test_dram_copy_wins_over_an_ssd_copy_on_another_real_node(node_factory, sources, tmp_path):
    b = node_factory(store_dir=tmp_path / "b")
    c = node_factory(store_dir=tmp_path / "c")
    for n in (b, c):
        n.import_model("m1", str(sources["m1"]))
    infer(b, "m1")
    b.evict("m1")                          # b: DRAM; c: SSD only
    d = place("m1", [view(c, "c"), view(b, "b")], time.monotonic())
    assert (d.winner.node, d.winner.path) == ("b", "dram")
    assert (d.runner_up.node, d.runner_up.path) == ("c", "ssd")
    stale = place("m1", [view(c, "c"), view(b, "b", age=60.0)], time.monotonic(), stale_after_s=10.0)
    assert stale.winner.node == "c"        # b's state is too old to be trusted


def test_probe_seeds_the_host_copy_rate(node_factory):
    node = node_factory()
    measured = probe(node, nbytes=8 << 20)
    assert measured["dram_device"] > 0
    assert local_state(node)["bandwidths"]["dram_device"] == pytest.approx(measured["dram_device"])


@pytest.mark.parametrize("state,problem", [
    ("x", "not a map"),
    ({"models": "x"}, "models is not a list"),
    ({"models": [{"tiers": ["ssd"]}]}, "no name"),
    ({"models": [{"name": "m", "tiers": "ssd"}]}, "tiers is not a list"),
    ({"models": [{"name": "m", "checkpoint_bytes": "big"}]}, "not a size"),
    ({"instances": [{"name": "m", "queued": -1}]}, "not a number"),
    ({"bandwidths": {"ssd_device": 0}}, "not a positive number"),
    ({"bandwidths": {"ssd_device": float("nan")}}, "not a positive number"),
    ({"queue_delay_s": "soon"}, "queue_delay_s"),
])
def test_a_peer_state_placement_cannot_use_is_named(state, problem):
    from sllmd.cluster.locality import state_problem
    assert problem in state_problem(state)


def test_a_real_nodes_state_is_usable(node_factory):
    from sllmd.cluster.locality import state_problem
    assert state_problem(local_state(node_factory())) is None
