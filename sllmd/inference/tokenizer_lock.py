"""A tokenizer shared by threads: every call into it holds one lock.

A fast (Rust) tokenizer is not safe to use from several threads at once (its
truncation/padding state is mutable; concurrent calls fail with "Already
borrowed"). An instance's tokenizer is used by the server's threads (submit
tokenizes the prompt) and by the worker (detokenizing each row of the batch),
so the instance wraps it: `LockedTokenizer` forwards attributes and holds a
lock, shared by every wrapper of the same tokenizer object, around each method
call. Encoding a prompt takes about a millisecond, so the lock is never held long.
"""
from __future__ import annotations

import functools
import threading
import weakref
from typing import Any

_locks: "weakref.WeakKeyDictionary[Any, threading.RLock]" = weakref.WeakKeyDictionary()
_locks_lock = threading.Lock()


def _lock_of(tokenizer) -> threading.RLock:
    with _locks_lock:
        lock = _locks.get(tokenizer)
        if lock is None:
            lock = _locks[tokenizer] = threading.RLock()
        return lock


class LockedTokenizer:
    """The tokenizer's attributes, its methods called under its lock."""

    def __init__(self, tokenizer):
        inner = tokenizer.inner if isinstance(tokenizer, LockedTokenizer) else tokenizer
        object.__setattr__(self, "inner", inner)
        object.__setattr__(self, "lock", _lock_of(inner))

    def __getattr__(self, name: str) -> Any:
        value = getattr(self.inner, name)
        if not callable(value) or isinstance(value, type):
            return value
        lock = self.lock

        @functools.wraps(value)
        def locked(*args, **kwargs):
            with lock:
                return value(*args, **kwargs)
        return locked

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self.inner, name, value)

    def __call__(self, *args, **kwargs):
        with self.lock:
            return self.inner(*args, **kwargs)

    def __len__(self) -> int:
        with self.lock:
            return len(self.inner)

    def __repr__(self) -> str:
        return f"LockedTokenizer({self.inner!r})"


def unwrap(tokenizer):
    """The tokenizer itself (for code that keeps it beyond this instance)."""
    return tokenizer.inner if isinstance(tokenizer, LockedTokenizer) else tokenizer
