"""The simulator against reality (issue 11, item 4): one small scenario on real sllmd nodes and in
`sllmd.cluster.sim`, startup latencies compared request by request.

Three real nodes on loopback (tests/cluster_helpers.py, each with its Serf agent and peer socket):
SmolLM2 in B's DRAM, on C's SSD only, nothing on A; requests arrive at A one at a time, as
examples/sim/loopback_trace.csv says. The simulator gets what the nodes measured, never guesses:

- per-path bandwidths: the nodes' own (their pulled states' "bandwidths", as A's placement reads them);
- SmolLM2's prefill time (a + b * prompt tokens) and time per output token: fitted from calibration
  requests run on C before the trace (C is then put back to SSD only), not from the trace's own requests;
- each trace request's real prompt and output token counts and arrival offsets.

The startup latency compared is arrival -> first token: on the real side the client's clock at A
(so it includes the forwarding hop, which the simulator does not model), on the simulated side
`first_token - arrival`. Tolerance: 25% or 0.2 s, whichever is larger.

    .venv/bin/python bench/sim_vs_real.py
"""
from __future__ import annotations

import argparse
import csv
import statistics
import sys
import tempfile
import time
import tomllib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(1, str(REPO / "tests"))

from daemon_bench import NAME, smollm2_fixtures  # noqa: E402

SCENARIO = REPO / "examples" / "sim" / "loopback.toml"
TOLERANCE = (0.25, 0.2)      # relative, absolute (seconds): the larger one applies


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def prompt_of(tokens: int) -> str:
    return " ".join(["word"] * max(1, tokens - 1))   # about one token per word in SmolLM2's vocabulary


def timed(client, prompt: str, max_tokens: int, **kw) -> dict:
    t0 = time.perf_counter()
    first = None
    with client.infer(NAME, prompt, max_tokens=max_tokens, temperature=0.0, chat=False, **kw) as stream:
        for ev in stream.events():
            if ev["type"] == "token" and first is None:
                first = time.perf_counter()
        stats = stream.stats or {}
    return {"ttft_s": (first or time.perf_counter()) - t0, "stats": stats}


def fit_prefill(samples: list[tuple[int, float]]) -> tuple[float, float]:
    """Least squares prefill_s = a + b * tokens (b >= 0, a >= 0)."""
    xs, ys = [x for x, _ in samples], [y for _, y in samples]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    var = sum((x - mx) ** 2 for x in xs)
    b = max(0.0, sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var) if var else 0.0
    return max(0.0, my - b * mx), b


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--calibration", type=int, default=4, help="calibration requests on C (default: 4)")
    args = p.parse_args(argv)
    from cluster_helpers import BENCH_FLAGS, close_all, make_nodes, start_all
    from daemon_helpers import remove_tree, short_tempdir
    from sllmd.cluster.sim import config as sim_config
    from sllmd.cluster.sim.engine import simulate

    doc = tomllib.loads(SCENARIO.read_text())
    with open(SCENARIO.parent / doc["workload"]["trace"]) as f:
        trace = [dict(r) for r in csv.DictReader(f)]
    ckpt, _ = smollm2_fixtures()
    root = short_tempdir("sllm-simreal-")
    nodes = a, b, c = make_nodes(root, ["A", "B", "C"], *BENCH_FLAGS, dram="2GiB", device_memory="2GiB")
    real = []
    try:
        start_all(nodes)
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(lambda n: n.client().import_model(NAME, str(ckpt)), (b, c)))
        samples, tpots = [], []
        with c.client() as cc:                        # calibration: prefill and decode rates on this host
            for i in range(args.calibration):
                r = timed(cc, prompt_of(16 + 48 * (i % 2)), 32, node="C")
                s = r["stats"]
                if s.get("prefill_s") is not None:
                    samples.append((int(s.get("prompt_tokens") or 0), float(s["prefill_s"])))
                if s.get("tokens_per_s"):
                    tpots.append(1.0 / float(s["tokens_per_s"]))
            cc.evict(NAME, tier="device")
            cc.evict(NAME, tier="dram")
        with b.client() as cb:
            cb.load(NAME)
            cb.evict(NAME, tier="device")
        prefill_a, prefill_b = fit_prefill(samples)
        tpot = statistics.median(tpots)
        with a.client() as ca:                        # A must see B's DRAM copy before the trace starts
            deadline = time.monotonic() + 30
            while True:
                states = {n["name"]: n.get("state") or {} for n in ca.nodes()}
                tiers = {m["name"]: m.get("tiers") for m in (states.get("B") or {}).get("models") or []}
                if "dram" in (tiers.get(NAME) or []) and "C" in states:
                    break
                if time.monotonic() > deadline:
                    raise SystemExit("A never saw B's DRAM copy")
                time.sleep(0.1)
            bandwidths = {}
            for name in ("B", "C"):
                for path, bw in ((states.get(name) or {}).get("bandwidths") or {}).items():
                    bandwidths.setdefault(path, []).append(bw)
            t0 = time.perf_counter()
            for row in trace:
                wait = float(row["time_s"]) - (time.perf_counter() - t0)
                if wait > 0:
                    time.sleep(wait)
                arrival = time.perf_counter() - t0
                r = timed(ca, prompt_of(int(row["t_in"])), int(row["t_out"]))
                s = r["stats"]
                real.append({"arrival": arrival, "ttft_s": r["ttft_s"], "t_in": int(s.get("prompt_tokens") or 0),
                             "t_out": int(s.get("tokens") or 0), "node": (s.get("placement") or {}).get("node"),
                             "tier": s.get("load_tier"), "load_s": s.get("load_s"),
                             "engine_ttft_s": s.get("ttft_s"), "prefill_s": s.get("prefill_s")})
    finally:
        close_all(nodes)
        remove_tree(root)

    bw = {path: statistics.median(v) for path, v in bandwidths.items()}
    doc["servers"]["bandwidth"].update({path: v for path, v in bw.items()
                                        if path in ("ssd_dram", "dram_device", "ssd_device")})
    doc["models"][0].update(prefill_s=prefill_a, prefill_s_per_token=prefill_b, tpot_s=tpot)
    doc["sim"]["policies"] = ["ours"]
    with tempfile.TemporaryDirectory() as tmp:
        trace_file = Path(tmp) / "trace.csv"
        with open(trace_file, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["time_s", "model", "t_in", "t_out"])
            for r in real:
                w.writerow([f"{r['arrival']:.3f}", NAME, r["t_in"], max(1, r["t_out"])])
        doc["workload"]["trace"] = str(trace_file)
        scenario = sim_config.from_dict(doc, base=Path(tmp), name="loopback (measured)")
        rows = sorted(simulate(scenario, "ours", scenario.rps[0])["rows"], key=lambda r: r["arrival"])

    print(f"calibration on C: prefill = {prefill_a * 1e3:.1f} ms + {prefill_b * 1e3:.2f} ms/token, "
          f"{tpot * 1e3:.1f} ms/token; bandwidths (median of B, C): "
          + ", ".join(f"{k} {v / 1e9:.2f} GB/s" for k, v in sorted(bw.items())))
    print()
    print("| request | tokens in | real: node, tier, load | real: engine TTFT (prefill) | real startup "
          "| simulated: path | simulated startup | difference | within tolerance |")
    print("|---:|---:|---|---:|---:|---|---:|---:|---|")
    ok_all = True
    for i, (r, s) in enumerate(zip(real, rows)):
        sim_s = s["first_token"] - s["arrival"]
        diff = sim_s - r["ttft_s"]
        ok = abs(diff) <= max(TOLERANCE[0] * r["ttft_s"], TOLERANCE[1])
        ok_all &= ok
        load = f"{r['load_s']:.3f} s" if r.get("load_s") else "-"
        engine = (f"{r['engine_ttft_s'] * 1e3:.0f} ms ({(r['prefill_s'] or 0) * 1e3:.0f} ms)"
                  if r.get("engine_ttft_s") is not None else "-")
        print(f"| {i + 1} | {r['t_in']} | {r['node']}, {r['tier'] or 'loaded'}, {load} | {engine} "
              f"| {r['ttft_s'] * 1e3:.0f} ms "
              f"| {s['path']} | {sim_s * 1e3:.0f} ms | {diff * 1e3:+.0f} ms | {'yes' if ok else 'no'} |")
    print()
    print(f"tolerance: {TOLERANCE[0]:.0%} or {TOLERANCE[1]:.1f} s, whichever is larger: "
          f"{'all within' if ok_all else 'NOT all within'}")
    return 0 if ok_all else 1


if __name__ == "__main__":
    sys.exit(main())
