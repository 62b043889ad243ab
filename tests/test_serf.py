"""Membership on real Serf agents on loopback (-profile=local, distinct ports)."""
from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sllmd.cluster.cluster_key import keygen, load_cluster_key
from sllmd.cluster.membership import Membership
from sllmd.cluster.serf_agent import SerfAgent, free_port
from sllmd.cluster.serf_rpc import SerfRpc, SerfRpcError
from sllmd.config import Config
from sllmd.errors import ConfigError, Exit

pytestmark = pytest.mark.skipif(shutil.which("serf") is None, reason="serf is not installed (make setup)")


def wait_for(predicate, timeout=30.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def key_file(tmp_path):
    path = tmp_path / "cluster.key"
    keygen(path)
    return path


def node_config(name, key_file, join=()):
    return Config(node_name=name, peer_listen="tcp://127.0.0.1:1", gossip_listen=f"127.0.0.1:{free_port()}",
                  join=tuple(join), cluster_key=key_file, serf_profile="local")


@pytest.fixture
def cluster(key_file):
    started = []

    def start(name, join=()):
        m = Membership(node_config(name, key_file, join), poll_s=0.2)
        m.start()
        started.append(m)
        return m
    yield start
    for m in started:
        m.stop()


def statuses(m):
    return {x.name: x.status for x in m.members()}


def test_three_agents_form_a_cluster_and_tags_carry_the_digest(cluster):
    a = cluster("a")
    b = cluster("b", join=[a.config.gossip_listen])
    c = cluster("c", join=[b.config.gossip_listen])
    for m in (a, b, c):
        wait_for(lambda: statuses(m) == {"a": "alive", "b": "alive", "c": "alive"}, what=f"{m.config.node_name} sees 3")
    b.publish(endpoint="tcp://127.0.0.1:9101", public_key=b"K" * 40, version=7)
    wait_for(lambda: a.get("b").version == 7, what="a sees b's tags")
    wait_for(lambda: c.get("b").version == 7, what="c sees b's tags")
    seen = c.get("b")
    assert seen.endpoint == "tcp://127.0.0.1:9101" and seen.public_key == b"K" * 40
    assert b"K" * 40 in a.admitted_keys()


def test_a_killed_agent_is_seen_failed(cluster, key_file):
    a = cluster("a")
    key = load_cluster_key(key_file)
    lone = SerfAgent("victim", f"127.0.0.1:{free_port()}", key, {}, profile="local")
    lone.start()
    try:
        rpc = SerfRpc(lone.rpc_address, lone.rpc_auth)
        assert rpc.join([a.config.gossip_listen]) == 1
        rpc.close()
        wait_for(lambda: statuses(a).get("victim") == "alive", what="victim alive")
        os.kill(lone.pid, signal.SIGKILL)
        wait_for(lambda: statuses(a).get("victim") == "failed", timeout=30, what="victim failed")
        assert "victim" not in {m.name for m in a.members() if m.status == "alive"}
    finally:
        lone.stop()


def test_a_dead_child_agent_is_restarted_and_rejoins(cluster):
    a = cluster("a")
    b = cluster("b", join=[a.config.gossip_listen])
    wait_for(lambda: statuses(a) == {"a": "alive", "b": "alive"}, what="a sees b")
    b.publish(endpoint="tcp://127.0.0.1:9102", public_key=b"P" * 40, version=3)
    old_pid = b._agent.pid
    os.kill(old_pid, signal.SIGKILL)
    wait_for(lambda: b._agent.alive() and b._agent.pid != old_pid, what="b's agent restarted")
    assert b._agent.starts == 2
    wait_for(lambda: statuses(b) == {"a": "alive", "b": "alive"}, what="b rejoined")
    wait_for(lambda: a.get("b").status == "alive" and a.get("b").version == 3, what="a sees b back with its tags")


def test_stop_leaves_and_stops_the_agent(cluster):
    a = cluster("a")
    b = cluster("b", join=[a.config.gossip_listen])
    wait_for(lambda: statuses(a).get("b") == "alive", what="a sees b")
    agent = b._agent
    b.stop()
    assert not agent.alive()
    wait_for(lambda: statuses(a).get("b") == "left", what="b left")


def test_join_is_retried_until_the_peer_is_up(cluster, key_file):
    port = free_port()
    b = cluster("b", join=[f"127.0.0.1:{port}"])
    time.sleep(1.0)
    assert not b.joined.is_set()
    a = Membership(Config(node_name="a", peer_listen="tcp://127.0.0.1:1", gossip_listen=f"127.0.0.1:{port}",
                          cluster_key=key_file, serf_profile="local"))
    a.start()
    try:
        wait_for(lambda: statuses(b) == {"a": "alive", "b": "alive"}, what="b joined a once a was up")
    finally:
        a.stop()


def test_rpc_refuses_a_wrong_auth_token(key_file):
    agent = SerfAgent("x", f"127.0.0.1:{free_port()}", load_cluster_key(key_file), {}, profile="local")
    agent.start()
    try:
        with pytest.raises(SerfRpcError, match="auth"):
            SerfRpc(agent.rpc_address, "wrong-token")
        rpc = SerfRpc(agent.rpc_address, agent.rpc_auth)
        assert [m["Name"] for m in rpc.members()] == ["x"]
        rpc.close()
    finally:
        agent.stop()
    assert not agent.alive()


def test_keygen_writes_0600_and_refuses_to_overwrite(tmp_path):
    path = tmp_path / "k"
    out = subprocess.run([sys.executable, "-m", "sllmctl", "keygen", str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(load_cluster_key(path)) == 44
    out = subprocess.run([sys.executable, "-m", "sllmctl", "keygen", str(path)], capture_output=True, text=True)
    assert out.returncode != 0 and "exists" in out.stderr


def test_a_cluster_key_readable_by_others_is_refused(tmp_path, key_file):
    os.chmod(key_file, 0o644)
    with pytest.raises(ConfigError, match="0644"):
        load_cluster_key(key_file)
    store = tmp_path / "store"
    out = subprocess.run([sys.executable, "-m", "sllmd", "--store", str(store), "--socket", str(tmp_path / "s"),
                          "--peer-listen", "tcp://127.0.0.1:1", "--cluster-key", str(key_file)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == Exit.CONFIG and "0644" in out.stderr


def test_malformed_key_and_missing_key_are_refused(tmp_path):
    bad = tmp_path / "bad"
    bad.write_text("not a key\n")
    os.chmod(bad, 0o600)
    with pytest.raises(ConfigError, match="base64"):
        load_cluster_key(bad)
    from sllmd.config import load_config
    with pytest.raises(ConfigError, match="cluster_key"):
        load_config({"peer_listen": "tcp://127.0.0.1:1", "store": str(tmp_path)}, env={})
    with pytest.raises(ConfigError, match="base64"):
        load_config({"peer_listen": "tcp://127.0.0.1:1", "store": str(tmp_path), "cluster_key": str(bad)}, env={})
    cfg = load_config({"store": str(tmp_path)}, env={})
    assert not cfg.cluster_enabled and cfg.join == ()


def test_attach_mode_uses_a_running_agent_and_leaves_it_running(tmp_path):
    rpc_port, bind_port = free_port(), free_port()
    proc = subprocess.Popen(["serf", "agent", "-node=ext", f"-bind=127.0.0.1:{bind_port}",
                             f"-rpc-addr=127.0.0.1:{rpc_port}", "-profile=local"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: subprocess.run(["serf", "members", f"-rpc-addr=127.0.0.1:{rpc_port}"],
                                        capture_output=True).returncode == 0, what="external agent up")
        m = Membership(Config(node_name="ext", peer_listen="tcp://127.0.0.1:1",
                              serf_rpc=f"127.0.0.1:{rpc_port}", serf_profile="local"), poll_s=0.2)
        m.start()
        m.publish(endpoint="tcp://127.0.0.1:9103", public_key=b"Q" * 40, version=1)
        wait_for(lambda: m.get("ext") is not None and m.get("ext").endpoint == "tcp://127.0.0.1:9103",
                 what="own tags seen")
        m.stop()
        assert proc.poll() is None     # the agent it attached to is not its to stop
    finally:
        proc.terminate()
        proc.wait(10)


def _serf_children(pid):
    from cluster_helpers import _children
    return [c for c in _children(pid) if Path(f"/proc/{c}/comm").exists() and Path(f"/proc/{c}/comm").read_text().strip() == "serf"]


def _gone(pid):
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z")
    except OSError:
        return True


def test_the_child_agent_dies_with_its_parent_even_by_kill_9(key_file):
    code = ("import sys, time\nfrom sllmd.cluster.serf_agent import SerfAgent, free_port\n"
            f"a = SerfAgent('orphan', f'127.0.0.1:{{free_port()}}', {load_cluster_key(key_file)!r}, {{}}, "
            "profile='local')\na.start()\nprint(a.pid, flush=True)\ntime.sleep(120)\n")
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        agent_pid = int(parent.stdout.readline())
        assert not _gone(agent_pid)
        parent.kill()
        parent.wait(10)
        wait_for(lambda: _gone(agent_pid), timeout=10, what="the agent to die with its parent")
    finally:
        parent.kill()
        parent.wait(10)


def test_sllmd_runs_its_agent_restarts_it_and_takes_it_down_when_killed(tmp_path, key_file):
    pytest.importorskip("sllmd.cluster.curve_keys")   # the peer layer sllmd's cluster start needs
    from daemon_helpers import DaemonProcess
    root = tmp_path / "n"
    root.mkdir()
    node = DaemonProcess(root, "--node-name", "solo", "--peer-listen", f"tcp://127.0.0.1:{free_port()}",
                         "--gossip-listen", f"127.0.0.1:{free_port()}", "--cluster-key", str(key_file),
                         "--serf-profile", "local", "--state-dir", str(root / "state"))
    node.start()
    try:
        wait_for(lambda: len(_serf_children(node.proc.pid)) == 1, what="sllmd's serf child")
        first = _serf_children(node.proc.pid)[0]
        os.kill(first, signal.SIGKILL)
        wait_for(lambda: [p for p in _serf_children(node.proc.pid) if p != first], what="the agent restarted")
        second = [p for p in _serf_children(node.proc.pid) if p != first][0]
        node.proc.send_signal(signal.SIGKILL)
        node.proc.wait(10)
        wait_for(lambda: _gone(second), timeout=10, what="the agent to die with sllmd")
    finally:
        for pid in _serf_children(node.proc.pid) if node.proc.poll() is None else []:
            os.kill(pid, signal.SIGKILL)
        node.close()
