"""Runs a real `sllmd` process on a temporary socket and store, for the daemon tests.

Readiness comes from the daemon itself: the helper is the daemon's systemd,
listening on a NOTIFY_SOCKET for READY=1, so every start also checks sd_notify.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from sllmd.errors import ModelNotFoundError

REPO = Path(__file__).resolve().parent.parent


def short_tempdir(prefix: str = "sllm-test-") -> Path:
    """A directory whose socket paths fit in sun_path (pytest's tmp_path can be too long)."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


class DaemonProcess:
    def __init__(self, root: Path, *args: str, env: dict | None = None, dram: str | None = "64MiB",
                 device_memory: str | None = "512MiB"):
        """dram / device_memory None: the daemon's own defaults."""
        self.root = Path(root)
        self.socket = str(self.root / "sllmd.sock")
        self.store = self.root / "store"
        self.log_path = self.root / "sllmd.log"
        sizes = (["--dram", dram] if dram is not None else []) + \
            (["--device-memory", device_memory] if device_memory is not None else [])
        self.args = ["--config", "/dev/null", "--socket", self.socket, "--store", str(self.store), *sizes,
                     "--device", "cpu", "--log-level", "debug", "--heartbeat", "0.2", *args]
        self.env = dict(os.environ, **(env or {}))
        for key in list(self.env):
            if key.startswith("SLLMD_") and key not in (env or {}):
                del self.env[key]
        self.proc: subprocess.Popen | None = None
        self.notifications: list[str] = []
        self._notify: socket.socket | None = None

    def start(self, timeout: float = 120.0, expect_ready: bool = True) -> "DaemonProcess":
        notify_path = str(self.root / f"notify-{time.monotonic_ns()}")
        self._notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._notify.bind(notify_path)
        self._notify.settimeout(0.1)
        env = dict(self.env, NOTIFY_SOCKET=notify_path)
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "sllmd", *self.args], env=env, cwd=str(self.root),
                                     stdout=self._log, stderr=subprocess.STDOUT)
        if not expect_ready:
            return self
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.wait_notification("READY=1", 0.2):
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"sllmd exited with {self.proc.returncode} before it was ready:\n{self.log()}")
        self.kill()
        raise RuntimeError(f"sllmd was not ready within {timeout}s:\n{self.log()}")

    def wait_notification(self, text: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            if any(text in n for n in self.notifications):
                return True
            if time.monotonic() >= deadline:
                return False
            try:
                self.notifications.append(self._notify.recv(4096).decode())
            except (TimeoutError, socket.timeout):
                pass

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def close(self) -> None:
        try:
            self.stop()
        finally:
            if self._notify is not None:
                self._notify.close()
            if getattr(self, "_log", None):
                self._log.close()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def __enter__(self) -> "DaemonProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


def sllmctl(*args: str, socket_path: str | None = None, timeout: float = 120.0, env: dict | None = None,
            input: str | None = None) -> subprocess.CompletedProcess:
    """Runs the real sllmctl (python -m sllmctl) and captures its output."""
    full_env = dict(os.environ, **(env or {}))
    cmd = [sys.executable, "-m", "sllmctl", *args]
    if socket_path is not None:
        cmd += ["--socket", socket_path]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env, input=input)


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


class ScriptedNode:
    """Follows the Node interface; infer echoes the prompt's words, one token per `token_delay`."""

    def __init__(self, name: str = "echo"):
        self.names = {name}
        self.token_delay = 0.0
        self.load_delay = 0.0
        self.load_error: Exception | None = None
        self.streams_closed_early: list[str] = []
        self.streams_finished: list[str] = []
        self.pinned: set[str] = set()
        self.status_error: Exception | None = None
        self.models_result = None
        self._lock = threading.Lock()

    def _need(self, name):
        if name not in self.names:
            raise ModelNotFoundError(f"no model named {name!r}")

    def status(self):
        if self.status_error:
            raise self.status_error
        return {"uptime_s": 1.0, "tiers": {"ssd": {"used_bytes": 10, "capacity_bytes": None, "models": 1}}}

    def models(self):
        if self.models_result is not None:
            return self.models_result
        return [{"name": n, "size_bytes": 10, "tiers": ["ssd"], "state": "on_ssd", "pinned": n in self.pinned,
                 "last_used": 0.0} for n in sorted(self.names)]

    def ps(self):
        return []

    def load(self, name, keep_alive=None):
        self._need(name)
        if self.load_error is not None:
            raise self.load_error
        time.sleep(self.load_delay)
        return {"name": name, "tiers": ["ssd", "device"], "state": "loaded", "keep_alive": keep_alive}

    def evict(self, name, tier="device", force=False):
        self._need(name)
        return {"name": name, "tier": tier, "evicted": [tier]}

    def remove(self, name, force=False):
        self._need(name)
        self.names.discard(name)
        return {"name": name, "tier": "ssd", "evicted": ["ssd"]}

    def pin(self, name):
        self._need(name)
        self.pinned.add(name)

    def unpin(self, name):
        self._need(name)
        self.pinned.discard(name)

    def import_model(self, name, source, progress=None, notify=None, cancelled=None, no_tokenizer=False):
        for done in range(0, 101, 10):
            if progress:
                progress(done, 100)
            time.sleep(0.01)
        self.names.add(name)
        return {"name": name, "source": source, "tiers": ["ssd"]}

    def infer(self, req, cancelled=None):
        if not isinstance(req, dict):   # an InferRequest, as the server hands it over
            req = {"model": req.model, "prompt": req.prompt, "max_tokens": req.sampling.max_tokens}
        self._need(req["model"])
        return self._tokens(req)

    def _tokens(self, req):
        words = (req.get("prompt") or "").split()
        n = req.get("max_tokens", len(words))
        finished = False
        try:
            for i in range(n):
                time.sleep(self.token_delay)
                yield {"type": "token", "text": words[i % len(words)] + " ", "token_id": i}
            yield {"type": "done", "stats": {"tokens": n, "model": req["model"]}}
            finished = True
        finally:
            with self._lock:
                (self.streams_finished if finished else self.streams_closed_early).append(req.get("prompt"))

    def wait_closed_early(self, count=1, timeout=5.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(self.streams_closed_early) >= count:
                return True
            time.sleep(0.02)
        return False
