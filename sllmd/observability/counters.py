"""NodeStats: the node's own counters, kept where things happen, read at scrape time.

Counted in the node (and the cluster code), not in a front end, so a figure is true whichever
front end caused it: the IPC socket, HTTP, or a peer's forwarded request. A forwarded request
is counted once, where it ran: the node that ran it counts it in `requests` (its outcome,
tokens, time to first token); the node that placed it on a peer only counts it in `forwarded`.
A migrated request is counted on its source with outcome `migrated` (the tokens it streamed
there, its time to first token) and again where it finished (its outcome there, the tokens
streamed there and its prompt tokens), so tokens add up once across the cluster.

Labels stay bounded: a model label is a model of this node's store (a request for any other
name is counted under UNKNOWN_MODEL, which no model name can be: names start with a letter or
digit), an outcome is `ok`, `migrated` or an error code from sllmd/errors.py's table.

One lock guards everything; each update is a few dict operations, and snapshot() copies.
"""
from __future__ import annotations

import bisect
import threading
from typing import Iterable

UNKNOWN_MODEL = "_unknown"

# Time to first token (a cold load included) and load time, in seconds.
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
LOAD_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class Buckets:
    """One histogram's counts per upper bound (not cumulative), their sum and count."""

    __slots__ = ("bounds", "counts", "sum", "count")

    def __init__(self, bounds: tuple[float, ...]):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)   # the last one: above every bound (+Inf)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def cumulative(self) -> list[tuple[str, int]]:
        """[(le, count of observations <= le)], +Inf last: HistogramMetricFamily's buckets."""
        out, total = [], 0
        for bound, n in zip(list(self.bounds) + [float("inf")], self.counts):
            total += n
            out.append(("+Inf" if bound == float("inf") else repr(float(bound)), total))
        return out

    def copy(self) -> "Buckets":
        b = Buckets(self.bounds)
        b.counts, b.sum, b.count = list(self.counts), self.sum, self.count
        return b


def outcome_of(error: BaseException) -> str:
    """A request's outcome label for the error it ended with."""
    if isinstance(error, GeneratorExit):   # its consumer closed the stream: the client went away or cancelled
        return "cancelled"
    code = getattr(error, "code", None)
    return code if isinstance(code, str) and code else "internal"


class NodeStats:
    def __init__(self):
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, str], int] = {}            # (model, outcome)
        self.prompt_tokens: dict[str, int] = {}                   # model
        self.generation_tokens: dict[str, int] = {}               # model
        self.ttft: dict[tuple[str, str], Buckets] = {}            # (model, load_tier)
        self.load_seconds: dict[str, Buckets] = {}                # tier the bytes came from
        self.load_bytes: dict[str, int] = {}                      # tier -> checkpoint bytes put on the device
        self.evictions: dict[tuple[str, str], int] = {}           # (tier, reason)
        self.migrations: dict[str, int] = {}                      # outcome
        self.forwarded = 0                                        # requests this node placed on a peer

    # --- updates (any thread) ----------------------------------------------------------------
    def request_ended(self, model: str, outcome: str, *, prompt_tokens: int = 0, generation_tokens: int = 0,
                      ttft_s: float | None = None, load_tier: str | None = None) -> None:
        with self._lock:
            key = (model, outcome)
            self.requests[key] = self.requests.get(key, 0) + 1
            if prompt_tokens:
                self.prompt_tokens[model] = self.prompt_tokens.get(model, 0) + int(prompt_tokens)
            if generation_tokens:
                self.generation_tokens[model] = self.generation_tokens.get(model, 0) + int(generation_tokens)
            if ttft_s is not None and ttft_s >= 0 and load_tier:
                b = self.ttft.get((model, load_tier))
                if b is None:
                    b = self.ttft[(model, load_tier)] = Buckets(TTFT_BUCKETS)
                b.observe(float(ttft_s))

    def load_finished(self, tier: str, seconds: float, nbytes: int) -> None:
        with self._lock:
            b = self.load_seconds.get(tier)
            if b is None:
                b = self.load_seconds[tier] = Buckets(LOAD_BUCKETS)
            b.observe(float(seconds))
            self.load_bytes[tier] = self.load_bytes.get(tier, 0) + int(nbytes)

    def eviction(self, tier: str, reason: str) -> None:
        with self._lock:
            self.evictions[(tier, reason)] = self.evictions.get((tier, reason), 0) + 1

    def migration(self, outcome: str) -> None:
        with self._lock:
            self.migrations[outcome] = self.migrations.get(outcome, 0) + 1

    def request_forwarded(self) -> None:
        with self._lock:
            self.forwarded += 1

    # --- reading (the collector) -------------------------------------------------------------
    def snapshot(self) -> dict:
        """A consistent copy of every counter (histograms copied too)."""
        with self._lock:
            return {"requests": dict(self.requests), "prompt_tokens": dict(self.prompt_tokens),
                    "generation_tokens": dict(self.generation_tokens),
                    "ttft": {k: b.copy() for k, b in self.ttft.items()},
                    "load_seconds": {k: b.copy() for k, b in self.load_seconds.items()},
                    "load_bytes": dict(self.load_bytes), "evictions": dict(self.evictions),
                    "migrations": dict(self.migrations), "forwarded": self.forwarded}


def sorted_items(d: dict) -> Iterable:
    """A dict's items in a stable order (the scrape text does not reshuffle between scrapes)."""
    return sorted(d.items(), key=lambda kv: kv[0])
