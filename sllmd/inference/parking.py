"""Prefills parked ahead of a live migration's handoff (DESIGN.md section 9, the rounds).

While the source keeps decoding a request, the destination prefills the request's tokens so far
into a KV cache of its own, round by round (each round only the tokens added since the last).
At the handoff the instance resumes the request from its state with that cache warm, so only the
last round's few tokens are prefilled while the client waits. The instance's worker runs one
chunk at a time between its batch's steps, so parking never stalls the running batch by more
than one chunk; a parked cache unused for PARKED_TTL_S is dropped.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from .decode import new_cache, prefill

PARKED_TTL_S = 120.0


@dataclass
class Parked:
    target: list[int]                   # the tokens this round asked for
    cache: Any
    held: int = 0                       # how many of them the cache holds
    done: threading.Event = field(default_factory=threading.Event)
    touched: float = field(default_factory=time.monotonic)
    prefill_s: float = 0.0              # time spent prefilling this round


class ParkedPrefills:
    """Per request id, one parked cache and the round in progress. The instance's lock guards it."""

    def __init__(self, model, chunk: int):
        self.model, self.chunk = model, chunk
        self.entries: dict[str, Parked] = {}

    def request(self, request_id: str, ids: list[int]) -> Parked:
        """Asks for `ids` prefilled; an entry whose tokens are a prefix of them only grows."""
        p = self.entries.get(request_id)
        if p is None or ids[:p.held] != p.target[:p.held] or len(ids) < p.held:
            p = self.entries[request_id] = Parked(list(ids), new_cache(self.model))
        else:
            p.target, p.done, p.prefill_s = list(ids), threading.Event(), 0.0
        p.touched = time.monotonic()
        if p.held >= len(p.target):
            p.done.set()
        return p

    def pending(self) -> bool:
        return any(p.held < len(p.target) for p in self.entries.values())

    def next_job(self) -> Parked | None:
        now = time.monotonic()
        for rid, p in list(self.entries.items()):
            if now - p.touched > PARKED_TTL_S:
                del self.entries[rid]
        return next((p for p in self.entries.values() if p.held < len(p.target)), None)

    def step(self, p: Parked) -> None:
        """One chunk of `p`'s round (the worker, outside the instance's lock)."""
        lo, hi = p.held, min(p.held + self.chunk, len(p.target))
        t0 = time.perf_counter()
        with torch.inference_mode():
            prefill(self.model, p.target[lo:hi], p.cache)
        p.prefill_s += time.perf_counter() - t0
        p.held = hi
        if hi >= len(p.target):
            p.done.set()

    def take(self, request_id: str, all_ids: list[int]) -> tuple[Any, int] | None:
        """The warm (cache, n) for a request resuming with `all_ids`, if its parked prefix fits."""
        p = self.entries.pop(request_id, None)
        if p is None or p.held == 0 or p.held >= len(all_ids) or all_ids[:p.held] != p.target[:p.held]:
            return None
        return p.cache, p.held

    def drop(self, request_id: str) -> None:
        self.entries.pop(request_id, None)
