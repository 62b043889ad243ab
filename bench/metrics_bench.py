#!/usr/bin/env python3
"""The cost of a Prometheus scrape of one sllmd holding 100 models.

    python bench/metrics_bench.py [--models 100] [--served 100] [--scrapes 50]

One real sllmd (--http 127.0.0.1:0, --keep-alive -1, CPU device), --models copies of one tiny
llama checkpoint (the tests' tiny model, with its tokenizer) imported over the socket, and one
short request run on each of the first --served of them, so that every per-model series exists
(requests, tokens, a time-to-first-token histogram per model and load tier, running, queued).
Then, alternating, --scrapes times each: GET /metrics (httpx, one kept-alive connection, as
Prometheus scrapes), `Client.metrics()` over the Unix socket (what `sllmctl metrics` asks), and
GET /healthz as the floor of an HTTP round trip. The collector reads everything at scrape time
(no sampling thread), so this is the whole cost. Results: bench/results/metrics_bench.json and
a markdown table on stdout. Takes well under a minute.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent / "tests"))
os.environ.setdefault("TQDM_DISABLE", "1")

IMPORTERS = 4   # clients importing at once


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", type=int, default=100, help="models in the store")
    p.add_argument("--served", type=int, default=100, help="models that run one request each before the scrapes")
    p.add_argument("--scrapes", type=int, default=50, help="scrapes of each kind")
    p.add_argument("--out", type=Path, default=BENCH / "results" / "metrics_bench.json")
    return p.parse_args(argv)


def httpx_module():
    try:
        import httpx2 as httpx
    except ImportError:
        import httpx
    return httpx


def ms_stats(xs: list[float]) -> dict:
    xs = sorted(xs)
    return {"median_ms": statistics.median(xs) * 1e3, "p90_ms": xs[int(0.9 * (len(xs) - 1))] * 1e3,
            "min_ms": xs[0] * 1e3}


def main(argv=None) -> int:
    args = parse_args(argv)
    from common import exclusive_bench, machine_info
    from conftest import make_tiny_model
    from daemon_helpers import DaemonProcess, remove_tree, short_tempdir
    from prometheus_client.parser import text_string_to_metric_families
    from test_inference import tiny_tokenizer
    from sllmd import store
    from sllmd.client import Client

    httpx = httpx_module()
    with exclusive_bench("metrics_bench", log), tempfile.TemporaryDirectory(prefix="sllm-metrics-bench-") as tmp:
        tok = tiny_tokenizer()
        ckpt = Path(tmp) / "tiny"
        store.save_model(make_tiny_model("llama", seed=1, vocab_size=len(tok)), ckpt, tokenizer=tok)
        root = short_tempdir("sllm-mb-")
        daemon = DaemonProcess(root, "--http", "127.0.0.1:0", "--keep-alive", "-1", "--log-level", "info",
                               dram="256MiB", device_memory="2GiB")
        try:
            daemon.start()
            url = next(m.group(1) for n in daemon.notifications if (m := re.search(r"http on (http://\S+)", n)))
            names = [f"tiny-{i:03d}" for i in range(args.models)]
            t0 = time.perf_counter()

            def import_some(part: list[str]) -> None:
                with Client(daemon.socket, timeout=120) as ic:
                    for name in part:
                        ic.import_model(name, str(ckpt))

            with ThreadPoolExecutor(IMPORTERS) as pool:   # imports are long requests: several run at once
                list(pool.map(import_some, [names[i::IMPORTERS] for i in range(IMPORTERS)]))
            import_s = time.perf_counter() - t0
            with Client(daemon.socket, timeout=120) as c:
                log(f"imported {len(names)} models in {import_s:.1f} s")
                t0 = time.perf_counter()
                for name in names[:args.served]:
                    c.generate(name, "hello", max_tokens=2, temperature=0, chat=False)
                serve_s = time.perf_counter() - t0
                log(f"served one request on each of {args.served} models in {serve_s:.1f} s")
                times = {"http_metrics": [], "ipc_metrics": [], "http_healthz": []}
                with httpx.Client(timeout=30) as h:
                    text = h.get(url + "/metrics").text   # warm: the connection, the first collect
                    c.metrics()
                    for _ in range(args.scrapes):
                        t = time.perf_counter()
                        r = h.get(url + "/metrics")
                        times["http_metrics"].append(time.perf_counter() - t)
                        assert r.status_code == 200
                        t = time.perf_counter()
                        c.metrics()
                        times["ipc_metrics"].append(time.perf_counter() - t)
                        t = time.perf_counter()
                        h.get(url + "/healthz")
                        times["http_healthz"].append(time.perf_counter() - t)
                    text = r.text
            families = list(text_string_to_metric_families(text))
            series = sum(len(f.samples) for f in families)
        finally:
            daemon.close()
            remove_tree(root)
    result = {"models": args.models, "served": args.served, "scrapes": args.scrapes, "families": len(families),
              "samples": series, "text_bytes": len(text.encode()), "import_s": import_s, "serve_s": serve_s,
              **{k: ms_stats(v) for k, v in times.items()}, "machine": machine_info()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"| scrape ({args.models} models, {args.served} served; {series} samples, "
          f"{result['text_bytes'] / 1024:.0f} KiB) | median ms | p90 ms |")
    print("|---|---|---|")
    for key, label in (("http_metrics", "GET /metrics"), ("ipc_metrics", "sllmctl metrics (Client.metrics, IPC)"),
                       ("http_healthz", "GET /healthz (the HTTP floor)")):
        print(f"| {label} | {result[key]['median_ms']:.2f} | {result[key]['p90_ms']:.2f} |")
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
