"""Explicit model states (DESIGN.md section 4).

A model's state says where it is and what is happening to it. The node derives
it from the tiers (`derive_state`) each time it is asked, so it cannot
contradict them; there is no separate record to keep in step. The life cycle
those derived states follow:

    on_ssd / in_dram ──► loading ──► loaded ──► evicting ──► in_dram / on_ssd
                            │  ▲                   │
                            ▼  └───────────────────┘ (requested again while stopping)
                          failed ──► loading (a retry)
    loaded ──► migrating ──► loaded / evicting
"""
from __future__ import annotations

from enum import Enum


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
