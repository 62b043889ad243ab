"""A real sllmd started as a node of a cluster on loopback (its own Serf agent, peer socket, ports)."""
from __future__ import annotations

import base64
import os
import signal
import socket
from pathlib import Path

from daemon_helpers import DaemonProcess, sllmctl
from sllmd.client import Client


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


class ClusterNode(DaemonProcess):
    def __init__(self, root: Path, name: str, key: Path, join: str | None, *extra: str, **sizes):
        self.name = name
        root.mkdir(parents=True, exist_ok=True)
        self.gossip = f"127.0.0.1:{free_port()}"
        self.peer = f"tcp://127.0.0.1:{free_port()}"
        args = ["--node-name", name, "--peer-listen", self.peer, "--gossip-listen", self.gossip,
                "--cluster-key", str(key), "--serf-profile", "local", "--state-dir", str(root / "state")]
        if join:
            args += ["--join", join]
        super().__init__(root, *args, *extra, **sizes)
        self.child_pids: list[int] = []

    def client(self) -> Client:
        return Client(self.socket, timeout=120.0)

    def ctl(self, *args: str):
        return sllmctl(*args, socket_path=self.socket)

    def kill9(self) -> None:
        self.child_pids = _children(self.proc.pid)
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def reap_children(self) -> None:
        """A child agent that outlived a kill -9 (it must not: the test fails first) is not left behind."""
        for pid in self.child_pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def write_cluster_key(path: Path) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(base64.b64encode(os.urandom(32)).decode() + "\n")


def start_all(nodes) -> None:
    """Starts the nodes in parallel (start-up dominates a cluster test's time)."""
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(len(nodes)) as pool:
        list(pool.map(lambda n: n.start(), nodes))


def close_all(nodes) -> None:
    """Stops every node (killing one that does not stop) and anything a kill -9 left behind."""
    for n in nodes:
        try:
            n.close()
        except Exception:
            n.kill()
        n.reap_children()


# Benchmarks' nodes: instances stay loaded, the daemon's own debug log stays out of the timings.
BENCH_FLAGS = ("--keep-alive", "-1", "--log-level", "info", "--heartbeat", "1")


def make_nodes(root: Path, names: list[str], *extra: str, **sizes) -> list[ClusterNode]:
    """Nodes sharing one new cluster key under `root`: the first starts the cluster, the others
    join it (not started yet: start_all)."""
    key = root / "cluster.key"
    write_cluster_key(key)
    first = ClusterNode(root / names[0].lower(), names[0], key, None, *extra, **sizes)
    return [first] + [ClusterNode(root / n.lower(), n, key, first.gossip, *extra, **sizes) for n in names[1:]]


class BackgroundStream:
    """A request streamed from node `at` on a thread of its own, every event kept in `events`;
    `started` is set once `after` events arrived. join() waits for the end (the thread gone)."""

    def __init__(self, at, model: str, prompt: str, *, after: int = 50, **infer_kw):
        import threading
        self.events: list[dict] = []
        self.started = threading.Event()

        def consume():
            with at.client() as c, c.infer(model, prompt, **infer_kw) as s:
                for ev in s.events():
                    self.events.append(ev)
                    if len(self.events) == after:
                        self.started.set()
        self._thread = threading.Thread(target=consume)
        self._thread.start()

    def join(self, timeout: float = 120.0) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()
