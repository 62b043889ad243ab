"""Fixed `watch` updates for the TUI's screen snapshots: node "a" serving two requests on smol
while qwen-0.5b loads cold from the SSD (counters growing at a steady, known rate). Nothing in
them depends on the clock: the times start at T0."""
from __future__ import annotations

MiB = 1 << 20
T0 = 1_800_000_000.0   # 2027-01-15 08:00:00 UTC
LOADING = 988 * MiB


def _model(name, tiers, state, ssd, dram=None, device=None, pinned=False):
    return {"name": name, "state": state, "tiers": tiers, "ssd_bytes": ssd, "dram_bytes": dram,
            "device_bytes": device, "size_bytes": ssd, "pinned": pinned, "last_used": T0 - 30, "node": "a"}


def update(seq: int, h2d: int, direct: int, tokens_out: int, events=()) -> dict:
    t = T0 + 0.5 * seq
    models = [_model("smol", ["ssd", "dram", "device"], "loaded", 270 * MiB, 272 * MiB, 540 * MiB, pinned=True),
              _model("qwen-0.5b", ["ssd"], "loading", LOADING),
              _model("tiny", ["ssd", "dram"], "in_dram", 450 * 1024, 16 * MiB)]
    ps = [{"name": "smol", "device": "cpu", "state": "loaded", "active_requests": 2, "queued": 1, "batch_size": 2,
           "max_batch": 8, "kv_bytes": 24 * MiB, "expires_at": T0 + 300, "device_bytes": 540 * MiB, "node": "a"}]
    reqs = [{"id": "3f2a9c1e77aa", "model": "smol", "state": "running", "tokens_in": 21, "tokens_out": tokens_out,
             "age_s": 4.0 + 0.5 * seq, "node": "a"},
            {"id": "9b01c4d2e0ff", "model": "smol", "state": "running", "tokens_in": 9,
             "tokens_out": tokens_out // 2, "age_s": 2.0 + 0.5 * seq, "node": "a"},
            {"id": "c0ffee000001", "model": "smol", "state": "queued", "tokens_in": 40, "tokens_out": 0,
             "age_s": 0.4, "node": "a"}]
    tiers = {"ssd": {"used_bytes": 1258 * MiB, "capacity_bytes": 8192 * MiB, "models": 3},
             "dram": {"used_bytes": 288 * MiB, "capacity_bytes": 2048 * MiB, "models": 2},
             "device": {"used_bytes": 564 * MiB, "capacity_bytes": 4096 * MiB, "instances": 1}}
    status = {"device": "cpu", "uptime_s": 754.0 + 0.5 * seq, "tiers": tiers,
              "loads": {"ok": 2, "failed": 0, "in_flight": 1}}
    loader = {"bytes_direct": direct, "bytes_cached": 4 * MiB, "bytes_read": direct + 4 * MiB, "bytes_copied": h2d,
              "bytes_h2d": 0, "loads": 3}
    nodes = [{"name": "a", "status": "alive", "self": True, "last_heard": t,
              "state": {"device": "cpu", "tiers": tiers, "models": models, "instances": ps}},
             {"name": "b", "status": "alive", "last_heard": t - 1,
              "state": {"device": "cpu", "tiers": {"device": {"used_bytes": 0, "capacity_bytes": 4096 * MiB}},
                        "models": models[:1], "instances": []}},
             {"name": "c", "status": "failed", "last_heard": T0 - 9}]
    return {"seq": seq, "time": t, "dropped": 0, "events": list(events),
            "snapshot": {"status": status, "models": models, "ps": ps, "requests": reqs, "nodes": nodes,
                         "loader": loader}}


HOST = {"memory_used_bytes": 9 * 1024 * MiB, "memory_total_bytes": 24 * 1024 * MiB,
        "disk_read_bytes_per_s": 310 * MiB, "store_disk": None, "gpus": None}
GPU_HOST = dict(HOST, gpus=[{"index": 0, "name": "NVIDIA H200", "memory_used_bytes": 3 << 30,
                             "memory_total_bytes": 140 << 30, "pcie_tx_bytes_per_s": 1e8,
                             "pcie_rx_bytes_per_s": 2.5e10}])


def updates(n: int = 24) -> list[dict]:
    """n updates half a second apart; the load starts at the 6th and is 60% done at the last."""
    out, moved = [], 0
    for seq in range(n):
        step = (40 + 25 * (seq % 7)) * MiB if seq > 4 else 0
        moved += step
        ev = []
        if seq == 2:
            ev.append({"kind": "request_started", "time": T0 + 1, "id": "9b01c4d2e0ff", "model": "smol"})
        if seq == 3:
            ev.append({"kind": "evicted", "time": T0 + 1.5, "name": "gpt2-tiny", "tier": "device", "reason": "idle"})
        if seq == 4:
            ev.append({"kind": "node", "time": T0 + 2, "node": "c", "status": "failed"})
        if seq == 5:
            ev.append({"kind": "load_started", "time": T0 + 2.5, "name": "qwen-0.5b", "tier": "ssd",
                       "total": LOADING})
        if seq > 5:
            ev.append({"kind": "load_progress", "time": T0 + 0.5 * seq, "name": "qwen-0.5b", "tier": "ssd",
                       "done": min(moved, 600 * MiB), "total": LOADING})
        out.append(update(seq, moved, moved, 12 * seq, ev))
    return out
