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
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def short_tempdir(prefix: str = "sllm-test-") -> Path:
    """A directory whose socket paths fit in sun_path (pytest's tmp_path can be too long)."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


class DaemonProcess:
    def __init__(self, root: Path, *args: str, env: dict | None = None, dram: str = "64MiB",
                 device_memory: str = "512MiB"):
        self.root = Path(root)
        self.socket = str(self.root / "sllmd.sock")
        self.store = self.root / "store"
        self.log_path = self.root / "sllmd.log"
        self.args = ["--socket", self.socket, "--store", str(self.store), "--dram", dram,
                     "--device-memory", device_memory, "--device", "cpu", "--log-level", "debug",
                     "--heartbeat", "0.2", *args]
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
