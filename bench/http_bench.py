#!/usr/bin/env python3
"""HTTP (the OpenAI API, sllmd --http) against IPC (the Unix socket) on one sllmd serving SmolLM2.

    python bench/http_bench.py [--reps 5] [--tokens 128] [--clients 16] [--seconds 10]

One real sllmd (--http 127.0.0.1:0, --keep-alive -1, --max-batch 16, CPU device), SmolLM2
imported from the tests' cached checkpoint and loaded before anything is measured. Both
front ends ask the same greedy chat request ("Write a long story about a lighthouse keeper.");
the two alternate request by request (TTFT) or per repetition (tokens/s), so load from other
processes falls on both.

  ttft        client clock, from sending the request to the first text: IPC `Client.infer`'s
              first token; HTTP a streamed /v1/chat/completions' first content chunk (httpx,
              one kept-alive connection); --ttft-reps one-token requests each, back to back,
              alternating. Also what each front end adds to the engine's own TTFT (whose
              clock starts when the node gets the request): the mean client TTFT less the
              mean engine TTFT (IPC: each done's stats; HTTP: /metrics' TTFT sum and count)
  tokens/s    one stream of --tokens tokens: tokens after the first over the time from the
              first to the last (client clock)
  requests/s  --clients threads, each with its own connection, asking 8-token requests back
              to back for --seconds; completed requests / seconds

Goals (issue 13): HTTP tokens/s >= 0.9x IPC's, HTTP TTFT <= IPC's + 5 ms.
Results: bench/results/http_bench.json and a markdown table on stdout.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import threading
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent / "tests"))
os.environ.setdefault("TQDM_DISABLE", "1")

NAME = "smol"
PROMPT = "Write a long story about a lighthouse keeper."


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=5, help="repetitions of the tokens/s row")
    p.add_argument("--ttft-reps", type=int, default=21, help="requests of the TTFT row, per front end")
    p.add_argument("--tokens", type=int, default=128, help="tokens of the tokens/s stream")
    p.add_argument("--clients", type=int, default=16, help="concurrent clients of the requests/s row")
    p.add_argument("--seconds", type=float, default=10.0, help="duration of each requests/s row")
    p.add_argument("--threads", type=int, help="torch threads of the daemon (OMP_NUM_THREADS; default: torch's "
                   "own). 1 keeps a host shared with other work from stalling the decode's thread barriers")
    p.add_argument("--out", type=Path, default=BENCH / "results" / "http_bench.json")
    return p.parse_args(argv)


def httpx_module():
    try:
        import httpx2 as httpx
    except ImportError:
        import httpx
    return httpx


def body(max_tokens: int) -> dict:
    return {"model": NAME, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True}


def ipc_stream(socket: str, max_tokens: int, client=None) -> dict:
    """Times of one streamed request through the Unix socket: sent, first text, each token, end."""
    from sllmd.client import Client
    own = client is None
    c = Client(socket, timeout=300) if own else client
    try:
        t0 = time.perf_counter()
        times = []
        stream = c.infer(NAME, PROMPT, max_tokens=max_tokens, temperature=0)
        for ev in stream.events():
            if ev["type"] == "token" and ev["text"]:
                times.append(time.perf_counter())
        return {"sent": t0, "times": times, "end": time.perf_counter(), "engine_ttft_s": stream.stats["ttft_s"]}
    finally:
        if own:
            c.close()


def http_stream(h, url: str, max_tokens: int) -> dict:
    t0 = time.perf_counter()
    times = []
    with h.stream("POST", url + "/v1/chat/completions", json=body(max_tokens)) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    times.append(time.perf_counter())
    return {"sent": t0, "times": times, "end": time.perf_counter()}


def engine_ttft(h, url: str) -> tuple[float, int]:
    """The sum and count of the engine's TTFT over this daemon's HTTP completions (from /metrics)."""
    text = h.get(url + "/metrics").text
    def value(name: str) -> float:
        m = re.search(rf'^{name}{{model="{NAME}"}} (\S+)$', text, re.M)
        return float(m.group(1)) if m else 0.0
    return value("sllmd_http_time_to_first_token_seconds_sum"), int(value("sllmd_http_time_to_first_token_seconds_count"))


def ttft_ms(run: dict) -> float:
    return (run["times"][0] - run["sent"]) * 1e3


def tokens_per_s(run: dict) -> float:
    t = run["times"]
    return (len(t) - 1) / (t[-1] - t[0])


def requests_per_s(make_one, clients: int, seconds: float) -> float:
    done = [0] * clients
    errors: list[BaseException] = []
    stop = time.perf_counter() + seconds
    start = threading.Barrier(clients + 1)

    def loop(i: int) -> None:
        one = make_one()
        try:
            start.wait()
            while time.perf_counter() < stop:
                one()
                done[i] += 1
        except BaseException as e:   # noqa: BLE001
            errors.append(e)
        finally:
            close = getattr(one, "close", None)
            if close:
                close()

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"{len(errors)} client(s) failed: {errors[0]!r}")
    return sum(done) / (time.perf_counter() - t0)


class _IpcOne:
    def __init__(self, socket: str):
        from sllmd.client import Client
        self.client = Client(socket, timeout=300)

    def __call__(self) -> None:
        self.client.generate(NAME, PROMPT, max_tokens=8, temperature=0)

    def close(self) -> None:
        self.client.close()


class _HttpOne:
    def __init__(self, url: str):
        self.h = httpx_module().Client(timeout=300)
        self.url = url

    def __call__(self) -> None:
        r = self.h.post(self.url + "/v1/chat/completions", json=dict(body(8), stream=False))
        r.raise_for_status()

    def close(self) -> None:
        self.h.close()


def main(argv=None) -> int:
    a = parse_args(argv)
    import conftest
    from daemon_helpers import DaemonProcess, remove_tree, short_tempdir, sllmctl
    from smollm2 import gguf_path
    from sllmd.store.convert import convert

    ckpt = conftest.cached(conftest.smollm2_checkpoint_name(), lambda path: convert(gguf_path(), path))
    root = short_tempdir("sllm-bench-http-")
    daemon = DaemonProcess(root, "--http", "127.0.0.1:0", "--keep-alive", "-1", "--max-batch", str(a.clients),
                           "--log-level", "info", dram="1GiB", device_memory="1GiB",
                           env={"OMP_NUM_THREADS": str(a.threads)} if a.threads else None).start()
    try:
        url = next(m.group(1) for n in daemon.notifications for m in [re.search(r"http on (http://\S+)", n)] if m)
        run = sllmctl("import", NAME, str(ckpt), socket_path=daemon.socket)
        assert run.returncode == 0, run.stderr
        run = sllmctl("load", NAME, socket_path=daemon.socket)
        assert run.returncode == 0, run.stderr
        httpx = httpx_module()
        from sllmd.client import Client
        rows: dict[str, list] = {"ipc_ttft_ms": [], "http_ttft_ms": [], "ipc_tokens_per_s": [],
                                 "http_tokens_per_s": []}
        with httpx.Client(timeout=300) as h, Client(daemon.socket, timeout=300) as c:
            ipc_stream(daemon.socket, 4, c)
            http_stream(h, url, 4)   # one unmeasured request each: connections open, instance warm
            order = [("ipc", lambda n: ipc_stream(daemon.socket, n, c)), ("http", lambda n: http_stream(h, url, n))]
            engine_before = engine_ttft(h, url)
            ipc_engine_s = []
            for rep in range(a.ttft_reps):   # back to back, alternating: one token each
                for name, fn in order if rep % 2 == 0 else order[::-1]:
                    run = fn(1)
                    rows[f"{name}_ttft_ms"].append(ttft_ms(run))
                    if name == "ipc":
                        ipc_engine_s.append(run["engine_ttft_s"])
            engine_after = engine_ttft(h, url)
            http_engine_ms = (engine_after[0] - engine_before[0]) / (engine_after[1] - engine_before[1]) * 1e3
            # what each front end adds to the engine's own TTFT (its clock starts when the node gets the request)
            overhead = {"ipc": statistics.mean(rows["ipc_ttft_ms"]) - statistics.mean(ipc_engine_s) * 1e3,
                        "http": statistics.mean(rows["http_ttft_ms"]) - http_engine_ms}
            log(f"front-end TTFT overhead (mean client TTFT - mean engine TTFT): ipc {overhead['ipc']:.1f} ms, "
                f"http {overhead['http']:.1f} ms")
            log("ttft ms: " + ", ".join(f"{k} {statistics.median(rows[k]):.1f}" for k in ("ipc_ttft_ms", "http_ttft_ms")))
            for rep in range(a.reps):
                for name, fn in order if rep % 2 == 0 else order[::-1]:
                    rows[f"{name}_tokens_per_s"].append(tokens_per_s(fn(a.tokens)))
                log(f"rep {rep + 1}/{a.reps}: ipc {rows['ipc_tokens_per_s'][-1]:.1f} tokens/s, "
                    f"http {rows['http_tokens_per_s'][-1]:.1f} tokens/s")
        rps = {}
        for name, make in (("ipc", lambda: _IpcOne(daemon.socket)), ("http", lambda: _HttpOne(url))):
            rps[name] = requests_per_s(make, a.clients, a.seconds)
            log(f"{name}: {rps[name]:.1f} requests/s at {a.clients} clients")
    finally:
        daemon.close()
        remove_tree(root)

    med = {k: statistics.median(v) for k, v in rows.items()}
    result = {"info": {"when": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "cpus": os.cpu_count(),
                       "load_avg": os.getloadavg(), "args": {k: str(v) for k, v in vars(a).items()}},
              "runs": rows, "median": med, "requests_per_s": rps, "ttft_overhead_ms": overhead,
              "goals": {"tokens_per_s_ratio": med["http_tokens_per_s"] / med["ipc_tokens_per_s"],
                        "ttft_extra_ms": med["http_ttft_ms"] - med["ipc_ttft_ms"]}}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1))
    g = result["goals"]
    print("| | IPC | HTTP | HTTP vs IPC | goal |")
    print("| --- | --- | --- | --- | --- |")
    print(f"| TTFT (warm, median of {a.ttft_reps}) | {med['ipc_ttft_ms']:.1f} ms | {med['http_ttft_ms']:.1f} ms | "
          f"{g['ttft_extra_ms']:+.1f} ms | <= +5 ms: {'met' if g['ttft_extra_ms'] <= 5 else 'missed'} |")
    print(f"| TTFT added by the front end (mean client - engine TTFT) | {overhead['ipc']:.1f} ms | "
          f"{overhead['http']:.1f} ms | {overhead['http'] - overhead['ipc']:+.1f} ms | |")
    print(f"| tokens/s, one stream of {a.tokens} | {med['ipc_tokens_per_s']:.1f} | {med['http_tokens_per_s']:.1f} | "
          f"{g['tokens_per_s_ratio']:.2f}x | >= 0.9x: {'met' if g['tokens_per_s_ratio'] >= 0.9 else 'missed'} |")
    print(f"| requests/s, {a.clients} clients, 8 tokens | {rps['ipc']:.1f} | {rps['http']:.1f} | "
          f"{rps['http'] / rps['ipc']:.2f}x | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
