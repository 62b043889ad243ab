"""The daemon's lifecycle in-process: a stop is bounded even when the node hangs while closing."""
from __future__ import annotations

import threading

import sllmd.daemon as daemon_mod
from daemon_helpers import ScriptedNode, remove_tree, short_tempdir
from sllmd.config import Config
from sllmd.daemon import Daemon, State


class NodeThatHangsClosing(ScriptedNode):
    def __init__(self):
        super().__init__()
        self.release = threading.Event()
        self.closing = threading.Event()

    def start(self):
        pass

    def close(self):
        self.closing.set()
        self.release.wait()          # e.g. a load stuck in native code


def test_a_stop_does_not_wait_for_a_node_that_hangs_closing(monkeypatch):
    monkeypatch.setattr(daemon_mod, "NODE_CLOSE_S", 0.2)
    root = short_tempdir()
    node = NodeThatHangsClosing()
    d = Daemon(Config(socket=str(root / "s.sock"), store_dir=root / "store", shutdown_grace_s=0.0), env={},
               node_factory=lambda cfg: node)
    try:
        d.start()
        assert d.state is State.RUNNING
        stopper = threading.Thread(target=d.shutdown)
        stopper.start()
        stopper.join(60)                 # the node alone would hold it forever
        assert not stopper.is_alive() and node.closing.is_set()
        assert d.state is State.STOPPED
        assert "sllm-node-close" in d.stragglers()     # __main__ then exits without interpreter teardown
    finally:
        node.release.set()
        remove_tree(root)
