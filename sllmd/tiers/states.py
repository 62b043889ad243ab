"""Explicit model states (DESIGN.md section 4).

A model's state says where it is and what is happening to it. The node derives
it from the tiers (`derive_state`), so it cannot contradict them. The graph
below is the life cycle those derived states follow; `StateMachine` checks a
sequence of them against it.

    on_ssd / in_dram ──► loading ──► loaded ──► evicting ──► in_dram / on_ssd
                            │  ▲                   │
                            ▼  └───────────────────┘ (requested again while stopping)
                          failed ──► loading (a retry)
    loaded ──► migrating ──► loaded / evicting
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Any


class Tier(str, Enum):
    SSD = "ssd"
    DRAM = "dram"
    DEVICE = "device"

    @staticmethod
    def parse(value: str) -> "Tier":
        try:
            return Tier(value)
        except ValueError:
            raise ValueError(f"unknown tier {value!r} (expected one of: ssd, dram, device)") from None


TIER_ORDER = (Tier.DEVICE, Tier.DRAM, Tier.SSD)  # fastest first


class ModelState(str, Enum):
    ON_SSD = "on_ssd"
    IN_DRAM = "in_dram"
    LOADING = "loading"
    LOADED = "loaded"
    MIGRATING = "migrating"
    EVICTING = "evicting"
    FAILED = "failed"


class EvictReason(str, Enum):
    LRU = "lru"  # a cache tier (DRAM, SSD) replaced its least recently used entry to admit another
    IDLE = "idle"  # keep_alive ran out
    MANUAL = "manual"  # someone asked (evict, rm)
    PRESSURE = "pressure"  # the device budget needed room for another instance
    FAILED = "failed"  # the model's load failed: its DRAM copy is not kept


_S = ModelState
ALLOWED: dict[ModelState, frozenset[ModelState]] = {
    _S.ON_SSD: frozenset({_S.LOADING, _S.IN_DRAM, _S.EVICTING}),
    _S.IN_DRAM: frozenset({_S.LOADING, _S.ON_SSD, _S.EVICTING}),
    _S.LOADING: frozenset({_S.LOADED, _S.FAILED, _S.IN_DRAM, _S.ON_SSD}),
    _S.LOADED: frozenset({_S.EVICTING, _S.MIGRATING, _S.FAILED}),
    _S.MIGRATING: frozenset({_S.LOADED, _S.EVICTING, _S.FAILED}),
    # evicting -> loading: a request came back while the old instance was still stopping
    _S.EVICTING: frozenset({_S.ON_SSD, _S.IN_DRAM, _S.LOADING, _S.LOADED, _S.FAILED}),
    _S.FAILED: frozenset({_S.LOADING, _S.ON_SSD, _S.IN_DRAM, _S.EVICTING}),
}


def derive_state(*, broken: bool = False, loading: bool = False, on_device: bool = False, stopping: bool = False,
                 failed: bool = False, in_dram: bool = False) -> ModelState:
    """A model's state from what the tiers hold (the node reports this, so `models` and
    `ps` can never contradict the tiers): broken = its checkpoint on disk is unusable;
    loading = a load is in flight (or holds a device reservation); on_device = a ready
    instance; stopping = an evicted instance is still stopping; failed = its last load
    failed and nothing newer happened; in_dram = a copy is cached in the DRAM tier."""
    if broken:
        return ModelState.FAILED
    if on_device:
        return ModelState.LOADED
    if loading:
        return ModelState.LOADING
    if stopping:
        return ModelState.EVICTING
    if failed:
        return ModelState.FAILED
    if in_dram:
        return ModelState.IN_DRAM
    return ModelState.ON_SSD


class InvalidTransition(RuntimeError):
    """A programming error: the state machine was asked for a transition it does not have."""


@dataclass
class StateRecord:
    state: ModelState
    tier: Tier | None = Tier.SSD  # the fastest tier holding the model
    device: str | None = None  # where its instance runs, when it has one
    since: float = field(default_factory=time.time)  # wall clock of the last transition
    reason: EvictReason | None = None  # why the last eviction happened
    error: str | None = None  # why the last load failed

    def to_dict(self) -> dict[str, Any]:
        return {"state": self.state.value, "tier": self.tier.value if self.tier else None, "device": self.device,
                "since": self.since, "reason": self.reason.value if self.reason else None, "error": self.error}


class StateMachine:
    """One model's state with its history of the last few transitions (not thread-safe:
    the owner's lock guards it)."""

    HISTORY = 16

    def __init__(self, state: ModelState = ModelState.ON_SSD, tier: Tier | None = Tier.SSD):
        self.record = StateRecord(state, tier)
        self.history: list[StateRecord] = []

    @property
    def state(self) -> ModelState:
        return self.record.state

    def transition(self, state: ModelState, *, tier: Tier | None = None, device: str | None = None,
                   reason: EvictReason | None = None, error: str | None = None,
                   now: float | None = None, force: bool = False) -> StateRecord:
        """Moves to `state`; InvalidTransition unless ALLOWED (or force, for callers that
        know the tiers' truth better than the record)."""
        cur = self.record.state
        if state != cur and state not in ALLOWED[cur] and not force:
            raise InvalidTransition(f"{cur.value} -> {state.value} is not a model state transition")
        self.history.append(self.record)
        del self.history[:-self.HISTORY]
        # Leaving `evicting`, the record keeps saying why the model was evicted.
        keep_reason = reason if reason is not None else (self.record.reason if cur == _S.EVICTING else None)
        self.record = StateRecord(state, tier if tier is not None else _default_tier(state, self.record.tier),
                                  device, time.time() if now is None else now, keep_reason, error)
        return self.record


def _default_tier(state: ModelState, previous: Tier | None) -> Tier | None:
    if state in (_S.LOADED, _S.MIGRATING):
        return Tier.DEVICE
    if state == _S.IN_DRAM:
        return Tier.DRAM
    if state == _S.ON_SSD:
        return Tier.SSD
    return previous
