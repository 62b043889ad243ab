"""sllmd's own Serf agent: a child `serf agent` process, its RPC on loopback behind a random token.

The token reaches the agent through a 0600 config file (Serf 0.8 takes rpc_auth only from a
config file), never the command line, so other users cannot read it from ps.
"""
from __future__ import annotations

import ctypes
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time

from sllmd.errors import ConfigError

log = logging.getLogger(__name__)


def _die_with_parent() -> None:
    """In the child before exec: the kernel sends SIGTERM when sllmd dies, even by kill -9 (Linux)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)   # PR_SET_PDEATHSIG
    except OSError:
        pass


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class SerfAgent:
    def __init__(self, node_name, bind, encrypt_key, tags: dict[str, str], profile="lan", log_dir=None):
        self.serf = shutil.which("serf")
        if self.serf is None:
            raise ConfigError("serf is not installed (apt-get install serf, or make setup); the cluster needs it")
        self.node_name, self.bind, self.encrypt_key = node_name, bind, encrypt_key
        self.tags, self.profile, self.log_dir = dict(tags), profile, log_dir
        self.rpc_address = f"127.0.0.1:{free_port()}"
        self.rpc_auth = secrets.token_hex(16)
        self._dir = tempfile.mkdtemp(prefix="sllmd-serf-")
        self._proc: subprocess.Popen | None = None
        self.starts = 0

    def _command(self) -> list[str]:
        conf = os.path.join(self._dir, "agent.json")
        fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"rpc_auth": self.rpc_auth, "encrypt_key": self.encrypt_key, "tags": self.tags}, f)
        return [self.serf, "agent", f"-node={self.node_name}", f"-bind={self.bind}",
                f"-rpc-addr={self.rpc_address}", f"-profile={self.profile}", f"-config-file={conf}",
                "-log-level=warn"]

    def start(self, wait_s: float = 10.0) -> None:
        """Starts the agent and waits until its RPC port answers."""
        out = subprocess.DEVNULL
        if self.log_dir is not None:
            os.makedirs(self.log_dir, exist_ok=True)
            out = open(os.path.join(self.log_dir, f"serf-{self.node_name}.log"), "ab")
        self._proc = subprocess.Popen(self._command(), stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                      start_new_session=True, preexec_fn=_die_with_parent)
        if out is not subprocess.DEVNULL:
            out.close()
        self.starts += 1
        host, _, port = self.rpc_address.rpartition(":")
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise ConfigError(f"serf agent exited with status {self._proc.returncode} at start "
                                  f"(bind {self.bind}: is the port taken?)")
            try:
                socket.create_connection((host, int(port)), timeout=0.2).close()
                log.info("serf agent %s started (pid %d, gossip %s)", self.node_name, self._proc.pid, self.bind)
                return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise ConfigError(f"serf agent did not open its RPC port within {wait_s:g} s")

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def stop(self, timeout=5.0) -> None:
        """Interrupts the agent (Serf leaves gracefully on SIGINT), kills it if it lingers."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(2)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(self._dir, ignore_errors=True)

    def restart(self) -> None:
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        self._proc = None
        os.makedirs(self._dir, exist_ok=True)
        self.start()
