"""sllmctl verbs that talk to a running sllmd: import, models, show, load, ps, evict, rm, pin, unpin,
infer, status.

Every verb takes --socket (default $SLLMD_SOCKET, else the per-user path, else
/run/sllmd/sllmd.sock), --timeout and --json (before or after the verb). Exit
codes: 0 ok, 1 error, 2 usage, 69 daemon not running, 75 busy or timed out.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from sllmd.client import Client
from sllmd.config import ConfigError, parse_duration
from sllmd.errors import InvalidArgumentError

from .output import Progress, fmt_ago, fmt_bytes, fmt_count, fmt_span, fmt_until, print_json, print_table, table


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _client(args) -> Client:
    return Client(socket=args.socket, timeout=args.timeout, client_name=f"sllmctl {args.verb}")


def tier_sizes(m: dict) -> tuple[int | None, int | None, int | None]:
    """(bytes on disk, in DRAM, on the device) of a `models`/`ps` entry; None where it is not in that tier.
    Uses the daemon's explicit per-tier fields (ssd_bytes, dram_bytes, device_bytes), else infers them
    from an older daemon's size_bytes and tiers."""
    tiers = m.get("tiers") or []
    disk = m.get("ssd_bytes", m.get("size_bytes") if "ssd" in tiers else None)
    dram = m.get("dram_bytes", m.get("checkpoint_bytes") if "dram" in tiers else None)
    device = m.get("device_bytes")
    return disk, dram, device


def fmt_eviction(last: dict | None, now: float) -> str:
    """{"tier", "reason", "at"} -> 'device (idle) 2m00s ago'; '-' when never evicted."""
    if not last:
        return "-"
    return f"{last.get('tier', '?')} ({last.get('reason', '?')}) {fmt_ago(last.get('at'), now)}"


# --- verbs ------------------------------------------------------------------------------------------
def import_note(event: str, data: dict, last: dict) -> str | None:
    """The line an import event deserves on stderr, if any: every model evicted to make room;
    each new phase (with the elapsed time), each quarter of a counted one (GGUF tensors being
    dequantized) and every 10 s of a long one. `last` remembers what was shown."""
    if event == "evicted":
        return (f"evicted {data.get('name')} from the store to make room ({data.get('reason')}, "
                f"{fmt_bytes(data.get('size_bytes'))}, last used {fmt_ago(data.get('last_used'), time.time())})")
    if event != "phase" or data.get("unit") == "bytes":  # bytes written have the live progress line
        return None
    done, total = data.get("done", 0), data.get("total", 0)
    step = 4 * done // total if total else int(data.get("phase_elapsed_s", 0) // 10)  # a long phase: every 10 s
    key = (data.get("phase"), step)
    if key == last.get("key"):
        return None
    last["key"] = key
    counted = f" {done}/{total} {data.get('unit')}" if total else ""
    return f"{data.get('phase')}{counted} ({data.get('elapsed_s', 0):.1f}s)"


def cmd_import(args) -> int:
    progress = Progress(f"importing {args.name}")
    shown: dict = {}

    def on_event(event: str, data: dict) -> None:
        line = import_note(event, data, shown)
        if line is not None:
            progress.note(line)

    with _client(args) as c:
        try:
            info = c.import_model(args.name, args.source, progress=progress, on_event=on_event,
                                  no_tokenizer=args.no_tokenizer)
        finally:
            progress.end()
    sys.stderr.write(f"imported {args.name} in {progress.elapsed:.1f}s\n")
    if args.json:
        print_json(info)
    return 0


def cmd_models(args) -> int:
    with _client(args) as c:
        models = c.models(all=True) if getattr(args, "all", False) else c.models()
        on_device = {}
        if not args.json and any("device" in (m.get("tiers") or []) and "device_bytes" not in m for m in models):
            on_device = {i.get("name"): i.get("size_bytes") for i in c.ps()}   # an older daemon: ask ps
    if args.json:
        print_json(models)
        return 0
    now = time.time()
    rows = []
    for m in models:
        disk, dram, device = tier_sizes(m)
        device = device if device is not None else on_device.get(m.get("name"))
        rows.append(([str(m.get("node", "?"))] if args.all else []) + [
            m.get("name", "?"), fmt_bytes(disk), fmt_bytes(dram), fmt_bytes(device),
            str(m.get("state", "?")), "yes" if m.get("pinned") else "no", fmt_ago(m.get("last_used"), now),
            fmt_eviction(m.get("last_evicted"), now)])
    print_table((["NODE"] if args.all else []) + ["NAME", "DISK", "DRAM", "DEVICE", "STATE", "PINNED", "LAST USED",
                                                  "LAST EVICTED"], rows)
    return 0


def already_loaded(load_reply: dict) -> bool:
    """Whether `load` found an instance there already (an older daemon does not say: its weights
    "from the device tier" mean the same)."""
    return bool(load_reply.get("already_loaded", load_reply.get("load_tier") == "device"))


def cmd_load(args) -> int:
    with _client(args) as c:
        info = c.load(args.name, keep_alive=args.keep_alive)
    if args.json:
        print_json(info)
        return 0
    expires = info.get("expires_at")
    kept = "kept loaded until stopped" if expires is None else f"unloaded when idle {fmt_until(expires, time.time())}"
    if already_loaded(info):
        print(f"{args.name} is already loaded; {kept}")
    else:
        load = f" from {info['load_tier']} in {info['load_s']:.2f}s" if info.get("load_tier") else ""
        print(f"{args.name} loaded{load}; {kept}")
    return 0


def cmd_ps(args) -> int:
    with _client(args) as c:
        instances = c.ps(all=True) if getattr(args, "all", False) else c.ps()
    if args.json:
        print_json(instances)
        return 0
    now = time.time()
    rows = [([str(i.get("node", "?"))] if args.all else []) + [i.get("name", "?"), fmt_bytes(i.get("device_bytes", i.get("size_bytes"))), str(i.get("device", "-")),
             str(i.get("state", "?")), str(i.get("active_requests", 0)), str(i.get("queued", 0)),
             _batch_of(i), fmt_bytes(i.get("kv_bytes")) if i.get("kv_bytes") else "-",
             fmt_until(i.get("expires_at"), now)] for i in instances]
    print_table((["NODE"] if args.all else []) + ["NAME", "DEVICE SIZE", "DEVICE", "STATE", "RUNNING", "QUEUED",
                                                  "BATCH", "KV", "UNTIL"], rows)
    return 0


def _batch_of(instance: dict) -> str:
    """"3/8": requests decoding together now, of the instance's max batch ("-" from an older daemon)."""
    if instance.get("max_batch") is None:
        return "-"
    return f"{instance.get('batch_size', 0)}/{instance['max_batch']}"


def cmd_evict(args) -> int:
    with _client(args) as c:
        info = c.evict(args.name, tier=args.tier, force=args.force)
    if args.json:
        print_json(info)
    else:
        gone = ", ".join(info.get("evicted") or []) if isinstance(info, dict) else ""
        if isinstance(info, dict) and info.get("cancelled_import"):
            print(f"cancelled the import of {args.name}")
        else:
            print(f"evicted {args.name} from {gone or 'nothing (it was not there)'}")
    return 0


def cmd_rm(args) -> int:
    with _client(args) as c:
        info = c.remove(args.name, force=args.force) or {}
    cancelled = bool(info.get("cancelled_import"))
    if args.json:
        print_json({"name": args.name, "removed": True, "cancelled_import": cancelled})
    else:
        print(f"cancelled the import of {args.name}" if cancelled else f"removed {args.name}")
    return 0


def cmd_pin(args) -> int:
    pinned = args.verb == "pin"
    with _client(args) as c:
        (c.pin if pinned else c.unpin)(args.name)
    if args.json:
        print_json({"name": args.name, "pinned": pinned})
    else:
        print(f"{args.verb}ned {args.name}")
    return 0


def read_prompt(prompt: str) -> str:
    """PROMPT as given, or all of stdin for "-" (trailing newlines dropped, as the shell's $(...) does:
    `echo QUESTION | sllmctl infer NAME -` asks what `sllmctl infer NAME QUESTION` asks)."""
    if prompt != "-":
        return prompt
    text = sys.stdin.read().rstrip("\n")
    if not text.strip():
        raise InvalidArgumentError("the prompt read from stdin is empty")
    return text


def cmd_infer(args) -> int:
    out = sys.stdout
    last = ""
    prompt = read_prompt(args.prompt)
    with _client(args) as c:
        stream = c.infer(args.name, prompt, max_tokens=args.max_tokens, temperature=args.temperature,
                         top_p=args.top_p, seed=args.seed, stop=args.stop or None, keep_alive=args.keep_alive,
                         chat=not args.raw, node=args.node)
        with stream:
            for event in stream.events():
                if args.json:
                    out.write(json.dumps(event, default=str) + "\n")
                elif event["type"] == "token" and event["text"]:
                    last = event["text"]
                    out.write(last)
                out.flush()
    if not args.json and not last.endswith("\n"):
        out.write("\n")
    if args.stats and stream.stats is not None:
        sys.stderr.write(json.dumps(stream.stats, default=str) + "\n")
    return 0


def cmd_show(args) -> int:
    with _client(args) as c:
        info = c.show(args.name)
    if args.json:
        print_json(info)
        return 0
    print(describe_model(info, template=args.template))
    return 0


def describe_model(info: dict, template: bool = False) -> str:
    """`show`'s text: the model, where it sits and how big it is per tier, its chat template."""
    disk, dram, device = tier_sizes(info)
    shape = info.get("shape") or {}
    lines = [["model", info.get("name", "?")],
             ["architecture", f"{info.get('architecture') or '-'} ({info.get('model_type') or '?'})"],
             ["parameters", fmt_count(info.get("parameters"))],
             ["context length", str(info.get("context_length") or "-")],
             ["dtype", str(info.get("dtype") or "-")]]
    if shape:
        lines.append(["shape", ", ".join(f"{k.replace('num_', '').replace('_', ' ')} {v}" for k, v in shape.items())])
    lines += [["state", f"{info.get('state', '?')}" + (f" ({info['error']})" if info.get("error") else "")],
              ["on disk", fmt_bytes(disk)], ["in DRAM", fmt_bytes(dram)], ["on device", fmt_bytes(device)],
              ["pinned", "yes" if info.get("pinned") else "no"],
              ["last evicted", fmt_eviction(info.get("last_evicted"), time.time())],
              ["path", str(info.get("path") or "-")]]
    text = table(None, lines)
    chat = info.get("chat_template")
    if not chat:
        return text + "\nchat template: none (prompts are sent as plain text)"
    if template:
        return text + "\nchat template:\n" + chat.rstrip("\n")
    first = chat.strip().splitlines()[0] if chat.strip() else ""
    return text + f"\nchat template: {len(chat)} characters ({first[:60]}{'...' if len(first) > 60 else ''}); " \
                  "--template prints it"


LOADER_PATHS = (("read_direct", "bytes_direct", "from disk (O_DIRECT)"), ("read_cached", "bytes_cached",
                "from the page cache"), ("copy", "bytes_copied", "copied"), ("h2d", "bytes_h2d", "host->device"))


def loader_line(c: dict) -> str:
    """The loader counters in one line: bytes per path, each at bytes over its elapsed time."""
    rates = c.get("bandwidth_bytes_per_s") or {}
    parts = []
    for path, nbytes, what in LOADER_PATHS:
        if not c.get(nbytes) and path != "read_direct":
            continue
        rate = rates.get(path)
        parts.append(f"{fmt_bytes(c.get(nbytes, 0))} {what}" + (f" at {rate / 1e9:.2f} GB/s" if rate else ""))
    if c.get("dram_hits"):
        parts.append(f"{c['dram_hits']} DRAM-tier hit(s), {fmt_bytes(c.get('bytes_dram', 0))}")
    return (f"loader: {c.get('loads', 0)} load(s), {c.get('failures', 0)} failure(s); " + "; ".join(parts)).rstrip("; ")


def cmd_status(args) -> int:
    with _client(args) as c:
        status = c.status()
    if args.json:
        print_json(status)
        return 0
    daemon = status.get("daemon", {})
    print(f"sllmd {daemon.get('version', '?')} (protocol {daemon.get('protocol', '?')}), pid {daemon.get('pid', '?')}, "
          f"up {fmt_span(status.get('uptime_s', daemon.get('uptime_s', 0)))}, device {status.get('device', '?')}")
    print(f"socket {daemon.get('socket', '?')}, {daemon.get('requests_in_flight', 0)} request(s) in flight")
    rows = []
    for name, tier in (status.get("tiers") or {}).items():
        cap = tier.get("capacity_bytes")
        used = tier.get("used_bytes", 0)
        pct = f"{100 * used / cap:.0f}%" if cap else "-"
        count = tier.get("models", tier.get("instances", ""))
        rows.append([name, fmt_bytes(used), fmt_bytes(cap) if cap is not None else "unlimited", pct, str(count)])
    print_table(["TIER", "USED", "CAPACITY", "USE", "MODELS"], rows)
    loader = status.get("loader") or {}
    if loader:
        print(loader_line(loader))
    loads = status.get("loads")
    if loads:
        print("loads: " + ", ".join(f"{loads.get(k, 0)} {k.replace('_', ' ')}"
                                    for k in ("ok", "failed", "busy", "cancelled", "in_flight")))
    for inst in status.get("instances") or []:
        if inst.get("max_batch") is not None:
            kv = f", KV cache {fmt_bytes(inst['kv_bytes'])} reserved" if inst.get("kv_bytes") else ""
            print(f"instance {inst.get('name', '?')}: batch {_batch_of(inst)} decoding, "
                  f"{inst.get('active_requests', 0)} running, {inst.get('queued', 0)} queued{kv}")
    return 0


# --- registration ---------------------------------------------------------------------------------------
DEFAULT_MAX_TOKENS = 256   # the daemon's default (sllmd.inference.SamplingParams.max_tokens)


def add_sampling_options(p: argparse.ArgumentParser) -> None:
    """The generation options of `infer` and `run`; None means the daemon's default, named in the help."""
    p.add_argument("--max-tokens", type=int, metavar="N", help=f"generate at most N tokens (default: {DEFAULT_MAX_TOKENS})")
    p.add_argument("--temperature", type=float, metavar="T", help="sampling temperature; 0 is greedy (default: 0)")
    p.add_argument("--top-p", type=float, metavar="P", help="nucleus sampling: keep tokens up to probability P "
                                                            "(default: 1)")
    p.add_argument("--seed", type=int, metavar="S", help="seed of the sampler (default: a fresh one per request)")
    p.add_argument("--stop", action="append", metavar="TEXT", help="stop before TEXT (repeatable)")
    p.add_argument("--keep-alive", type=_duration, metavar="DUR",
                   help="keep the model loaded this long once idle: 5m, 30s, -1 = forever, 0 = unload after "
                        "(default: the daemon's keep_alive, 5m unless configured)")


def register(subparsers) -> None:
    def verb(name, func, help):
        p = subparsers.add_parser(name, help=help, description=help)
        p.set_defaults(func=func)
        return p

    p = verb("import", cmd_import, "import SOURCE (our format, a HF directory, .safetensors, .gguf, or the URL of "
                                   "a repository or of a model in one) as NAME")
    p.add_argument("name")
    p.add_argument("source")
    p.add_argument("--no-tokenizer", action="store_true",
                   help="accept a model that has no tokenizer (default: refused, as it could not serve text)")
    p = verb("models", cmd_models, "list the models in the store: size on disk, in DRAM, on the device, state")
    p.add_argument("--all", action="store_true", help="every cluster node's models, with a NODE column")
    p = verb("show", cmd_show, "show NAME: architecture, parameters, context length, dtype, size per tier, "
                               "chat template")
    p.add_argument("name")
    p.add_argument("--template", action="store_true", help="print the whole chat template")
    p = verb("load", cmd_load, "load NAME into the device tier")
    p.add_argument("name")
    p.add_argument("--keep-alive", type=_duration, metavar="DUR",
                   help="stay loaded this long once idle: 5m, 30s, -1 = forever, 0 = unload after "
                        "(default: the daemon's keep_alive, 5m unless configured)")
    p = verb("ps", cmd_ps, "list the running instances")
    p.add_argument("--all", action="store_true", help="every cluster node's instances, with a NODE column")
    p = verb("evict", cmd_evict, "evict NAME from a tier")
    p.add_argument("name")
    p.add_argument("--tier", choices=["device", "dram", "ssd"], default="device",
                   help="device unloads the instance, dram drops the cached copy, ssd removes the model")
    p.add_argument("--force", action="store_true", help="with --tier ssd: remove the model even if it is pinned")
    p = verb("rm", cmd_rm, "remove NAME from every tier and the store (an import in flight is cancelled)")
    p.add_argument("name")
    p.add_argument("--force", action="store_true", help="remove the model even if it is pinned")
    for name, text in (("pin", "keep NAME in the store under capacity pressure"), ("unpin", "undo pin")):
        p = verb(name, cmd_pin, text)
        p.add_argument("name")
    p = verb("infer", cmd_infer, "generate from NAME, streaming the text to stdout")
    p.add_argument("name")
    p.add_argument("prompt", help='the prompt; "-" reads it from stdin (trailing newlines dropped)')
    add_sampling_options(p)
    p.add_argument("--raw", action="store_true", help="send PROMPT as is, without the chat template")
    p.add_argument("--stats", action="store_true", help="print the request's stats as JSON on stderr")
    p.add_argument("--node", metavar="NAME", help="run on this cluster node (default: the one placement picks)")
    verb("status", cmd_status, "show the daemon's tiers, loader counters and uptime")
