"""The requests of a run: arrival times, which model, prompt and output lengths.

Arrivals: Poisson at a rate, or Gamma inter-arrival times with a coefficient of variation (the
paper's Azure-trace setting: cv > 1 is bursty), or a trace file (CSV: time_s,model[,t_in,t_out]).
Popularity: uniform over the models, or Zipf with exponent s (model i has weight 1/(i+1)^s, in
the order the models are declared). Lengths: "gsm8k"- and "sharegpt"-like lognormals (synthetic:
means and spreads chosen to resemble those datasets' prompt/answer lengths, not the datasets),
"fixed", "lognormal" with the given means, or a file of t_in,t_out rows sampled with replacement.
Everything is drawn from one random.Random(seed), so a seed names a run.
"""
from __future__ import annotations

import csv
import dataclasses
import math
import random
from pathlib import Path

from sllmd.errors import ConfigError
from sllmd.cluster.sim.config import Scenario

# (mean t_in, sigma_in, mean t_out, sigma_out) of a lognormal per preset
PRESETS = {"gsm8k": (70.0, 0.35, 120.0, 0.45), "sharegpt": (250.0, 0.9, 230.0, 0.8)}


@dataclasses.dataclass
class Request:
    id: int
    arrival: float
    model: str
    t_in: int
    t_out: int


def _lognormal(rng: random.Random, mean: float, sigma: float, cap: int) -> int:
    mu = math.log(max(mean, 1.0)) - sigma * sigma / 2     # so that the mean is `mean`
    return max(1, min(cap, int(round(rng.lognormvariate(mu, sigma)))))


def read_rows(path: Path) -> list[list[str]]:
    try:
        with open(path, newline="") as f:
            rows = [r for r in csv.reader(f) if r and not r[0].lstrip().startswith("#")]
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    if rows and not _is_number(rows[0][0]):
        rows = rows[1:]    # a header
    return rows


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


class Lengths:
    def __init__(self, scenario: Scenario, rng: random.Random):
        wl = scenario.workload
        self.rng, self.cap = rng, wl.max_tokens
        self.rows: list[tuple[int, int]] = []
        if wl.lengths == "file":
            for r in read_rows(wl.lengths_file):
                if len(r) < 2:
                    raise ConfigError(f"{wl.lengths_file}: each row needs t_in,t_out")
                self.rows.append((int(float(r[0])), int(float(r[1]))))
            if not self.rows:
                raise ConfigError(f"{wl.lengths_file}: no rows")
        self.kind = wl.lengths
        self.params = PRESETS.get(wl.lengths, (wl.t_in, wl.sigma_in, wl.t_out, wl.sigma_out))

    def draw(self) -> tuple[int, int]:
        if self.kind == "file":
            return self.rng.choice(self.rows)
        mi, si, mo, so = self.params
        if self.kind == "fixed":
            return int(mi), int(mo)
        return _lognormal(self.rng, mi, si, self.cap), _lognormal(self.rng, mo, so, self.cap)

    def mean_out(self) -> float:
        if self.kind == "file":
            return sum(r[1] for r in self.rows) / len(self.rows)
        return self.params[2]


def arrivals(kind: str, rps: float, duration_s: float, cv: float, rng: random.Random) -> list[float]:
    """Arrival times in [0, duration_s): Poisson (exponential gaps) or Gamma gaps with mean 1/rps and CV cv."""
    out, t = [], 0.0
    if kind == "poisson":
        draw = lambda: rng.expovariate(rps)   # noqa: E731
    else:
        shape = 1.0 / (cv * cv)
        draw = lambda: rng.gammavariate(shape, 1.0 / (rps * shape))   # noqa: E731
    while True:
        t += draw()
        if t >= duration_s:
            return out
        out.append(t)


def generate(scenario: Scenario, rps: float) -> list[Request]:
    """The requests of one run at `rps` (a trace file ignores rps)."""
    wl = scenario.workload
    rng = random.Random(f"{scenario.seed}:{rps}")
    lengths = Lengths(scenario, rng)
    names = [m.name for m in scenario.models]
    if wl.arrival == "trace":
        reqs = []
        known = set(names)
        for i, r in enumerate(read_rows(wl.trace)):
            if len(r) < 2 or r[1] not in known:
                raise ConfigError(f"{wl.trace}: row {i + 1}: needs time_s,model with a declared model, got {r}")
            t_in, t_out = (int(float(r[2])), int(float(r[3]))) if len(r) >= 4 else lengths.draw()
            reqs.append(Request(i, float(r[0]), r[1], t_in, t_out))
        reqs.sort(key=lambda q: (q.arrival, q.id))
        return reqs
    times = arrivals(wl.arrival, rps, scenario.duration_s, wl.cv, rng)
    if wl.popularity == "zipf":
        weights = [1.0 / (i + 1) ** wl.zipf_s for i in range(len(names))]
    else:
        weights = None
    picks = rng.choices(names, weights=weights, k=len(times)) if times else []
    return [Request(i, t, m, *lengths.draw()) for i, (t, m) in enumerate(zip(times, picks))]


def mean_output_tokens(scenario: Scenario) -> float:
    """What a node would expect of a request's output length (its own mean, not the request's)."""
    return Lengths(scenario, random.Random(0)).mean_out()
