"""A trace-driven cluster simulator that runs the real placement code (issue 11).

Only time, loading and decoding are simulated; every decision is
sllmd.cluster.placement.place on NodeViews whose states have the shape of
sllmd.cluster.locality.local_state. One concept per module:

    config    the TOML scenario (servers, models, workload, policies, RPS sweep)
    workload  arrivals (Poisson, Gamma with a CV, trace file), popularity, lengths
    servers   simulated tiers, GPUs, loader, and the locality state each reports
    engine    the event loop (loads, prefill, decode, migration, preemption)
    policies  random, round-robin, load-only, locality, shepherd, ours (+ the oracle bound)
    report    summaries, ratios to ours, a table, a PNG plot

    sllmctl simulate examples/sim/paper.toml [--json] [--plot out.png]
"""
from __future__ import annotations

from sllmd.cluster.sim import report as _report
from sllmd.cluster.sim.config import Scenario, load
from sllmd.cluster.sim.engine import Simulation, simulate

__all__ = ["Scenario", "Simulation", "load", "run_scenario", "simulate"]


def run_scenario(scenario: Scenario, *, policies: list[str] | None = None, rps: list[float] | None = None,
                 on_run=None) -> dict:
    """Every policy at every RPS of the scenario: {"scenario", "runs": [{policy, rps, summary}], "ratios"}."""
    runs = []
    for r in rps or scenario.rps:
        for p in policies or scenario.policies:
            summary = _report.summarize(simulate(scenario, p, r))
            runs.append({"policy": p, "rps": r, "summary": summary})
            if on_run is not None:
                on_run(runs[-1])
    out = {"scenario": scenario.name, "seed": scenario.seed, "servers": scenario.servers.count,
           "models": len(scenario.models), "duration_s": scenario.duration_s, "runs": runs}
    if any(r["policy"] == "ours" for r in runs):
        out["ratios"] = _report.ratios(runs)
    return out
