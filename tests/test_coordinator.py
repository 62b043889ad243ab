"""Cluster.infer's choices with real Nodes and the real placement, in one process.

Serf's answer (who is a member, in which status) is given as a fixed roster: these tests are
about what the coordinator does with it. The three-node tests with real agents and peer
sockets are in test_cluster.py.
"""
import dataclasses
import time

import pytest

from sllmd.cluster.coordinator import Cluster
from sllmd.cluster.locality import NodeView, local_state
from sllmd.errors import ModelNotFoundError, NodeNotFoundError
from sllmd.inference import InferRequest, SamplingParams
from test_node import infer, node_factory, sources, tok  # noqa: F401  (fixtures)
from test_server import serve  # noqa: F401  (fixture)


@dataclasses.dataclass
class Member:
    name: str
    status: str
    address: str = "127.0.0.1:7946"
    endpoint: str | None = None
    public_key: bytes | None = None
    version: int = 0
    last_heard: float = 0.0


class Roster:
    """What Serf reports: a fixed member list."""

    def __init__(self, *members: Member):
        self.list = list(members)
        self.published: list[dict] = []

    def members(self):
        return list(self.list)

    def get(self, name):
        return next((m for m in self.list if m.name == name), None)

    def admitted_keys(self):
        return {m.public_key for m in self.list if m.status in ("alive", "suspect")}

    def publish(self, **digest):
        self.published.append(digest)


def cluster_of(node, roster: Roster) -> Cluster:
    c = Cluster(node.config, node, membership=roster, transport_keys=(b"P" * 40, b"S" * 40))
    c.name = "here"
    return c


def run(cluster, model, node=None):
    req = InferRequest(model, prompt="héllo", sampling=SamplingParams(max_tokens=6))
    events = list(cluster.infer(req, None, node=node))
    assert events[-1]["type"] == "done"
    return "".join(e["text"] for e in events[:-1]), events[-1]["stats"]


def test_a_model_only_this_node_holds_runs_here_with_the_decision_in_its_stats(node_factory, sources):
    node = node_factory()
    node.import_model("m0", str(sources["m0"]))
    cluster = cluster_of(node, Roster(Member("here", "alive")))
    text, stats = run(cluster, "m0")
    placement = stats["placement"]
    assert placement["node"] == "here" and not placement["forced"]
    assert placement["winner"]["path"] == "ssd" and placement["winner"]["node"] == "here"
    assert stats["load_tier"] == "ssd"   # the node's own stats come through
    assert text == infer(node, "m0")[0]   # the same answer as asking the node itself


def test_a_forced_node_that_is_not_alive_is_refused_clearly(node_factory, sources):
    node = node_factory()
    node.import_model("m0", str(sources["m0"]))
    cluster = cluster_of(node, Roster(Member("here", "alive"), Member("gone", "failed")))
    with pytest.raises(NodeNotFoundError, match="'gone' is failed"):
        run(cluster, "m0", node="gone")
    with pytest.raises(NodeNotFoundError, match="'ghost' is not a member"):
        run(cluster, "m0", node="ghost")
    assert run(cluster, "m0", node="here")[1]["placement"]["forced"]


def test_a_failed_members_copy_is_never_chosen(node_factory, sources, tmp_path):
    here, there = node_factory(), node_factory(store_dir=tmp_path / "there")
    there.import_model("m1", str(sources["m1"]))
    cluster = cluster_of(here, Roster(Member("here", "alive"), Member("peer", "failed", endpoint="tcp://x:1")))
    state = local_state(there)
    cluster._views["peer"] = NodeView("peer", "alive", state, state["version"], time.monotonic())
    assert [v.status for v in cluster.views() if v.name == "peer"] == ["failed"]   # Serf's word wins
    with pytest.raises(ModelNotFoundError):   # nobody alive holds it: this node answers as it would alone
        run(cluster, "m1")


def test_nodes_lists_this_node_with_its_key_before_serf_does(node_factory):
    node = node_factory()
    rows = cluster_of(node, Roster()).nodes()
    assert [(r["name"], r["status"], r["self"], r["public_key"]) for r in rows] == [("here", "alive", True, "P" * 40)]
    assert rows[0]["state"]["version"] == node.version


def test_the_server_sends_infer_through_the_cluster_with_the_clients_node(node_factory, sources, serve):
    from sllmd.client import Client
    node = node_factory()
    node.import_model("m0", str(sources["m0"]))
    served = serve(node, cluster=cluster_of(node, Roster(Member("here", "alive"))))
    with Client(served.socket, timeout=60) as c:
        with c.infer("m0", "héllo", max_tokens=4, node="here") as stream:
            "".join(stream)
        assert stream.stats["placement"]["node"] == "here" and stream.stats["placement"]["forced"]
        with pytest.raises(NodeNotFoundError, match="ghost"):
            with c.infer("m0", "héllo", max_tokens=4, node="ghost") as stream:
                "".join(stream)
