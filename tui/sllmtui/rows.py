"""The rows every panel shows, as plain strings: the widgets and the `--once` text print the
same figures (sllmctl's formatters, so `top` and `sllmctl models` agree)."""
from __future__ import annotations

import time

from sllmctl.output import fmt_ago, fmt_bytes, fmt_span, fmt_until

from .state import TIERS, NodeView, View, fastest_tier

TIER_LABELS = {"device": "device", "dram": "DRAM", "ssd": "SSD"}


def fmt_short(n: float | None) -> str:
    """Bytes in at most 4 characters and a unit letter: 564M, 4.0G, 450K (for narrow bars)."""
    if n is None:
        return "-"
    for unit in ("B", "K", "M", "G", "T"):
        if abs(n) < 1024 or unit == "T":
            return f"{n:.0f}{unit}" if unit == "B" or abs(n) >= 100 else f"{n:.1f}{unit}"
        n /= 1024
    raise AssertionError("unreachable")


def fmt_rate(bps: float | None) -> str:
    """Bytes per second, binary units, three significant figures: '180 MiB/s', '1.25 GiB/s'."""
    if bps is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(bps) < 1024 or unit == "TiB":
            digits = 0 if unit == "B" or abs(bps) >= 100 else 1 if abs(bps) >= 10 else 2
            return f"{bps:.{digits}f} {unit}/s"
        bps /= 1024
    raise AssertionError("unreachable")


def tier_usage(node: NodeView, host: dict | None) -> list[tuple[str, int, int | None]]:
    """(label, used, capacity) per tier; the SSD tier without a capacity of its own is limited by
    the store's disk (used + free), known for the local node."""
    out = []
    for tier in TIERS:
        t = node.tiers.get(tier)
        if t is None:
            continue
        used, cap = int(t.get("used_bytes") or 0), t.get("capacity_bytes") or None
        if cap is None and tier == "ssd" and node.local and host and host.get("store_disk"):
            cap = used + int(host["store_disk"]["free_bytes"])
        out.append((TIER_LABELS[tier], used, cap))
    return out


MODEL_COLUMNS = ("NAME", "TIER", "STATE", "DEVICE", "DRAM", "SSD", "PIN")


def model_rows(node: NodeView) -> list[tuple[str, list[str]]]:
    """(name, cells) per model: its fastest tier, state and bytes per tier (per-model occupancy)."""
    rows = []
    for m in node.models:
        name = str(m.get("name", "?"))
        state = str(m.get("state", "?"))
        rows.append((name, [name, fastest_tier(m), state, fmt_bytes(m.get("device_bytes")),
                            fmt_bytes(m.get("dram_bytes")), fmt_bytes(m.get("ssd_bytes", m.get("size_bytes"))),
                            "yes" if m.get("pinned") else ""]))
    return rows


INSTANCE_COLUMNS = ("NAME", "STATE", "RUN", "QUEUE", "BATCH", "KV", "UNTIL")


def instance_rows(node: NodeView, now: float) -> list[tuple[str, list[str]]]:
    rows = []
    for i in node.instances:
        batch = "-" if i.get("max_batch") is None else f"{i.get('batch_size', 0)}/{i['max_batch']}"
        rows.append((str(i.get("name", "?")), [
            str(i.get("name", "?")), str(i.get("state", "?")), str(i.get("active_requests", 0)),
            str(i.get("queued", 0)), batch, fmt_bytes(i.get("kv_bytes")) if i.get("kv_bytes") else "-",
            fmt_until(i.get("expires_at"), now)]))
    return rows


REQUEST_COLUMNS = ("ID", "MODEL", "TOK/S", "IN/OUT", "STATE", "AGE")


def request_rows(node: NodeView, view: View) -> list[tuple[str, list[str]]]:
    rows = []
    for r in node.requests:
        rid = str(r.get("id", "?"))
        rate = view.token_rates.get(rid)
        tin = r.get("tokens_in")
        rows.append((rid, [rid[:8], str(r.get("model", "?")), "-" if rate is None else f"{rate:.1f}",
                           f"{'-' if tin is None else tin}/{r.get('tokens_out', 0)}", str(r.get("state", "?")),
                           fmt_span(float(r.get("age_s") or 0))]))
    return rows


NODE_COLUMNS = ("NAME", "STATUS", "DEVICE", "DEV USE", "MODELS", "RUN", "QUEUE", "HEARD")


def node_rows(view: View, now: float) -> list[tuple[str, list[str]]]:
    """A row per cluster member; without a cluster, the node itself (as `sllmctl nodes` lists it)."""
    rows = []
    nodes = view.nodes
    if not nodes and view.updates:
        me = view.node_view()
        nodes = [{"name": me.name, "status": "alive", "self": True,
                  "state": {"device": me.device, "tiers": me.tiers, "models": me.models, "instances": me.instances}}]
    for n in nodes:
        state = n.get("state") or {}
        dev = (state.get("tiers") or {}).get("device") or {}
        cap = dev.get("capacity_bytes")
        use = f"{100 * (dev.get('used_bytes') or 0) / cap:.0f}%" if cap else "-"
        inst = state.get("instances") or []
        name = str(n.get("name", "?"))
        rows.append((name, [name + (" *" if n.get("self") else ""), str(n.get("status", "?")),
                            str(state.get("device", "-")), use, str(len(state.get("models") or [])),
                            str(sum(int(i.get("active_requests") or 0) for i in inst)),
                            str(sum(int(i.get("queued") or 0) for i in inst)),
                            "now" if n.get("self") else fmt_ago(n.get("last_heard"), now)]))
    return rows


def header_line(view: View) -> str:
    status = view.status
    node = view.node_view()
    where = f"node {node.name}" + ("" if node.local else " (remote)")
    parts = ["sllmd", where, node.device]
    if status.get("uptime_s") is not None and node.local:
        parts.append(f"up {fmt_span(float(status['uptime_s']))}")
    running = sum(1 for r in node.requests if r.get("state") != "queued")
    parts.append(f"{running} running, {len(node.requests) - running} queued")
    loads = (status.get("loads") or {}).get("in_flight")
    if loads and node.local:
        parts.append(f"{loads} loading")
    if len(view.nodes) > 1:
        parts.append(f"{len(view.nodes)} nodes (n: next)")
    if view.dropped:
        parts.append(f"{view.dropped} update(s) coalesced")
    return " · ".join(parts)


def event_line(ev: dict) -> str:
    """One event as a log line: its time of day, kind and what it is about."""
    stamp = time.strftime("%H:%M:%S", time.localtime(float(ev.get("time") or 0)))
    kind = str(ev.get("kind", "?"))
    skip = {"kind", "time"}
    name = ev.get("name") or ev.get("model") or ev.get("node") or ""
    details = []
    for k, v in ev.items():
        if k in skip or v in (None, "", [], {}) or v == name or (k == "done" and not v) \
                or (k == "total" and v == ev.get("bytes")):
            continue
        if isinstance(v, float):
            v = f"{v:.3g}"
        elif isinstance(v, int) and (k.endswith("bytes") or (k in ("done", "total") and kind.startswith("load"))):
            v = fmt_bytes(v)
        details.append(f"{k}={v}")
    return f"{stamp} {kind} {name} {' '.join(details)}".rstrip()


def render_text(view: View, host: dict | None, now: float | None = None) -> str:
    """The whole screen as plain text (`--once`)."""
    from sllmctl.output import table
    now = time.time() if now is None else now
    node = view.node_view()
    out = [header_line(view), ""]
    usage = tier_usage(node, host)
    if host:
        usage.append(("host RAM", host["memory_used_bytes"], host["memory_total_bytes"]))
    out.append(table(["TIER", "USED", "CAPACITY", "USE"], [
        [label, fmt_bytes(used), fmt_bytes(cap) if cap else "unlimited", f"{100 * used / cap:.0f}%" if cap else "-"]
        for label, used, cap in usage]))
    rate = view.rate_now()
    line = (f"host->device {fmt_rate(rate['h2d'])}; disk read {fmt_rate(rate['disk_direct'] + rate['disk_cached'])} "
            f"(direct {fmt_rate(rate['disk_direct'])}, buffered {fmt_rate(rate['disk_cached'])})")
    if host and host.get("disk_read_bytes_per_s") is not None:
        line += f"; host disks {fmt_rate(host['disk_read_bytes_per_s'])}"
    out += ["", line]
    for g in (host or {}).get("gpus") or []:
        out.append(f"GPU {g['index']} {g['name']}: memory {fmt_bytes(g['memory_used_bytes'])} of "
                   f"{fmt_bytes(g['memory_total_bytes'])}, PCIe rx {fmt_rate(g['pcie_rx_bytes_per_s'])} "
                   f"tx {fmt_rate(g['pcie_tx_bytes_per_s'])}")
    for load in view.loads.values():
        pct = f" {100 * load.done / load.total:.0f}%" if load.total else ""
        out.append(f"loading {load.name}{' from ' + load.tier if load.tier else ''}{pct}")
    for title, cols, rows in (("models", MODEL_COLUMNS, model_rows(node)),
                              ("instances", INSTANCE_COLUMNS, instance_rows(node, now)),
                              ("requests", REQUEST_COLUMNS, request_rows(node, view)),
                              ("nodes", NODE_COLUMNS, node_rows(view, now))):
        out += ["", f"{title}:" + ("" if rows else " none")]
        if rows:
            out.append(table(list(cols), [cells for _, cells in rows], indent="  "))
    return "\n".join(out) + "\n"
