"""The migration time model `a * (t_in + t_out) + b0` (DESIGN.md section 8), fitted online.

Every live migration this node runs as the source adds a sample (tokens moved, seconds it took);
a least-squares line through the most recent ones gives a (seconds per token: the destination's
prefill of the rounds and the handoff) and b0 (the fixed part: round trips, the handoff's step).
The destination's load of the model (prepare) is not in the samples: placement prices it apart,
as that node's time-to-ready for the model. Until samples of different sizes fit a slope, it is
the node's measured prefill time per token (else DEFAULT_A) and b0 takes the rest. The fit
travels in the node's locality state, so placement's migration option is priced by what this
node measured.
Pure arithmetic, table-tested.
"""
from __future__ import annotations

import collections
import threading

DEFAULT_A = 0.002        # s per token moved: a prefill rate of 500 tokens/s until measured
DEFAULT_B0 = 0.2         # s: a few round trips and a decode step until measured
MAX_SAMPLES = 64
MIN_SPREAD = 0.25        # sizes must span this fraction of their mean before the slope is fitted


def fit(samples: list[tuple[float, float]], default_a: float = DEFAULT_A,
        default_b0: float = DEFAULT_B0) -> tuple[float, float]:
    """(a, b0) of the least-squares line through (tokens, seconds); never negative. Samples of
    (nearly) one size say nothing about the slope: it stays the default and the rest goes in b0
    (a slope fitted across 94 and 95 tokens would extrapolate noise). A line that would cross
    below zero is refitted through the origin."""
    if not samples:
        return default_a, default_b0
    n = len(samples)
    xs = [x for x, _ in samples]
    mx = sum(xs) / n
    my = sum(y for _, y in samples) / n
    if max(xs) - min(xs) < MIN_SPREAD * mx:
        return default_a, max(0.0, my - default_a * mx)
    var = sum((x - mx) ** 2 for x in xs)
    a = sum((x - mx) * (y - my) for x, y in samples) / var
    if a < 0:
        return 0.0, my
    b0 = my - a * mx
    if b0 < 0:
        return sum(x * y for x, y in samples) / sum(x * x for x in xs), 0.0
    return a, b0


class MigrationCost:
    """The samples of this node's migrations and their fit. Thread-safe."""

    def __init__(self, max_samples: int = MAX_SAMPLES):
        self._samples: collections.deque[tuple[float, float]] = collections.deque(maxlen=max_samples)
        self._lock = threading.Lock()

    def observe(self, tokens: int, seconds: float) -> None:
        if tokens > 0 and seconds > 0:
            with self._lock:
                self._samples.append((float(tokens), float(seconds)))

    def estimate(self, tokens: int, default_a: float | None = None) -> float:
        a, b0 = self.coefficients(default_a)
        return a * tokens + b0

    def coefficients(self, default_a: float | None = None) -> tuple[float, float]:
        """default_a: the slope to use until migrations of different sizes fit one (the node's
        measured prefill time per token; else DEFAULT_A)."""
        with self._lock:
            samples = list(self._samples)
        return fit(samples, default_a=default_a if default_a else DEFAULT_A)

    def to_dict(self, default_a: float | None = None) -> dict:
        a, b0 = self.coefficients(default_a)
        with self._lock:
            n = len(self._samples)
        return {"a_s_per_token": a, "b0_s": b0, "samples": n}
