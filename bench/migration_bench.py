"""Live migration on loopback (issue 10): the pause a client sees, rounds, bytes, against a
stop-and-re-prefill baseline.

Two real sllmd nodes (each with its Serf agent and peer socket), SmolLM2 imported on both. Each
run streams a greedy answer from A and, after --after tokens, migrates it to B; the client's
clock gives the inter-token gaps. Reported, medians over --runs:

- the pause at the handoff (the gap between the last token from A and the first from B) vs
  the median inter-token gap of the same stream (goal: pause <= 2x the gap);
- the migration's total time and rounds, vs stop-and-re-prefill: the time B takes to first token
  for the whole sequence so far as a fresh prompt (what cancelling on A and re-running on B costs
  the client, its prefill);
- bytes on the wire (token rounds + the final state) vs the KV cache the same request holds
  (layers x 2 x KV heads x head dim x dtype size x tokens), which a KV-copying migration moves.

- the estimator's error: each run's a*(t_in+t_out)+b0, fitted from the runs before it, against
  the migration it predicted (runs migrate at several points, so the fit sees several sizes).

    .venv/bin/python bench/migration_bench.py [--runs 6] [--after 16,24,32,48] [--max-tokens 220]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(1, str(BENCH.parent / "tests"))

from daemon_bench import NAME, QUESTION, smollm2_fixtures  # noqa: E402


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def kv_bytes_per_token(ckpt: Path, dtype_bytes: int) -> int:
    cfg = json.loads((ckpt / "config.json").read_text()) if (ckpt / "config.json").exists() else {}
    layers = int(cfg.get("num_hidden_layers", 30))
    heads = int(cfg.get("num_key_value_heads", cfg.get("num_attention_heads", 3)))
    head_dim = int(cfg.get("head_dim") or cfg.get("hidden_size", 576) // cfg.get("num_attention_heads", 9))
    return layers * 2 * heads * head_dim * dtype_bytes


def one_run(a, after: int, max_tokens: int) -> dict:
    times: list[float] = []
    texts: list[str] = []
    ready = threading.Event()
    done: dict = {}

    def consume():
        with a.client() as c, c.infer(NAME, QUESTION + " Answer at length, in detail.", max_tokens=max_tokens,
                                      temperature=0.0, node="A") as s:
            for ev in s.events():
                if ev["type"] == "token":
                    times.append(time.perf_counter())
                    texts.append(ev["text"])
                    if len(times) == after:
                        ready.set()
            done.update(s.stats or {})
            ready.set()   # ended (maybe before the migration point)

    reader = threading.Thread(target=consume)
    reader.start()
    if not ready.wait(120):
        raise SystemExit("the stream never reached the migration point")
    if len(times) < after:   # the answer was shorter than the migration point
        reader.join(60)
        return None
    from sllmd.errors import RequestNotFoundError
    try:
        with a.client() as c:
            rid = next(r["id"] for r in c.requests() if r["model"] == NAME)
            moved = c.migrate(rid, "B")
    except (RequestNotFoundError, StopIteration):   # it finished just before it could move
        reader.join(60)
        return None
    reader.join(300)
    k = int(moved.get("output_tokens_before") or 0)
    gaps = [t1 - t0 for t0, t1 in zip(times, times[1:])]
    pause = times[k] - times[k - 1] if 0 < k < len(times) else None
    others = [g for i, g in enumerate(gaps) if i != k - 1]
    return {"moved": moved, "pause_s": pause, "median_gap_s": statistics.median(others) if others else None,
            "tokens": len(times), "text": "".join(texts), "stats": done}


def re_prefill_ttft(b, text: str) -> float:
    """B's time to first token for the whole sequence so far as one fresh prompt."""
    with b.client() as c, c.infer(NAME, text, max_tokens=2, temperature=0.0, chat=False, node="B") as s:
        t0 = time.perf_counter()
        for ev in s.events():
            if ev["type"] == "token":
                return time.perf_counter() - t0
    return float("nan")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=6)
    p.add_argument("--after", default="16,24,32,48",
                   help="tokens streamed from A before the migration; run i uses the i-th (cycling)")
    p.add_argument("--max-tokens", type=int, default=220)
    args = p.parse_args(argv)
    points = [int(x) for x in str(args.after).split(",") if x.strip()]
    from cluster_helpers import BENCH_FLAGS, close_all, make_nodes, start_all
    from daemon_helpers import remove_tree, short_tempdir

    ckpt, _ = smollm2_fixtures()
    root = short_tempdir("sllm-migbench-")
    a, b = make_nodes(root, ["A", "B"], *BENCH_FLAGS, dram="1GiB", device_memory="2GiB")
    runs = []
    try:
        start_all([a, b])
        for n in (a, b):
            with n.client() as c:
                c.import_model(NAME, str(ckpt))
                c.load(NAME)
        deadline = time.monotonic() + 30
        while True:
            with a.client() as c:
                if sorted(r["name"] for r in c.nodes() if r["status"] == "alive") == ["A", "B"]:
                    break
            if time.monotonic() > deadline:
                raise SystemExit("the nodes never saw each other")
            time.sleep(0.2)
        with b.client() as c:
            dtype = (c.show(NAME).get("compute_dtype") or "bfloat16")
        for i in range(args.runs):
            after = points[i % len(points)]
            r = one_run(a, after, args.max_tokens)
            if r is None:
                log(f"run {i + 1}: the answer ended before it could move at {after} tokens; skipped (use smaller --after points)")
                continue
            prefix = QUESTION + " Answer at length, in detail." + r["text"][:len(r["text"]) * after // max(1, r["tokens"])]
            r["re_prefill_s"] = re_prefill_ttft(b, prefix)
            runs.append(r)
            m = r["moved"]
            log(f"run {i + 1} (after {after} tokens, {m['tokens_sent']} moved, estimate "
                f"{m.get('estimate_s') or 0:.3f} s vs {m['moved_s']:.3f} s): pause {r['pause_s'] * 1e3:.0f} ms, median gap {r['median_gap_s'] * 1e3:.0f} ms, "
                f"rounds {m['rounds']}, re-prefill {r['re_prefill_s'] * 1e3:.0f} ms; handoff {m['handoff_s'] * 1e3:.0f} ms, "
                f"handoff to B's first token {m['handoff_to_first_s'] * 1e3:.0f} ms (B's prefill "
                f"{(r['stats'].get('prefill_s') or 0) * 1e3:.0f} ms, {r['stats'].get('prefill_chunks')} chunk(s)), "
                f"rounds {[round(x['seconds'] * 1e3) for x in m['round_detail']]} ms; A-side pause {(m.get('pause_s') or 0) * 1e3:.0f} ms, of which last token -> handoff {(m.get('last_token_to_handoff_s') or 0) * 1e3:.0f} ms")
    finally:
        close_all([a, b])
        remove_tree(root)
    med = lambda xs: statistics.median(xs)  # noqa: E731
    pause = med([r["pause_s"] for r in runs])
    gap = med([r["median_gap_s"] for r in runs])
    total = med([r["moved"]["total_s"] for r in runs])
    rounds = med([r["moved"]["rounds"] for r in runs])
    re_prefill = med([r["re_prefill_s"] for r in runs])
    sent = med([r["moved"]["bytes_sent"] for r in runs])
    tokens = med([r["moved"]["tokens_sent"] for r in runs])
    dtype_bytes = 4 if "32" in str(dtype) else 2
    kv = kv_bytes_per_token(Path(ckpt), dtype_bytes) * tokens
    print(f"| figure (median of {len(runs)}) | ours | reference | ratio | goal |")
    print("|---|---|---|---|---|")
    print(f"| pause at the handoff vs the stream's median inter-token gap | {pause * 1e3:.0f} ms | {gap * 1e3:.0f} ms "
          f"| {pause / gap:.2f}x | <= 2x: {'met' if pause <= 2 * gap else 'missed'} |")
    print(f"| client's pause vs stop-and-re-prefill on B (its TTFT for the sequence so far) | {pause * 1e3:.0f} ms "
          f"| {re_prefill * 1e3:.0f} ms | {pause / re_prefill:.2f}x | |")
    print(f"| migration total (prepare, {rounds:.0f} rounds, handoff, first token on B) | {total * 1e3:.0f} ms | | | |")
    errors = [abs(r["moved"]["estimate_s"] - r["moved"]["moved_s"]) / r["moved"]["moved_s"] for r in runs[1:]
              if r["moved"].get("estimate_s") is not None]   # the first run has only the defaults to go on
    if errors:
        err = med(errors)
        sizes = sorted({int(r["moved"]["tokens_sent"]) for r in runs})
        print(f"| estimator error, median of runs 2-{len(runs)} ({sizes[0]}-{sizes[-1]} tokens moved): "
              f"a*(t_in+t_out)+b0 fitted from the runs before | {err:.0%} | | | < 20%: {'met' if err < 0.2 else 'missed'} |")
    print(f"| bytes on the wire vs the KV cache of {tokens:.0f} tokens ({dtype}) | {sent / 1e3:.1f} kB "
          f"| {kv / 1e6:.2f} MB | {sent / kv:.4f}x | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
