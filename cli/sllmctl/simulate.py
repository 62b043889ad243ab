"""The cluster simulator's verb (offline: no daemon):

    sllmctl simulate CONFIG.toml [--json] [--plot out.png] [--rps R ...] [--policy P ...]
                                 [--duration S] [--seed N]

Runs every policy of the scenario at every RPS of its sweep (sllmd.cluster.sim) and prints a
table of startup and end-to-end latencies with ratios to "ours", or the whole report as JSON.
"""
from __future__ import annotations

import argparse
import sys

from .output import print_json


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "simulate", help="simulate a cluster placing requests with the real scheduler (offline)",
        description="Run a trace-driven simulation of a cluster (servers, tiers, models, a workload) in "
                    "which every placement decision is sllmd's own placement code; print startup latency "
                    "(arrival to first token) per policy and RPS. No daemon is needed.")
    p.add_argument("config", metavar="CONFIG.toml", help="the scenario (see examples/sim/)")
    p.add_argument("--plot", metavar="PNG", help="also write startup latency vs RPS per policy as a PNG "
                                                 "(needs matplotlib: pip install 'sllmd[sim]'; default: no plot)")
    p.add_argument("--rps", type=float, nargs="+", metavar="R", help="the RPS values to run (default: the "
                                                                     "scenario's sweep)")
    p.add_argument("--policy", dest="policies", action="append", metavar="P",
                   help="a policy to run, repeatable (default: the scenario's)")
    p.add_argument("--duration", type=float, metavar="S", help="the arrival window in seconds (default: the "
                                                               "scenario's)")
    p.add_argument("--seed", type=int, help="the random seed (default: the scenario's)")
    p.set_defaults(func=cmd_simulate)


def cmd_simulate(args: argparse.Namespace) -> int:
    from sllmd.cluster.sim import config, load, report, run_scenario
    from sllmd.errors import ConfigError

    scenario = load(args.config)
    if args.duration is not None:
        scenario = scenario.with_(duration_s=args.duration)
    if args.seed is not None:
        scenario = scenario.with_(seed=args.seed)
    if args.policies:
        unknown = [p for p in args.policies if p not in config.POLICIES]
        if unknown:
            raise ConfigError(f"unknown policy {', '.join(unknown)} (one of {', '.join(config.POLICIES)})")
    if args.rps and min(args.rps) <= 0:
        raise ConfigError("--rps must be > 0")
    if args.plot:
        report._pyplot()    # fail before the runs, not after them

    def progress(run):
        s = run["summary"]["startup_s"]
        mean = "-" if s["mean"] is None else f"{s['mean']:.2f}"
        print(f"sllmctl: {scenario.name} rps={run['rps']:g} {run['policy']}: startup mean {mean} s",
              file=sys.stderr)
    result = run_scenario(scenario, policies=args.policies, rps=args.rps,
                          on_run=None if args.json else progress)
    if args.plot:
        report.plot(result, args.plot)
        result["plot"] = args.plot
    if args.json:
        print_json(result)
    else:
        print(report.table(result))
        if args.plot:
            print(f"\nplot: {args.plot}")
    return 0
