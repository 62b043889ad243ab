"""The slow parts of an import: copying our checkpoints, and conversions, run in a child process.

Converting a GGUF file dequantizes every tensor and builds a transformers
model: tens of seconds of CPU, under the process-wide model-construction lock
and the GIL. In the daemon that would stall every other load, so an import
runs `python -m sllmd.tiers.importer` instead and talks to it over a pipe:

    parent ──job (JSON on stdin)──► child: sllmd.store.convert(source, dest)
    parent ◄──one JSON object per line on the child's stdout── phases, bytes written, log records, the outcome

The child writes only under `dest` (inside the store's staging directory);
publishing stays with the parent. Cancelling kills the child's whole process
group (there is nothing for it to finish: the parent deletes what it wrote),
and the child dies with the parent (PR_SET_PDEATHSIG), so a crashed daemon
leaves no converter running.
"""
from __future__ import annotations

import json
import logging
import os
import selectors
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import CancelledError, ConversionError, SllmError, error_reply_fields, exception_from_reply
from ..store.format import MAGIC, MANIFEST_FILE
from ..store.writer import fsync_dir

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]  # (bytes written, bytes total)
Notify = Callable[[str, dict], None]  # (event name, data): "phase", "evicted"
POLL_S = 0.25  # how often the parent checks for cancellation while the child is quiet
TICK_S = 1.0  # a phase is re-announced (with its elapsed time) at least this often


@dataclass
class PhaseClock:
    """The current phase of an import, and when it started (for the elapsed times users see)."""

    started: float
    phase: str = "starting"
    phase_started: float = 0.0
    done: int = 0
    total: int = 0
    unit: str = ""
    last_sent: float = 0.0

    def update(self, phase: str, done: int = 0, total: int = 0, unit: str = "") -> bool:
        """Records a report; True when the phase changed."""
        now = time.monotonic()
        changed = phase != self.phase
        if changed:
            self.phase, self.phase_started = phase, now
        self.done, self.total, self.unit = done, total, unit
        return changed

    def event(self) -> dict:
        now = time.monotonic()
        return {"phase": self.phase, "done": self.done, "total": self.total, "unit": self.unit,
                "phase_elapsed_s": round(now - (self.phase_started or self.started), 1),
                "elapsed_s": round(now - self.started, 1)}


def is_our_checkpoint(source: Path) -> bool:
    try:
        return source.is_dir() and json.loads((source / MANIFEST_FILE).read_text()).get("magic") == MAGIC
    except (OSError, ValueError, AttributeError):
        return False


def copy_checkpoint(source: Path, dest: Path, progress: Progress | None = None,
                    cancelled: Callable[[], bool] | None = None) -> None:
    """Copies a checkpoint directory file by file (fsync'd), manifest last; stops with
    CancelledError between blocks once cancelled() is true."""
    files = sorted((p for p in source.rglob("*") if p.is_file()), key=lambda p: p.name == MANIFEST_FILE)
    total = sum(p.stat().st_size for p in files)
    done = 0
    dest.mkdir(parents=True)
    for src in files:
        dst = dest / src.relative_to(source)
        dst.parent.mkdir(parents=True, exist_ok=True)
        with open(src, "rb") as fi, open(dst, "wb") as fo:
            while True:
                if cancelled is not None and cancelled():
                    raise CancelledError("the import was cancelled")
                block = fi.read(16 << 20)
                if not block:
                    break
                fo.write(block)
                done += len(block)
                if progress:
                    progress(done, total)
            fo.flush()
            os.fsync(fo.fileno())
    for d in {dest} | {(dest / p.relative_to(source)).parent for p in files}:
        fsync_dir(d)


class ImportJob:
    """An import in flight: listed by `models` as `importing`, cancelled by `rm` or shutdown."""

    def __init__(self, name: str, source: str):
        self.name, self.source = name, source
        self.started_at = time.time()
        self.clock = PhaseClock(time.monotonic())
        self.cancel = threading.Event()
        self.finished = threading.Event()

    def describe(self) -> str:
        """E.g. "dequantizing 120/272 tensors, 14 s so far"."""
        c = self.clock
        counted = f" {c.done}/{c.total} {c.unit}" if c.total and c.unit and c.unit != "bytes" else ""
        pct = f" {100 * c.done // c.total}%" if c.total and c.unit == "bytes" else ""
        return f"{c.phase}{counted}{pct}, {time.monotonic() - c.started:.0f} s so far"

    def to_dict(self) -> dict:
        return {"name": self.name, "source": self.source, "started_at": self.started_at, **self.clock.event()}


def convert_in_child(source: str | os.PathLike, dest: str | os.PathLike, *, progress: Progress | None = None,
                     notify: Notify | None = None, cancelled: Callable[[], bool] = lambda: False,
                     clock: PhaseClock | None = None, dtype: str | None = None) -> None:
    """Runs sllmd.store.convert(source, dest) in a child process; raises what it raised there
    (same class, same message), or CancelledError once `cancelled()` turns true (the child is
    killed first). Phase reports go to `notify("phase", ...)`, bytes written to `progress`."""
    clock = clock or PhaseClock(time.monotonic())
    job = {"source": os.fspath(source), "dest": os.fspath(dest), "dtype": dtype,
           "log_level": logging.getLogger("sllmd").getEffectiveLevel()}
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", HF_HUB_DISABLE_PROGRESS_BARS="1",
               TOKENIZERS_PARALLELISM="false")
    proc = subprocess.Popen([sys.executable, "-m", "sllmd.tiers.importer"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, env=env, start_new_session=True, close_fds=True)
    log.debug("conversion of %s runs in process %d", source, proc.pid)
    outcome: dict | None = None
    try:
        proc.stdin.write(json.dumps(job).encode())
        proc.stdin.close()
        outcome = _follow(proc, clock, progress, notify, cancelled)
    finally:
        if proc.poll() is None:
            _kill(proc)
        proc.stdout.close()
    if outcome is None:
        how = f"signal {-proc.returncode}" if proc.returncode < 0 else f"exit status {proc.returncode}"
        hint = " (out of memory?)" if proc.returncode == -signal.SIGKILL else ""
        raise ConversionError(f"converting {source} failed: the conversion process ended with {how}{hint}")
    if outcome.get("t") == "error":
        raise exception_from_reply(outcome.get("code", "internal_error"), outcome.get("message", ""),
                                   int(outcome.get("exit_code", 1)))


def _follow(proc: subprocess.Popen, clock: PhaseClock, progress: Progress | None, notify: Notify | None,
            cancelled: Callable[[], bool]) -> dict | None:
    """Relays the child's reports until it ends; its last word ("done"/"error"), or None."""
    fd = proc.stdout.fileno()
    buf = b""
    outcome = None
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        while True:
            if cancelled():
                raise CancelledError("the import was cancelled")
            chunk = os.read(fd, 65536) if sel.select(POLL_S) else None
            if chunk == b"":
                break
            if chunk:
                buf += chunk
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    outcome = _relay(line, clock, progress, notify) or outcome
            if time.monotonic() - clock.last_sent >= TICK_S:
                _announce(notify, clock)
    proc.wait()
    return outcome


def _relay(line: bytes, clock: PhaseClock, progress: Progress | None, notify: Notify | None) -> dict | None:
    try:
        msg = json.loads(line)
        kind = msg["t"]
    except (ValueError, KeyError, TypeError):
        log.warning("conversion process said something unexpected: %r", line[:200])
        return None
    if kind == "phase":
        changed = clock.update(str(msg.get("phase")), int(msg.get("done", 0)), int(msg.get("total", 0)),
                               str(msg.get("unit", "")))
        if changed or clock.done == clock.total or time.monotonic() - clock.last_sent >= 0.2:
            _announce(notify, clock)
    elif kind == "progress":
        done, total = int(msg.get("done", 0)), int(msg.get("total", 0))
        if clock.update("writing", done, total, "bytes"):
            _announce(notify, clock)
        if progress is not None:
            progress(done, total)
    elif kind == "log":
        log.log(int(msg.get("level", logging.INFO)), "conversion: %s", msg.get("msg", ""))
    elif kind in ("done", "error"):
        return msg
    return None


def _announce(notify: Notify | None, clock: PhaseClock) -> None:
    clock.last_sent = time.monotonic()
    if notify is not None:
        notify("phase", clock.event())


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # its own session: the converter and anything it started
    except ProcessLookupError:
        pass
    proc.wait()
    log.info("conversion process %d stopped", proc.pid)


# --- the child --------------------------------------------------------------------------------------
class _Channel:
    """The child's side of the pipe: one JSON object per line on the original stdout."""

    def __init__(self):
        self._out = os.fdopen(os.dup(1), "w", buffering=1)
        os.dup2(2, 1)  # whatever a library prints goes to stderr, never into the protocol
        sys.stdout = sys.stderr
        self._last_progress = 0.0

    def send(self, **msg) -> None:
        self._out.write(json.dumps(msg) + "\n")

    def progress(self, done: int, total: int) -> None:
        now = time.monotonic()
        if done >= total or now - self._last_progress >= 0.1:
            self._last_progress = now
            self.send(t="progress", done=int(done), total=int(total))

    def phase(self, phase: str, done: int = 0, total: int = 0, unit: str = "") -> None:
        self.send(t="phase", phase=phase, done=int(done), total=int(total), unit=unit)


class _LogRelay(logging.Handler):
    def __init__(self, channel: _Channel):
        super().__init__()
        self.channel = channel

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.channel.send(t="log", level=record.levelno, msg=record.getMessage())
        except Exception:
            pass


def _die_with_parent() -> None:
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def child_main() -> int:
    parent = os.getppid()
    _die_with_parent()
    if os.getppid() != parent:  # the parent died before the death signal was armed
        return 1
    channel = _Channel()
    job = json.loads(sys.stdin.read())
    root = logging.getLogger("sllmd")
    root.setLevel(int(job.get("log_level", logging.INFO)))
    root.addHandler(_LogRelay(channel))
    root.propagate = False
    try:
        channel.phase("reading")
        from ..store.convert import convert
        convert(Path(job["source"]), Path(job["dest"]), dtype=job.get("dtype"), progress=channel.progress,
                on_phase=channel.phase)
    except SllmError as e:
        channel.send(t="error", **error_reply_fields(e))
        return 1
    except BaseException as e:  # noqa: BLE001 - the parent must hear why, whatever it was
        fields = error_reply_fields(ConversionError(f"converting {job['source']} failed: {type(e).__name__}: {e}"))
        channel.send(t="error", **fields)
        return 1
    channel.send(t="done")
    return 0


if __name__ == "__main__":
    sys.exit(child_main())
