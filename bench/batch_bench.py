#!/usr/bin/env python3
"""Continuous batching: aggregate decode throughput of one SmolLM2 instance at
1, 2, 4, 8, 16 concurrent streams (DESIGN.md section 7, issue 9).

    python bench/batch_bench.py [--tokens 32] [--streams 1,2,4,8,16] [--compute-dtype auto]

Rows, each on the same prompts (a different story prompt per stream, chat
template applied, greedy, `--tokens` new tokens each):
  batched     a real sllmd with --max-batch 16: N clients at once
  sequential  a real sllmd with --max-batch 1 (serving before batching): N clients at once
  generate    transformers `model.generate` on the N prompts as one left-padded batch, in
              this process (the ceiling for a batch of N on this machine)
  transformers-cb  transformers' own continuous batching (`model.generate_batch`, paged
              attention, its ContinuousBatchingManager) on the N prompts, in this process: the
              alternative we evaluated (sllmd/inference/README.md)
  llama.cpp   llama-cpp-python on the same SmolLM2 GGUF (Q4_1), the N streams one after
              another (its Llama class serves one sequence); skipped when not installed
Aggregate tokens/s = all streams' new tokens / wall time from the first request
sent to the last one done (prefill included); each cell is the best of --rounds. The two daemons run side by side
and the rows are interleaved per N, so load from other processes falls on all.

Then the TTFT of a request joining a full batch (8 streams decoding) against
its prefill time alone + two decode steps at batch 8 (issue 9's goal).

Results: bench/results/batch_bench.json and a markdown table on stdout.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent / "tests"))

import common  # noqa: E402

NAME = "smol"
TOPICS = ["a lighthouse keeper", "a lost cat", "a robot chef", "the moon", "a dragon", "a train", "a library",
          "a storm", "a garden", "a violin", "a desert", "a clockmaker", "a ship", "a volcano", "a snowman",
          "a market"]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def prompt(i: int) -> str:
    return f"Write a long story about {TOPICS[i % len(TOPICS)]}."


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=32, help="new tokens per stream")
    p.add_argument("--streams", default="1,2,4,8,16", help="concurrent streams to measure")
    p.add_argument("--compute-dtype", default="auto", help="the daemons' --compute-dtype (and the ceiling's)")
    p.add_argument("--join-batch", type=int, default=8, help="streams decoding when the joiner arrives")
    p.add_argument("--rounds", type=int, default=2, help="rounds over every row; each cell keeps its best round "
                   "(the least disturbed by the other processes on a shared machine)")
    p.add_argument("--join-only", action="store_true", help="only the joining request's TTFT")
    p.add_argument("--out", type=Path, default=common.RESULTS_DIR / "batch_bench.json")
    return p.parse_args(argv)


# --- the daemons --------------------------------------------------------------------------------------------
def run_streams(socket: str, n: int, tokens: int) -> dict:
    from sllmd.client import Client

    results: list[dict | None] = [None] * n
    errors: list[str] = []
    barrier = threading.Barrier(n + 1)

    def one(i: int) -> None:
        try:
            with Client(socket, timeout=600) as c:
                barrier.wait()
                t0 = time.perf_counter()
                first = None
                stream = c.infer(NAME, prompt(i), max_tokens=tokens)
                for _ in stream:
                    first = first or time.perf_counter()
                results[i] = {"sent": t0, "first": first, "end": time.perf_counter(), "stats": stream.stats}
        except Exception as e:  # reported in the row
            errors.append(f"{type(e).__name__}: {e}")
            try:
                barrier.abort()
            except threading.BrokenBarrierError:
                pass

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    try:
        barrier.wait()
    except threading.BrokenBarrierError:
        pass
    for t in threads:
        t.join()
    if errors or any(r is None for r in results):
        return {"error": "; ".join(errors) or "a stream did not finish"}
    start, end = min(r["sent"] for r in results), max(r["end"] for r in results)
    total = sum(r["stats"]["tokens"] for r in results)
    rates = [r["stats"]["tokens_per_s"] for r in results if r["stats"].get("tokens_per_s")]
    return {"tokens": total, "wall_s": end - start, "tokens_per_s": total / (end - start),
            "ttft_s": [r["stats"]["ttft_s"] for r in results],
            "per_stream_tokens_per_s": sum(rates) / len(rates) if rates else None,
            "batch_size": max(r["stats"].get("batch_size", 1) for r in results)}


def join_ttft(socket: str, batch: int, tokens: int) -> dict:
    """A request joins `batch` streams that are decoding; its TTFT vs its prefill alone + 2 steps."""
    from sllmd.client import Client

    joiner = prompt(batch + 1)
    with Client(socket, timeout=600) as c:  # alone: its prefill time and nothing else
        s = c.infer(NAME, joiner, max_tokens=2)
        s.text()
        alone = s.stats
    clients = [Client(socket, timeout=600) for _ in range(batch)]
    streams = [c.infer(NAME, prompt(i), max_tokens=100_000) for i, c in enumerate(clients)]
    its = [iter(s) for s in streams]
    try:
        for it in its:
            next(it)
        with Client(socket, timeout=600) as c:
            # the step time at this batch, from the daemon's token counts (the streams' own
            # buffers would hide it): tokens of one stream over a 2-second window
            def out_tokens() -> int:
                return max(r["tokens_out"] for r in c.requests() if r["state"] == "running")
            n0, t0 = out_tokens(), time.perf_counter()
            time.sleep(2.0)
            step_s = (time.perf_counter() - t0) / max(1, out_tokens() - n0)
            t0 = time.perf_counter()
            s = c.infer(NAME, joiner, max_tokens=tokens)
            first = None
            for _ in s:
                first = first or time.perf_counter()
            joined = s.stats
        client_ttft = first - t0
    finally:
        for s, c in zip(streams, clients):
            s.close()
            c.close()
    bound = alone["prefill_s"] + 2 * step_s
    return {"batch": batch, "ttft_s": joined["ttft_s"], "client_ttft_s": client_ttft,
            "prefill_alone_s": alone["prefill_s"], "decode_step_s": step_s, "goal_s": bound,
            "met": joined["ttft_s"] <= bound, "joined_batch_size": joined.get("batch_size")}


# --- the in-process rows ------------------------------------------------------------------------------------
def load_ceiling(ckpt: Path, compute_dtype: str):
    import torch

    from sllmd.inference import compute_dtype as cdt
    from sllmd.store import load_model
    from sllmd.store.model import load_tokenizer

    model = load_model(ckpt, device="cpu")
    target = cdt.resolve(compute_dtype, "cpu", model.dtype)
    if target is not None and target != model.dtype:
        model = model.to(target)
    tok = load_tokenizer(ckpt)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    log(f"ceiling: transformers generate in {model.dtype}, {torch.get_num_threads()} threads")
    return model, tok


def generate_row(model, tok, n: int, tokens: int) -> dict:
    import torch

    texts = [tok.apply_chat_template([{"role": "user", "content": prompt(i)}], tokenize=False,
                                     add_generation_prompt=True) for i in range(n)]
    batch = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = model.generate(**batch, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id)
        wall = time.perf_counter() - t0
    new = (out.shape[1] - batch["input_ids"].shape[1]) * n
    return {"tokens": new, "wall_s": wall, "tokens_per_s": new / wall}


def cb_row(model, tok, n: int, tokens: int) -> dict:
    from transformers import GenerationConfig

    ids = [tok.encode(tok.apply_chat_template([{"role": "user", "content": prompt(i)}], tokenize=False,
                                              add_generation_prompt=True), add_special_tokens=False) for i in range(n)]
    cfg = GenerationConfig(max_new_tokens=tokens, do_sample=False, eos_token_id=-1, pad_token_id=tok.pad_token_id)
    t0 = time.perf_counter()
    out = model.generate_batch(inputs=ids, generation_config=cfg)
    wall = time.perf_counter() - t0
    model.set_attn_implementation("sdpa")  # back to what generate and the daemons use
    new = sum(len(r.generated_tokens) for r in out.values())
    return {"tokens": new, "wall_s": wall, "tokens_per_s": new / wall}


def llama_cpp_row(llm, tok, n: int, tokens: int) -> dict:
    total, t0 = 0, time.perf_counter()
    for i in range(n):
        out = llm.create_chat_completion([{"role": "user", "content": prompt(i)}], max_tokens=tokens,
                                         temperature=0.0)
        total += out["usage"]["completion_tokens"]
    wall = time.perf_counter() - t0
    return {"tokens": total, "wall_s": wall, "tokens_per_s": total / wall}


def load_llama_cpp():
    try:
        from llama_cpp import Llama
    except ImportError:
        log("llama-cpp-python is not installed (pip install -e '.[bench]' builds it): its row is skipped")
        return None
    from smollm2 import gguf_path
    path = gguf_path()
    if path is None:
        return None
    return Llama(model_path=str(path), n_ctx=2048, n_threads=os.cpu_count() or 2, verbose=False)


# --- the run ------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    a = parse_args(argv)
    from daemon_bench import smollm2_fixtures
    from daemon_helpers import DaemonProcess, remove_tree, short_tempdir
    from sllmd.client import Client

    streams = [int(s) for s in a.streams.split(",")]
    ckpt, _ = smollm2_fixtures()
    daemons, roots = {}, []
    rows: dict[str, dict[int, dict]] = {"batched": {}, "sequential": {}, "generate": {}, "transformers-cb": {},
                                        "llama.cpp": {}}
    info = {"machine": common.machine_info(), "tokens": a.tokens, "compute_dtype": a.compute_dtype,
            "loadavg_start": os.getloadavg()[0], "command": " ".join(["python", "bench/batch_bench.py", *sys.argv[1:]])}
    try:
        for label, max_batch in (("batched", max(streams)), ("sequential", 1)):
            root = short_tempdir("sllm-batch-")
            roots.append(root)
            d = DaemonProcess(root, "--keep-alive", "-1", "--log-level", "info", "--max-batch", str(max_batch),
                              "--queue-depth", "64", "--compute-dtype", a.compute_dtype,
                              dram="1GiB", device_memory="2GiB").start()
            daemons[label] = d
            with Client(d.socket, timeout=600) as c:
                c.import_model(NAME, ckpt)
                c.load(NAME)
                c.generate(NAME, prompt(0), max_tokens=4)  # warm-up
        model, tok = load_ceiling(ckpt, a.compute_dtype) if not a.join_only else (None, None)
        if not a.join_only:
            generate_row(model, tok, 2, 4)  # warm-up
        llm = load_llama_cpp() if not a.join_only else None
        for rnd, n in ((r, n) for r in range(0 if a.join_only else a.rounds) for n in streams):
            for label in rows:
                if label in daemons:
                    res = run_streams(daemons[label].socket, n, a.tokens)
                elif label == "generate":
                    res = generate_row(model, tok, n, a.tokens)
                elif label == "transformers-cb":
                    try:
                        res = cb_row(model, tok, n, a.tokens)
                    except Exception as e:  # reported in the row
                        res = {"error": f"{type(e).__name__}: {e}"}
                elif llm is not None:
                    res = llama_cpp_row(llm, tok, n, a.tokens)
                else:
                    continue
                res["loadavg"] = os.getloadavg()[0]
                res["round"] = rnd
                best = rows[label].get(n)
                if best is None or "error" in best or res.get("tokens_per_s", 0) > best.get("tokens_per_s", 0):
                    rows[label][n] = res
                log(f"[round {rnd + 1}, {n:2} streams] {label:10} " + (f"{res['tokens_per_s']:6.1f} tokens/s "
                    f"({res['tokens']} tokens in {res['wall_s']:.1f} s)" if "error" not in res else res["error"]))
        join = join_ttft(daemons["batched"].socket, a.join_batch, a.tokens)
        log(f"joiner TTFT {join['ttft_s']:.3f} s vs prefill alone {join['prefill_alone_s']:.3f} s + 2 x "
            f"{join['decode_step_s']:.3f} s step = {join['goal_s']:.3f} s: {'met' if join['met'] else 'missed'}")
    finally:
        for d in daemons.values():
            d.close()
        for r in roots:
            remove_tree(r)
    info["loadavg_end"] = os.getloadavg()[0]
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"info": info, "rows": rows, "join": join}, indent=1, default=str))
    print(table(rows, streams, join, info))
    return 0


def table(rows: dict, streams: list[int], join: dict, info: dict) -> str:
    def cell(label: str, n: int) -> str:
        r = rows[label].get(n)
        return f"{r['tokens_per_s']:.1f}" if r and "tokens_per_s" in r else "-"

    def ratio(label: str, other: str, n: int) -> str:
        r, o = rows[label].get(n), rows[other].get(n)
        if not r or not o or "tokens_per_s" not in r or "tokens_per_s" not in o:
            return "-"
        return f"{r['tokens_per_s'] / o['tokens_per_s']:.2f}x"

    out = [f"{info['tokens']} new tokens per stream, compute dtype {info['compute_dtype']}; aggregate tokens/s",
           "", "| streams | sllmd batched | sllmd sequential | generate (ceiling) | transformers CB "
           "| llama.cpp (Q4_1, one at a time) | batched / sequential | batched / ceiling |",
           "|---|---|---|---|---|---|---|---|"]
    for n in streams:
        out.append(f"| {n} | {cell('batched', n)} | {cell('sequential', n)} | {cell('generate', n)} | "
                   f"{cell('transformers-cb', n)} | {cell('llama.cpp', n)} | {ratio('batched', 'sequential', n)} | "
                   f"{ratio('batched', 'generate', n)} |")
    out += ["", f"joining a batch of {join['batch']}: TTFT {join['ttft_s']:.3f} s (client {join['client_ttft_s']:.3f} s)"
            f"; prefill alone {join['prefill_alone_s']:.3f} s + 2 decode steps of {join['decode_step_s']:.3f} s = "
            f"{join['goal_s']:.3f} s: {'met' if join['met'] else 'missed'}"]
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
