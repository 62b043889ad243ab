"""How sllmctl prints: one byte formatter, one table printer, one progress renderer, JSON.

Results go to stdout; progress and notes go to stderr, so `sllmctl ... > file`
and `--json | jq` see only the result.
"""
from __future__ import annotations

import json
import sys
import time
from typing import Any, Iterable, TextIO


def fmt_bytes(n: float | None) -> str:
    """1536 -> '1.5 KiB'; None -> '-'."""
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def fmt_count(n: int | None) -> str:
    """134515008 -> '134.5 M' (parameters, elements)."""
    if n is None:
        return "-"
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return str(n)


def fmt_span(seconds: float) -> str:
    seconds = int(max(0, seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


def fmt_ago(ts: float | None, now: float) -> str:
    return "never" if not ts else f"{fmt_span(now - ts)} ago"


def fmt_until(ts: float | None, now: float) -> str:
    if ts is None:
        return "forever"
    return "now" if ts <= now else f"in {fmt_span(ts - now)}"


def table(headers: list[str] | None, rows: Iterable[list[str]], indent: str = "") -> str:
    """Left-aligned columns two spaces apart; `headers` None prints only the rows."""
    rows = [list(map(str, r)) for r in rows]
    lines = ([headers] if headers else []) + rows
    if not lines:
        return ""
    widths = [max(len(line[i]) for line in lines if i < len(line)) for i in range(max(map(len, lines)))]
    return "\n".join(indent + "  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines)


def print_table(headers: list[str] | None, rows: Iterable[list[str]], out: TextIO | None = None,
                indent: str = "") -> None:
    text = table(headers, rows, indent)
    if text:
        (out or sys.stdout).write(text + "\n")


def print_json(data: Any, out: TextIO | None = None) -> None:
    out = out or sys.stdout
    json.dump(data, out, indent=2, default=str)
    out.write("\n")


class Progress:
    """Byte progress on stderr: one live line on a terminal (at most 10 updates a second), a line
    per `steps`-th of the way otherwise (logs stay short). Call it with (done, total); end() once."""

    def __init__(self, label: str, stream: TextIO | None = None, steps: int = 10):
        self.label, self.stream, self.steps = label, stream or sys.stderr, steps
        self.tty = self.stream.isatty()
        self.started = time.monotonic()
        self._last_t, self._last_step, self._shown = 0.0, -1, False

    def __call__(self, done: int, total: int) -> None:
        frac = min(1.0, done / total) if total else 1.0
        text = f"{self.label}: {frac:4.0%} ({fmt_bytes(done)} of {fmt_bytes(total)})"
        if self.tty:
            now = time.monotonic()
            if now - self._last_t < 0.1 and done < total:
                return
            self._last_t = now
            self.stream.write("\r" + text + "\x1b[K")
        else:
            step = int(frac * self.steps)
            if step == self._last_step:
                return
            self._last_step = step
            self.stream.write(text + "\n")
        self._shown = True
        self.stream.flush()

    def note(self, text: str) -> None:
        """A line of its own (e.g. a phase or an eviction) without breaking the live line."""
        if self.tty and self._shown:
            self.stream.write("\n")
            self._last_t = 0.0
        self.stream.write(text + "\n")
        self.stream.flush()

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def end(self, summary: str | None = None) -> None:
        if self.tty and self._shown:
            self.stream.write("\n")
        if summary:
            self.stream.write(summary + "\n")
        self.stream.flush()
        self._shown = False
