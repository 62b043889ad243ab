"""Whether a node's device has room for one more model, and how long until it does (pure functions).

A model that is not loaded must first get device room. Idle instances are evicted for it at
once (the device tier does so); busy ones are not: the load waits until enough of them finish.
So a holder whose device is full of busy instances of other models is not `q + size/b` away but
that plus the wait, and that wait is what the migration option (sllmd.cluster.make_room) can
cut short by moving those instances' requests elsewhere (DESIGN.md sections 8 and 9).

Read from a node's locality state: tiers.device {free_bytes, capacity_bytes}, instances
{name, device_bytes, active_requests, queued, leases, queue_delay_s}, requests {model,
tokens_out, max_tokens, age_s} and the model's `load_bytes` (what its instance would take).
A state without device figures (the simulator's, an older peer's) has room.
"""
from __future__ import annotations

import dataclasses

UNKNOWN_BUSY_S = 30.0   # a busy instance whose remaining work cannot be estimated (no finished request yet)


@dataclasses.dataclass(frozen=True)
class Room:
    wait_s: float                 # until enough busy instances finish (0: room now)
    blocking: tuple[str, ...]     # the busy instances (model names) that must empty first, soonest first
    needed_bytes: int


NO_WAIT = Room(0.0, (), 0)


def _busy(inst: dict) -> bool:
    return bool(int(inst.get("active_requests") or 0) or int(inst.get("queued") or 0)
                or int(inst.get("leases") or 0))


def remaining_s(inst: dict, requests: list[dict]) -> float:
    """How long until `inst` has no request left: its slowest request's remaining tokens at the
    rate it has decoded so far (age / tokens out), else its queue delay estimate."""
    mine = [r for r in requests if r.get("model") == inst.get("name")]
    best = None
    for r in mine:
        out, cap, age = int(r.get("tokens_out") or 0), r.get("max_tokens"), float(r.get("age_s") or 0.0)
        if out <= 0 or cap is None or age <= 0:
            continue
        left = max(int(cap) - out, 0) * age / out
        best = left if best is None else max(best, left)
    if best is not None:
        return best
    delay = inst.get("queue_delay_s")
    return float(delay) if isinstance(delay, (int, float)) else UNKNOWN_BUSY_S


def room_for(state: dict, info: dict) -> Room:
    """The device room the model `info` (a state's model entry) would get on this node."""
    device = (state.get("tiers") or {}).get("device") or {}
    capacity = device.get("capacity_bytes")
    need = info.get("load_bytes") or info.get("checkpoint_bytes") or info.get("ssd_bytes")
    if not capacity or not need:
        return NO_WAIT
    need = int(need)
    free = int(device.get("free_bytes") or 0)
    instances = [i for i in state.get("instances") or [] if isinstance(i, dict)]
    free += sum(int(i.get("device_bytes") or 0) for i in instances if not _busy(i))
    if free >= need:
        return NO_WAIT
    if need > int(capacity):
        return NO_WAIT   # it never fits: the node answers that itself, no wait to price
    requests = [r for r in state.get("requests") or [] if isinstance(r, dict)]
    busy = sorted(((remaining_s(i, requests), str(i.get("name"))), int(i.get("device_bytes") or 0))
                  for i in instances if _busy(i))
    blocking, wait = [], 0.0
    for (left, name), nbytes in busy:
        blocking.append(name)
        wait = left
        free += nbytes
        if free >= need:
            break
    return Room(wait, tuple(blocking), need)
