"""Medians, target checks and the markdown table of bench/daemon_bench.py.

A record: {"section": ttft|stream|rtt, "rep", "name", "result": {...}}. Every
figure is the median over repetitions; ratios are ratios of those medians, and
for pairs that ran back to back (streaming) also the median of per-repetition ratios.
"""
from __future__ import annotations


from common import median

TTFT_LABELS = {
    "cold": "sllmd, cold: from SSD (evicted from device + DRAM tier, page cache dropped)",
    "dram": "sllmd, from the DRAM tier (evicted from the device only)",
    "warm": "sllmd, loaded instance",
    "hf-warm": "transformers from_pretrained, fresh process, page cache warm",
    "hf-cold": "transformers from_pretrained, fresh process, page cache dropped",
}
RTT_LABELS = {
    "echo": "bare ZeroMQ ROUTER + msgpack echo",
    "sllmd-status": "sllmd `status`, bare DEALER client",
    "sllmd-ping": "sllmd `ping` (answered on the I/O thread), bare DEALER client",
    "sllmd-client": "sllmd `status` via sllmd.client.Client",
}


def _values(records: list[dict], section: str, name: str, key: str) -> dict[int, float]:
    out = {}
    for r in records:
        res = r["result"]
        if r["section"] == section and r["name"] == name and "error" not in res and res.get(key) is not None:
            out[r["rep"]] = res[key]
    return out


def _med(records, section, name, key):
    return median(list(_values(records, section, name, key).values()))


def _sub_median(records: list[dict], section: str, name: str, path: tuple[str, ...]) -> float | None:
    xs = []
    for r in records:
        if r["section"] != section or r["name"] != name or "error" in r["result"]:
            continue
        v = r["result"]
        for k in path:
            v = v.get(k) if isinstance(v, dict) else None
        if v is not None:
            xs.append(v)
    return median(xs)


def summarize(records: list[dict], meta: dict) -> dict:
    s: dict = {"ttft": {}, "stream": {}, "rtt": {}, "targets": [], "errors": [], "discarded": []}
    for r in records:
        if "error" in r["result"]:   # spoiled by another process: discarded, not a failure of ours
            (s["discarded"] if "spoiled" in r["result"] else s["errors"]).append(
                f"{r['section']} {r['name']} rep {r['rep']}: {r['result']['error']}")
    for name in TTFT_LABELS:
        row = {"ttft_s": _med(records, "ttft", name, "ttft_s"), "n": len(_values(records, "ttft", name, "ttft_s"))}
        if name.startswith("hf-"):
            for k in ("from_pretrained_s", "tokenizer_s", "first_token_s"):
                row[k] = _med(records, "ttft", name, k)
        else:
            row["daemon_ttft_s"] = _sub_median(records, "ttft", name, ("daemon", "ttft_s"))
            row["prefill_s"] = _sub_median(records, "ttft", name, ("daemon", "prefill_s"))
            if name != "warm":
                for k in ("load_s", "build_s", "tokenizer_s", "io_wait_s", "bind_s"):
                    row[k] = _sub_median(records, "ttft", name, ("load", k))
        s["ttft"][name] = row
    s["disk"] = {"gbps": _med(records, "ttft", "disk", "gbps"), "seconds": _med(records, "ttft", "disk", "seconds"),
                 "n": len(_values(records, "ttft", "disk", "gbps"))}
    for name in ("daemon", "in-process"):
        s["stream"][name] = {"tokens_per_s": _med(records, "stream", name, "tokens_per_s"),
                             "tokens": _med(records, "stream", name, "tokens")}
    d, i = (_values(records, "stream", n, "tokens_per_s") for n in ("daemon", "in-process"))
    s["stream"]["paired_ratio"] = median([d[k] / i[k] for k in d if k in i])
    for r in records:
        if r["section"] == "rtt":
            s["rtt"].setdefault(r["name"], None)
    for name in s["rtt"]:
        s["rtt"][name] = {k: _med(records, "rtt", name, k) for k in ("p50_s", "p99_s", "rps", "reply_bytes")}
    s["targets"] = targets(s, meta)
    return s


def _ratio(a, b):
    return a / b if a is not None and b else None


def targets(s: dict, meta: dict) -> list[dict]:
    t = s["ttft"]
    out = []

    def add(what, value, reference, ratio, op, limit, note=""):
        met = None if ratio is None else (ratio <= limit if op == "<=" else ratio >= limit)
        out.append({"target": what, "value": value, "reference": reference, "ratio": ratio,
                    "goal": f"{op} {limit:g}", "met": met, "note": note})

    add("TTFT from the DRAM tier / transformers from_pretrained (warm)", t["dram"]["ttft_s"],
        t["hf-warm"]["ttft_s"], _ratio(t["dram"]["ttft_s"], t["hf-warm"]["ttft_s"]), "<=", 0.2)
    nbytes, disk = meta.get("model_bytes"), s["disk"]["gbps"]
    bound = None
    if nbytes and disk and t["warm"]["ttft_s"] is not None:
        bound = nbytes / (disk * 1e9) + t["warm"]["ttft_s"]
    add("cold TTFT from SSD / (model bytes / disk limit + loaded-instance TTFT)", t["cold"]["ttft_s"], bound,
        _ratio(t["cold"]["ttft_s"], bound), "<=", 1.3,
        "" if meta.get("drop_caches") else "skipped: the page cache cannot be dropped here")
    for n in (1, 16):
        ours, echo = s["rtt"].get(f"sllmd-status-{n}"), s["rtt"].get(f"echo-{n}")
        if ours and echo:
            add(f"`status` round trip p50, {n} client(s) / bare echo", ours["p50_s"], echo["p50_s"],
                _ratio(ours["p50_s"], echo["p50_s"]), "<=", 2.0,
                f"p99 ratio {_fmt_ratio(_ratio(ours['p99_s'], echo['p99_s']))}, "
                f"req/s ratio {_fmt_ratio(_ratio(ours['rps'], echo['rps']))}")
    st = s["stream"]
    add("streamed tokens/s through sllmd / same decode loop in-process", st["daemon"]["tokens_per_s"],
        st["in-process"]["tokens_per_s"], _ratio(st["daemon"]["tokens_per_s"], st["in-process"]["tokens_per_s"]),
        ">=", 0.95, f"median of per-repetition ratios {_fmt_ratio(st['paired_ratio'])}")
    return out


# --- markdown ----------------------------------------------------------------------------------------
def _ms(x):
    return "-" if x is None else f"{x * 1e3:.1f} ms"


def _us(x):
    return "-" if x is None else f"{x * 1e6:.0f} us"


def _fmt_ratio(x):
    return "-" if x is None else f"{x:.2f}"


def markdown(s: dict, meta: dict) -> str:
    m = meta.get("machine", {})
    la0, la1 = meta.get("loadavg_start", (0, 0, 0)), meta.get("loadavg_end", (0, 0, 0))
    lines = [f"### sllmd serving SmolLM2-135M-Instruct (bf16, {meta.get('model_bytes', 0) / 2**20:.0f} MiB)", "",
             f"{meta.get('date')}, commit {meta.get('git_commit')}{' (dirty)' if meta.get('git_dirty') else ''}, "
             f"{m.get('cpus')} CPUs ({m.get('cpu', '?')}), {m.get('mem_gib')} GiB; "
             f"load average {la0[0]:.2f}/{la0[1]:.2f}/{la0[2]:.2f} at the start, "
             f"{la1[0]:.2f}/{la1[1]:.2f}/{la1[2]:.2f} at the end; {meta.get('elapsed_s', 0):.0f} s; "
             f"`{meta.get('command')}`", "",
             "| target | sllmd | reference | ratio | goal | met |", "| --- | ---: | ---: | ---: | ---: | :---: |"]
    for t in s["targets"]:
        unit = _us if "round trip" in t["target"] else (
            (lambda x: "-" if x is None else f"{x:.1f}/s") if "tokens/s" in t["target"] else _ms)
        met = {True: "yes", False: "**no**", None: "n/a"}[t["met"]]
        note = f" ({t['note']})" if t["note"] else ""
        lines.append(f"| {t['target']}{note} | {unit(t['value'])} | {unit(t['reference'])} | "
                     f"{_fmt_ratio(t['ratio'])} | {t['goal']} | {met} |")
    lines += ["", "Time to first token (client clock: `infer` sent -> first token received; "
              "median of {} runs):".format(max((r.get("n", 0) for r in s["ttft"].values()), default=0)), "",
              "| how | TTFT | as sllmd timed it | inside: load (build / tokenizer / io wait / bind) "
              "| prefill + first token |", "| --- | ---: | ---: | --- | ---: |"]
    for name, label in TTFT_LABELS.items():
        r = s["ttft"][name]
        if r["ttft_s"] is None:
            lines.append(f"| {label} | skipped | | | |")
            continue
        if name.startswith("hf-"):
            inside = (f"from_pretrained {_ms(r['from_pretrained_s'])}, tokenizer + template "
                      f"{_ms(r['tokenizer_s'])}")
            first = _ms(r["first_token_s"])
        else:
            inside = "-" if r.get("load_s") is None else (
                f"{_ms(r['load_s'])} ({_ms(r['build_s'])} / {_ms(r['tokenizer_s'])} / {_ms(r['io_wait_s'])} / "
                f"{_ms(r['bind_s'])})")
            first = _ms(r["prefill_s"])
        lines.append(f"| {label} | {_ms(r['ttft_s'])} | {_ms(r.get('daemon_ttft_s'))} | {inside} | {first} |")
    d = s["disk"]
    if d["gbps"]:
        lines.append(f"| disk limit on the store's data file (O_DIRECT, best of fio and preadv) | "
                     f"{_ms(d['seconds'])} | | {d['gbps']:.2f} GB/s | |")
    if s["rtt"]:
        lines += ["", "Round trips (requests/s summed over clients, one request outstanding per client):", "",
                  "| server | clients | p50 | p99 | requests/s | reply bytes |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
        for name, r in sorted(s["rtt"].items(), key=lambda kv: (int(kv[0].rsplit("-", 1)[1]), kv[0])):
            base, n = name.rsplit("-", 1)
            lines.append(f"| {RTT_LABELS.get(base, base)} | {n} | {_us(r['p50_s'])} | {_us(r['p99_s'])} | "
                         f"{r['rps']:.0f} | {int(r['reply_bytes']) if r['reply_bytes'] else '-'} |" if r["rps"] else f"| {base} | {n} | - | - | - | - |")
    st = s["stream"]
    if st["daemon"]["tokens_per_s"]:
        lines += ["", f"Streaming: {st['daemon']['tokens']:.0f} greedy tokens, decode rate after the first token: "
                  f"{st['daemon']['tokens_per_s']:.1f}/s through sllmd, {st['in-process']['tokens_per_s']:.1f}/s "
                  "in-process (sllmd.inference Generation on the same checkpoint)."]
    if s["errors"]:
        lines += ["", "Errors:"] + [f"- {e}" for e in s["errors"]]
    if s["discarded"]:
        lines += ["", "Discarded (left out of the medians):"] + [f"- {e}" for e in s["discarded"]]
    return "\n".join(lines)
