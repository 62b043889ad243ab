"""Loading a model instance from the fastest tier that holds its checkpoint.

    DRAM tier hit:  pool chunks -> device buffers (no disk)
    SSD, DRAM room: disk -> pool chunks -> device buffers in one pipelined pass
                    (on CUDA, each chunk copied as soon as it is read and verified)
    SSD, no room:   disk -> device buffers (on CUDA through a small pinned staging ring)

While the bytes move (native threads, GIL released), this thread builds the
transformers model on `meta` and the tokenizer, so the ~1 s of Python work
overlaps the I/O; then the tensors are bound into the model (assign=True).
A compute dtype other than the stored one (sllmd.inference.compute_dtype) casts
the bound tensors into one new buffer once the bytes are in.
"""
from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..inference import compute_dtype as cdt
from ..pool import HostArena, LoadOptions
from ..pool import buffers as pool_buffers
from ..store.format import Checkpoint
from ..store.model import apply_generation_config, as_dtype, bind_state_dict, build_empty_model, load_tokenizer
from ..store.reader import fill_partitions, tensor_views
from . import footprint
from .dram import DramTier

log = logging.getLogger(__name__)


def device_bytes(ckpt: Checkpoint, device: str, arena: HostArena | None, compute_dtype: str | None = None) -> int:
    """What an instance of `ckpt` takes from the device budget: its partition buffers, or
    its cast buffer when `compute_dtype` casts it (rounded as the arena rounds them on a CPU host);
    on CUDA also its KV cache and a prefill's activations (tiers/footprint.py)."""
    target = cdt.target_for(ckpt, compute_dtype, device)
    parts = [cdt.cast_nbytes(ckpt, target)] if target is not None else [p.nbytes for p in ckpt.manifest.partitions
                                                                           if p.nbytes]
    if torch.device(device).type == "cpu":
        if arena is not None:
            return sum(-(-n // pool_buffers.ARENA_GRANULE) * pool_buffers.ARENA_GRANULE for n in parts)
        return sum(parts)
    return sum(parts) + footprint.runtime_bytes_of(ckpt, dtype=target)


@dataclass
class Loaded:
    model: Any
    tokenizer: Any
    tier: str  # where the bytes came from: "dram" or "ssd"
    seconds: float
    timings: dict[str, float]


def _in_thread(fn: Callable[[], Any]) -> Future:
    fut: Future = Future()

    def run() -> None:
        try:
            fut.set_result(fn())
        except BaseException as e:  # handed to whoever waits
            fut.set_exception(e)

    threading.Thread(target=run, name="sllm-load-io", daemon=True).start()
    return fut


def _fill(name: str, ckpt: Checkpoint, bufs: list[torch.Tensor], dram: DramTier | None, verify: bool,
          options: LoadOptions | None) -> str:
    """Fills the device buffers from the fastest tier holding the model; returns that tier."""
    cached = dram.acquire(name) if dram is not None else None
    if cached is not None:
        try:
            cached.load_into(bufs)
            return "dram"
        finally:
            dram.release(name)
    # One pass: SSD -> DRAM chunks -> device buffers, the stages overlapping.
    if dram is not None and dram.admit(name, ckpt, verify=verify, device_buffers=bufs, options=options) is not None:
        dram.release(name)
        return "ssd"
    fill_partitions(ckpt, bufs, verify=verify, options=options)  # not cacheable: straight in
    return "ssd"


def build_skeleton(ckpt: Checkpoint):
    """The checkpoint's transformers model with its parameters on `meta` (no memory):
    what a load binds the tensors into. Built ahead of time, it takes the model
    construction (~0.1-0.3 s; 1-3 s the first time in a process) off a load's path."""
    stored = ckpt.manifest.model.get("dtype")
    try:
        dtype = as_dtype(stored) if stored else None
    except Exception:
        dtype = None  # not a floating dtype: build with the config's
    return build_empty_model(ckpt.path, dtype=dtype, architecture=ckpt.manifest.model.get("architecture"))


def load_instance(name: str, ckpt: Checkpoint, device: str, *, dram: DramTier | None = None,
                  arena: HostArena | None = None, verify: bool = True, options: LoadOptions | None = None,
                  tokenizer: Any = None, skeleton: Any = None, compute_dtype: str | None = None) -> Loaded:
    """A ready-to-generate model (and its tokenizer) for checkpoint `ckpt` on `device`;
    `skeleton` (from build_skeleton, or a Future of one; used once) saves building the
    model here. `compute_dtype` (auto, bf16, fp16, fp32; None: as stored) casts the
    weights after loading; the arena then holds the cast buffer, the staging is freed."""
    t0 = time.perf_counter()
    dev = torch.device(device)
    target = cdt.target_for(ckpt, compute_dtype, device)
    host_arena = arena if dev.type == "cpu" else None
    # The tensors are views of buffers allocated up front, so the model is built
    # and bound while the bytes are still arriving; only the first forward needs them.
    bufs = [pool_buffers.allocate(p.nbytes, dev, host_arena if target is None else None)
            for p in ckpt.manifest.partitions]
    io = _in_thread(lambda: _fill(name, ckpt, bufs, dram, verify, options))
    try:
        model = None
        if isinstance(skeleton, Future):  # still being built in the background: wait for it
            try:
                model = skeleton.result(timeout=60)
            except Exception as e:
                log.debug("the prebuilt skeleton of %s failed (%s); building it here", name, e)
        elif skeleton is not None:
            model = skeleton
        if model is None:
            model = build_skeleton(ckpt)
        t_build = time.perf_counter()
        bind_state_dict(model, tensor_views(ckpt, bufs), dev)
        t_bind = time.perf_counter()
        if tokenizer is None:
            tokenizer = load_tokenizer(ckpt.path)
        t_tok = time.perf_counter()
    finally:
        tier = io.result()  # always wait: no load outlives this call (and a failed read fails the load)
    t_io = time.perf_counter()
    if target is not None:
        cdt.cast_bound(model, target, bufs, lambda n: pool_buffers.allocate(n, dev, host_arena))
        del bufs  # the stored bytes are no longer referenced: the staging goes back
    t_cast = time.perf_counter()
    apply_generation_config(model, ckpt.exec_dir())
    t_end = time.perf_counter()
    timings = {"build_s": t_build - t0, "bind_s": t_bind - t_build, "tokenizer_s": t_tok - t_bind,
               "io_wait_s": t_io - t_tok, "cast_s": t_cast - t_io}
    log.info("loaded %s on %s from %s in %.3f s (%s)", name, device, tier, t_end - t0,
             ", ".join(f"{k} {v:.3f}" for k, v in timings.items()))
    return Loaded(model, tokenizer, tier, t_end - t0, timings)
