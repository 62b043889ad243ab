"""Where the TUI's data comes from: the daemon's `watch` stream, read in a thread.

`Client.watch()` is a blocking iterator of pushed updates (the TUI never polls
`status`). WatchSource runs it in a Textual thread worker and posts one
`WatchUpdate` message per update (with a host sample taken beside it) to the app;
when the daemon cannot be reached, or goes away, it posts `DaemonUnreachable` and
tries again with a growing pause, so the screen says "daemon unreachable,
retrying" and carries on once the daemon is back.
"""
from __future__ import annotations

import logging
import threading
from typing import Callable

from textual.message import Message

from sllmd.client import Client
from sllmd.errors import SllmError

log = logging.getLogger(__name__)

RETRY_S = (0.5, 1.0, 2.0)   # pauses between reconnects; the last repeats


class WatchUpdate(Message):
    """One pushed update from the daemon and a sample of this host taken with it."""

    def __init__(self, update: dict, host: dict | None):
        super().__init__()
        self.update, self.host = update, host


class DaemonUnreachable(Message):
    def __init__(self, reason: str, attempt: int):
        super().__init__()
        self.reason, self.attempt = reason, attempt


class WatchSource:
    """Reads `watch` updates until stopped; `post(message)` is called from the reading thread.
    cluster: every node's rows and the node list (a daemon without a cluster sends its own)."""

    def __init__(self, post: Callable[[Message], object], socket: str | None = None, timeout: float = 30.0,
                 interval_s: float = 0.5, cluster: bool = True, probe=None):
        self.post = post
        self.socket, self.timeout, self.interval_s, self.cluster = socket, timeout, interval_s, cluster
        self.probe = probe
        self._stop = threading.Event()

    def stop(self) -> None:
        self._stop.set()

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    def run(self) -> None:
        attempt = 0
        while not self._stop.is_set():
            try:
                with Client(self.socket, timeout=self.timeout, client_name="sllmtui") as client:
                    updates = client.watch(interval_s=self.interval_s, cluster=self.cluster)
                    try:
                        for update in updates:
                            attempt = 0
                            self.post(WatchUpdate(update, self._host(update)))
                            if self._stop.is_set():
                                return
                    finally:
                        updates.close()   # cancels the watch in the daemon
                reason = "the daemon ended the watch"
            except SllmError as e:
                reason = str(e)
            except Exception as e:   # never a traceback on the screen: say it and try again
                log.debug("watch failed", exc_info=True)
                reason = f"{type(e).__name__}: {e}"
            if self._stop.is_set():
                return
            attempt += 1
            self.post(DaemonUnreachable(reason, attempt))
            self._stop.wait(RETRY_S[min(attempt, len(RETRY_S)) - 1])

    def _host(self, update: dict) -> dict | None:
        if self.probe is None:
            return None
        try:
            tiers = ((update.get("snapshot") or {}).get("status") or {}).get("tiers") or {}
            return self.probe.sample((tiers.get("ssd") or {}).get("root"))
        except Exception:
            log.debug("host sample failed", exc_info=True)
            return None


def first_updates(socket: str | None, timeout: float, interval_s: float, count: int = 2,
                  cluster: bool = True) -> list[dict]:
    """The first `count` updates of a watch (for --once: two give the rates between them)."""
    out: list[dict] = []
    with Client(socket, timeout=timeout, client_name="sllmtui --once") as client:
        updates = client.watch(interval_s=interval_s, cluster=cluster)
        try:
            for update in updates:
                out.append(update)
                if len(out) >= count:
                    break
        finally:
            updates.close()
    return out
