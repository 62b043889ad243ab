"""What a model's next load can skip: its transformers model already built on
`meta` (a "skeleton") and its tokenizer already loaded.

Built in the background -- at start, after an import, after an eviction -- so
that a load only moves bytes and binds them. The first model build in a
process also pays 1-3 s of imports; this pays it before the first request.
Its lock is a leaf: nothing else is called while holding it.
"""
from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Callable, Iterable

from ..store.format import open_checkpoint
from ..store.model import load_tokenizer
from .loader import build_skeleton

log = logging.getLogger(__name__)


class Preparer:
    def __init__(self, stopped: Callable[[], bool]):
        self._stopped = stopped
        self._lock = threading.Lock()
        self._skeletons: dict[str, Future] = {}  # built, or being built
        self._tokenizers: dict[str, Any] = {}
        self._threads: list[threading.Thread] = []

    def prepare(self, models: Iterable[tuple[str, Path]]) -> None:
        """Starts preparing (name, checkpoint path) pairs in a background thread."""
        t = threading.Thread(target=self._run, args=(list(models),), name="sllm-prepare", daemon=True)
        with self._lock:
            self._threads = [w for w in self._threads if w.is_alive()] + [t]
        t.start()

    def warm_up(self, device: str = "cpu") -> None:
        """Runs one forward pass of a tiny model on `device` in the background: the first
        forward in a process pays 0.1-0.5 s of one-time torch/transformers set-up (on CUDA
        also the context and kernel loading), which would otherwise land on the first
        request's time to first token."""
        t = threading.Thread(target=_warm_up, args=(device,), name="sllm-warm-up", daemon=True)
        with self._lock:
            self._threads.append(t)
        t.start()

    def take_skeleton(self, name: str) -> Future | None:
        """The prepared skeleton (a Future: it may still be building), handed out once."""
        with self._lock:
            return self._skeletons.pop(name, None)

    def is_prepared(self, name: str) -> bool:
        """Whether the next load of `name` finds its model built and its tokenizer loaded."""
        with self._lock:
            fut = self._skeletons.get(name)
            return fut is not None and fut.done() and fut.exception() is None and name in self._tokenizers

    def tokenizer(self, name: str) -> Any:
        with self._lock:
            return self._tokenizers.get(name)

    def keep_tokenizer(self, name: str, tokenizer: Any) -> None:
        with self._lock:
            self._tokenizers[name] = tokenizer

    def forget(self, name: str) -> None:
        with self._lock:
            self._skeletons.pop(name, None)
            self._tokenizers.pop(name, None)

    def join(self, timeout: float) -> None:
        """Waits for background builds (one patches torch process-wide: none may outlive the node)."""
        with self._lock:
            threads = list(self._threads)
        for t in threads:
            t.join(timeout)

    def _run(self, models: list[tuple[str, Path]]) -> None:
        for name, path in models:
            if self._stopped():
                return
            with self._lock:
                fut = None if name in self._skeletons else self._skeletons.setdefault(name, Future())
                need_tokenizer = name not in self._tokenizers
            if fut is None and not need_tokenizer:
                continue
            t0 = time.perf_counter()
            try:
                ckpt = open_checkpoint(path)
                if fut is not None:
                    fut.set_result(build_skeleton(ckpt))
                tokenizer = load_tokenizer(path) if need_tokenizer else None
            except Exception as exc:  # a broken model fails its own load later, with its own error
                if fut is not None and not fut.done():
                    fut.set_exception(exc)
                log.debug("preparing %s failed: %s", name, exc)
                continue
            if tokenizer is not None:
                with self._lock:
                    self._tokenizers.setdefault(name, tokenizer)
            log.debug("prepared %s in %.2f s", name, time.perf_counter() - t0)


def _warm_up(device: str = "cpu") -> None:
    t0 = time.perf_counter()
    try:
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        from ..store.model import MODEL_CONSTRUCTION_LOCK
        config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                             num_attention_heads=2, num_key_value_heads=1)
        with MODEL_CONSTRUCTION_LOCK:
            model = LlamaForCausalLM(config).eval()
        model.to(device)
        with torch.inference_mode():
            model(torch.arange(4, device=device).unsqueeze(0), use_cache=True)
    except Exception as exc:  # an optimisation only: never fatal
        log.debug("warm-up failed: %s", exc)
        return
    log.debug("warm-up forward done in %.2f s", time.perf_counter() - t0)
