"""Keep-alive expiry and eviction choice as pure functions (DESIGN.md sections 4
and 10): no clocks, no locks, no I/O; the tiers feed them numbers and act on
the answer. Table tests live in tests/test_policy.py.

keep_alive follows Ollama: after a request (or a load) finishes, the instance
stays for keep_alive seconds; negative = forever, 0 = unload once idle. The
last finished request sets the deadline.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence


def keep_alive_or_default(requested: float | None, default: float) -> float:
    """The keep_alive a request asked for, else the daemon's default."""
    if requested is None:
        return float(default)
    value = float(requested)
    if math.isnan(value):
        raise ValueError("keep_alive is NaN")
    return value


def expires_at(keep_alive_s: float, finished_at: float) -> float | None:
    """When an instance idle since `finished_at` expires; None = never."""
    if keep_alive_s < 0 or math.isinf(keep_alive_s):
        return None
    return finished_at + keep_alive_s


def is_expired(deadline: float | None, now: float, busy: bool) -> bool:
    """An instance that serves or has queued requests never expires."""
    return not busy and deadline is not None and now >= deadline


def expired(instances: Iterable[tuple[str, float | None, bool]], now: float) -> list[str]:
    """Names of (name, deadline, busy) entries whose keep_alive ran out, earliest deadline first."""
    due = [(deadline, name) for name, deadline, busy in instances if is_expired(deadline, now, busy)]
    return [name for _, name in sorted(due)]


def next_wakeup(deadlines: Iterable[float | None], now: float, ceiling: float) -> float:
    """Seconds until the earliest deadline, within [0, ceiling]."""
    soonest = min((d for d in deadlines if d is not None), default=None)
    if soonest is None:
        return ceiling
    return max(0.0, min(ceiling, soonest - now))


@dataclass(frozen=True)
class Candidate:
    """Something a tier could evict."""

    name: str
    nbytes: int
    last_used: float
    pinned: bool = False
    busy: bool = False  # serving, queued, loading, or otherwise referenced: never evicted


def evictable(candidates: Iterable[Candidate], exclude: Iterable[str] = ()) -> list[Candidate]:
    """Unpinned, idle candidates, least recently used first (ties by name, for determinism)."""
    skip = set(exclude)
    return sorted((c for c in candidates if not c.pinned and not c.busy and c.name not in skip),
                  key=lambda c: (c.last_used, c.name))


def choose_victims(candidates: Sequence[Candidate], need_bytes: int, free_bytes: int,
                   exclude: Iterable[str] = ()) -> list[str] | None:
    """The least recently used evictable candidates whose bytes, with `free_bytes`,
    make room for `need_bytes`; [] when it already fits; None when even evicting
    every evictable candidate would not make room (then nothing should be evicted)."""
    if need_bytes <= free_bytes:
        return []
    victims, room = [], free_bytes
    for c in evictable(candidates, exclude):
        victims.append(c.name)
        room += c.nbytes
        if room >= need_bytes:
            return victims
    return None


def chunks_needed(partition_bytes: Iterable[int], chunk_size: int) -> int:
    """Pool chunks a checkpoint occupies: each partition starts on a fresh chunk."""
    if chunk_size <= 0:
        raise ValueError("chunk_size must be positive")
    return sum(-(-n // chunk_size) for n in partition_bytes)
