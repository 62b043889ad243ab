"""An instance: a loaded model serving its requests as one continuous batch.

One worker thread steps every running request of the instance together
(DESIGN.md section 7). Each turn of its loop: requests that were cancelled
leave; queued requests are admitted while the batch has room (`max_batch`) and
the device budget has room for their KV cache; one prefill chunk of the oldest
request still prefilling runs, and of the next ones while the turn's prefill
budget (prefill_chunk tokens) lasts (each prefilled alone into its own cache;
once done it samples its first token and joins the batch: batch.BatchKV); then one decode
step feeds the last token of every request in the batch through the model and
samples each row with that request's own generator, stop strings and limits
(generation.Generation.accept). A request that finishes leaves the batch at
once. A newcomer therefore waits at most one decode step per prefill chunk, and
the batch waits at most about one chunk's worth of prefill per step.

Beyond `max_batch` requests queue (bounded: a full queue raises BusyError at
once, nothing is dropped silently). The prompt is tokenized and checked against
the context at submit, so a prompt that cannot fit fails there
(InvalidRequestError). Closing a handle, or setting the `cancelled` event given
to submit, cancels the request (queued: it never runs; running: it leaves the
batch before the next step or prefill chunk; the others go on unchanged).

`resume(state)` continues a RequestState (prompt, output so far, sampler state,
detokenizer position) inside the running batch: the entry point live migration
uses (DESIGN.md section 9). It is prefilled with all its tokens and goes on
with the same random stream, streaming only the text not yet sent.

KV-cache memory: with a `kv_budget` (the device tier), a request is admitted
only when the budget has room for the batch's cache at its worst case (every
row padded to the longest row's prompt + max_tokens, capped at the context);
otherwise it stays queued until a running request leaves, so a running request
never fails for want of memory. The first request of a batch runs in the room
its instance's load reserved (one full-context sequence on CUDA), so a request
alone never waits. The batch's reservation is given back as requests leave.
"""
from __future__ import annotations

import collections
import copy
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import torch

from sllmd.errors import (BusyError, InferenceError, InstanceClosedError, InvalidRequestError, RequestCancelledError,
                          SllmError)

from . import batch as batch_mod
from .batch import BatchKV
from .decode import PREFILL_CHUNK_TOKENS, build_prompt_ids, check_prompt_fits, context_limit, stop_token_ids
from .generation import Generation
from .handle import RequestHandle
from .parking import ParkedPrefills
from .request import InferRequest, RequestState
from .tokenizer_lock import LockedTokenizer

log = logging.getLogger(__name__)

__all__ = ["Instance", "RequestHandle", "KvBudget"]


class KvBudget(Protocol):
    """Where an instance's KV cache is counted (the device tier's budget)."""

    def try_reserve(self, nbytes: int) -> bool: ...

    def release(self, nbytes: int) -> None: ...


@dataclass
class _Running:
    """A request admitted into the batch (prefilling, or decoding with the others)."""
    handle: RequestHandle
    gen: Generation
    need_tokens: int  # the most tokens its KV cache can hold: prompt + max_tokens, capped at the context
    started: float
    base_tokens: int  # output tokens it came with (a resumed request)
    first_at: float | None = None
    last_at: float | None = None
    peak_batch: int = 0
    extra: dict = field(default_factory=dict)


class Instance:
    """A model on a device, serving its requests as one batch on one worker thread."""

    def __init__(self, name: str, model, tokenizer, *, device: str, nbytes: int, queue_depth: int = 16,
                 on_finished: Callable[["Instance", RequestHandle], None] | None = None,
                 prefill_chunk: int = PREFILL_CHUNK_TOKENS, max_batch: int = 1,
                 kv_budget: KvBudget | None = None):
        if queue_depth < 1:
            raise ValueError("queue_depth must be >= 1")
        if prefill_chunk < 1:
            raise ValueError("prefill_chunk must be >= 1")
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self.name, self.model = name, model
        self.tokenizer = LockedTokenizer(tokenizer)  # submit (server threads) and the worker both use it
        self.device, self.nbytes, self.queue_depth = device, nbytes, queue_depth
        self.on_finished = on_finished
        self.prefill_chunk = prefill_chunk
        if max_batch > 1 and not batch_mod.supported(model):
            log.info("%s: its KV cache cannot be batched (sliding-window or other layers); one request at a time",
                     name)
            max_batch = 1
        self.max_batch = max_batch
        self.kv_budget = kv_budget
        self.kv_per_token = batch_mod.kv_bytes_per_token(model) if kv_budget is not None else 0
        self.kv_reserved = 0  # bytes of the budget the batch holds now
        self.eos = stop_token_ids(model, tokenizer)
        self.context = context_limit(model)
        self._lock = threading.Lock()
        self._queue: collections.deque[RequestHandle] = collections.deque()
        self._wake = threading.Condition(self._lock)
        self._prefilling: list[_Running] = []  # admitted, prefill not finished (oldest first)
        self._batch: list[_Running] = []  # decoding; index = row of self._kv
        self._kv = BatchKV(model)
        self._parked = ParkedPrefills(model, prefill_chunk)   # live migration's rounds, arriving here
        self._closing = False
        self.served = 0
        self.peak_batch = 0
        self._thread = threading.Thread(target=self._work, name=f"instance-{name}", daemon=True)
        self._thread.start()

    # --- submitter side -------------------------------------------------------
    def submit(self, request: InferRequest, arrived_at: float | None = None,
               cancelled: threading.Event | None = None) -> RequestHandle:
        """Queues a request; InvalidRequestError when its prompt is empty or does not fit the
        context, BusyError when the queue is full, InstanceClosedError once closing."""
        arrived_at = time.perf_counter() if arrived_at is None else arrived_at
        prompt_ids = build_prompt_ids(self.tokenizer, request)
        check_prompt_fits(len(prompt_ids), self.context, self.name)
        return self._enqueue(RequestHandle(request, arrived_at, prompt_ids, cancelled))

    def resume(self, state: RequestState, arrived_at: float | None = None,
               cancelled: threading.Event | None = None) -> RequestHandle:
        """Continues a request from its state inside the running batch (live migration's
        entry point): the handle streams only what comes after `state`. InvalidRequestError
        when the state is finished or for another model, else as submit."""
        if state.finished:
            raise InvalidRequestError(f"request {state.request_id} has already finished ({state.finish_reason})")
        if not state.prompt_ids:
            raise InvalidRequestError("a request state needs at least one prompt token")
        if state.model != self.name:
            raise InvalidRequestError(f"request {state.request_id} is for {state.model!r}, not {self.name!r}")
        if len(state.output_ids) >= state.sampling.max_tokens:
            raise InvalidRequestError(f"request {state.request_id} has no tokens left (max_tokens reached)")
        check_prompt_fits(len(state.all_ids), self.context, self.name)
        arrived_at = time.perf_counter() if arrived_at is None else arrived_at
        request = InferRequest(state.model, prompt="", raw=True, sampling=state.sampling, request_id=state.request_id)
        return self._enqueue(RequestHandle(request, arrived_at, list(state.prompt_ids), cancelled,
                                           resume_from=copy.deepcopy(state)))

    def find(self, request_id: str) -> RequestHandle | None:
        """The handle of the running or queued request `request_id`, or None."""
        with self._lock:
            for h in [r.handle for r in self._batch + self._prefilling] + list(self._queue):
                if h.request.request_id == request_id and not h.done.is_set():
                    return h
        return None

    def handoff(self, handle: RequestHandle, timeout: float) -> RequestState | None:
        """Live migration: stops `handle`'s request at its next token boundary and returns its
        whole state (a queued one hands over its prompt); the handle then yields one
        {"type": "migrated", "state": ...} event and ends. None when it finished first."""
        handle.handoff_wanted = True
        with self._wake:
            self._wake.notify_all()
        deadline = time.monotonic() + timeout
        while not handle.handed_off.wait(0.02):
            if handle.done.is_set() or time.monotonic() > deadline:
                return handle.handoff_state if handle.handed_off.is_set() else None
        return handle.handoff_state

    def park(self, request_id: str, ids: list[int], timeout: float) -> dict:
        """Live migration's round on the destination: prefills `ids` (a running request's tokens
        so far, on another node) into a cache kept for that request; a later round only adds
        the tokens after the last one. resume() of that request then starts warm. Blocks until
        this round is prefilled. (A parked cache is not counted in the KV budget: it lives
        for the few seconds of a migration.)"""
        if not ids:
            raise InvalidRequestError("nothing to prefill")
        check_prompt_fits(len(ids) + 1, self.context, self.name)
        with self._wake:
            if self._closing:
                raise InstanceClosedError(f"model {self.name!r} is being unloaded; retry")
            p = self._parked.request(request_id, ids)
            self._wake.notify_all()
        if not p.done.wait(timeout):
            raise InferenceError(f"prefilling {len(ids)} tokens for {request_id} took over {timeout:.0f} s")
        if p.held < len(ids):
            raise InferenceError(f"the prefill for {request_id} failed")
        return {"parked": p.held, "prefill_s": p.prefill_s}

    def _park_one(self) -> None:
        """One chunk of a migration round's prefill, between the batch's steps."""
        with self._lock:
            p = self._parked.next_job()
        if p is None:
            return
        try:
            self._parked.step(p)
        except BaseException:
            log.exception("%s: a migration round's prefill failed", self.name)
            with self._lock:
                self._parked.entries = {k: v for k, v in self._parked.entries.items() if v is not p}
            p.done.set()

    def _enqueue(self, handle: RequestHandle) -> RequestHandle:
        with self._lock:
            if self._closing:
                raise InstanceClosedError(f"model {self.name!r} is being unloaded; retry")
            if len(self._queue) >= self.queue_depth:
                raise BusyError(f"model {self.name!r} is busy: {len(self._queue)} requests already queued "
                                f"(queue depth {self.queue_depth}); retry later")
            self._queue.append(handle)
            handle._withdraw = self._withdraw
            self._wake.notify()
        return handle

    def _withdraw(self, handle: RequestHandle) -> None:
        """A queued request was cancelled: it leaves the queue and never runs. (A running
        one is seen cancelled by the worker before its next step.)"""
        with self._lock:
            try:
                self._queue.remove(handle)
            except ValueError:
                self._wake.notify()  # running (or finished): the worker drops it
                return
        handle.finish_reason = "cancelled"
        self._complete(handle, RequestCancelledError(f"request {handle.request.request_id} was cancelled"))

    def _complete(self, handle: RequestHandle, final: Any) -> None:
        handle._finish(final)
        if self.on_finished is not None:
            try:
                self.on_finished(self, handle)
            except Exception:
                log.exception("on_finished callback failed for %s", self.name)

    @property
    def queued(self) -> int:
        with self._lock:
            return len(self._queue)

    @property
    def active(self) -> int:
        """Requests in the batch now (prefilling or decoding)."""
        with self._lock:
            return len(self._batch) + len(self._prefilling)

    @property
    def batch_size(self) -> int:
        """Requests decoding together in the current step."""
        with self._lock:
            return len(self._batch)

    @property
    def kv_used_bytes(self) -> int:
        """KV-cache bytes the batch holds now (rows padded to the longest)."""
        with self._lock:
            return self._kv.size * self._kv.width * self.kv_per_token

    def requests(self) -> list[dict[str, Any]]:
        """The running requests (decoding, then prefilling), then the queued ones in order:
        id, model, tokens in/out, state, age."""
        with self._lock:
            handles = [(r.handle, "running", r) for r in self._batch] \
                + [(r.handle, "prefill", r) for r in self._prefilling] + [(h, "queued", None) for h in self._queue]
        now = time.perf_counter()
        out = []
        for h, state, r in handles:
            st = h.state
            base = r.base_tokens if r is not None else 0
            out.append({"id": h.request.request_id, "model": self.name,
                        "state": "migrating" if h.handoff_wanted or h.migrating_to else state,
                        "migrating_to": h.migrating_to,
                        "tokens_in": len(h.prompt_ids) if h.prompt_ids is not None else None,
                        "tokens_out": max(0, len(st.output_ids) - base) if st is not None else 0,
                        "max_tokens": h.request.sampling.max_tokens, "age_s": now - h.arrived_at})
        return out

    @property
    def busy(self) -> bool:
        with self._lock:
            return bool(self._batch or self._prefilling or self._queue)

    def close(self, timeout: float | None = None, drain: bool = True) -> bool:
        """Stops taking requests; queued ones get InstanceClosedError; running ones finish
        (drain; cancelled if still running after `timeout`) or are cancelled at once.
        True when the worker stopped."""
        with self._lock:
            self._closing = True
            dropped = list(self._queue)
            self._queue.clear()
            running = [r.handle for r in self._batch + self._prefilling]
            self._wake.notify_all()
        if not drain:
            for h in running:
                h._cancel.set()
        for h in dropped:
            h._finish(InstanceClosedError(f"model {self.name!r} was unloaded before the request ran"))
        if threading.current_thread() is self._thread:
            return False
        self._thread.join(timeout)
        if self._thread.is_alive() and drain:
            # Out of time: the running requests end with an error instead of finishing.
            with self._lock:
                running = [r.handle for r in self._batch + self._prefilling]
            for h in running:
                log.warning("%s: request %s did not finish in time; cancelling it", self.name, h.request.request_id)
                h._cancel.set()
            self._thread.join(5.0)
        return not self._thread.is_alive()

    # --- worker side ------------------------------------------------------------
    def _work(self) -> None:
        # Grad mode is per thread: without this, every batched decode step recorded autograd history
        # through the weights (they require grad) and the KV cache grown from it (0.80x of one request's
        # own decode loop, measured)
        with torch.inference_mode():
            self._loop()

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not (self._queue or self._batch or self._prefilling or self._closing or self._parked.pending()):
                    self._wake.wait()
                if self._closing and not (self._queue or self._batch or self._prefilling):
                    return  # closing and drained
            try:
                self._drop_cancelled()
                self._hand_off()
                self._admit()
                self._prefill_some()
                self._park_one()
                self._decode_step()
            except BaseException:  # a bug in the loop itself: fail what runs, keep serving
                log.exception("%s: the batch loop failed", self.name)
                self._fail(self._batch + self._prefilling, InferenceError("the batch loop failed"))

    def _kv_needed(self, needs: list[int]) -> int:
        """Budget bytes for a batch whose rows can grow to `needs` tokens, every row padded to
        the longest. The first row is the instance's own: its load counted one full-context
        sequence (tiers/footprint.py on CUDA; on a CPU host the KV cache is process heap beside
        the arena), so a request alone never waits for KV room; each further row does."""
        return max(0, len(needs) - 1) * max(needs, default=0) * self.kv_per_token

    def _admit(self) -> None:
        """Moves queued requests into the batch while it has room (max_batch, KV budget)."""
        while True:
            with self._lock:
                if not self._queue or len(self._batch) + len(self._prefilling) >= self.max_batch:
                    return
                handle = self._queue[0]
                running = self._batch + self._prefilling
            if handle.cancelled:
                handle.cancel()  # withdraws it from the queue
                continue
            try:
                state = self._initial_state(handle)
                warm = None
                if handle.resume_from is not None:   # its tokens, prefilled here by a migration's rounds
                    with self._lock:
                        warm = self._parked.take(state.request_id, state.all_ids)
                gen = Generation(self.model, self.tokenizer, state, self.eos, prefill_chunk=self.prefill_chunk,
                                 warm=warm)
            except BaseException as e:
                log.exception("request %s on %s could not start", handle.request.request_id, self.name)
                self._reject(handle, e if isinstance(e, SllmError) else InferenceError(f"{type(e).__name__}: {e}"))
                continue
            need = len(state.all_ids) + state.sampling.max_tokens - len(state.output_ids)
            need = min(need, self.context) if self.context is not None else need
            delta = 0
            if self.kv_budget is not None:
                delta = max(0, self._kv_needed([r.need_tokens for r in running] + [need]) - self.kv_reserved)
                if delta and not self.kv_budget.try_reserve(delta):
                    return  # it waits in the queue until a running request leaves (one always runs: delta > 0)
            with self._lock:
                if not self._queue or self._queue[0] is not handle:  # cancelled meanwhile
                    if delta:
                        self.kv_budget.release(delta)
                    continue
                self._queue.popleft()
                self.kv_reserved += delta
                handle.state = state
                handle.prefill_chunks_total = gen.prefill_chunks_total
                self._prefilling.append(_Running(handle, gen, need, time.perf_counter(), len(state.output_ids)))

    def _initial_state(self, handle: RequestHandle) -> RequestState:
        if handle.resume_from is not None:
            return handle.resume_from
        req = handle.request
        prompt_ids = handle.prompt_ids if handle.prompt_ids is not None else build_prompt_ids(self.tokenizer, req)
        return RequestState(req.request_id, req.model, req.sampling, prompt_ids)

    def _reject(self, handle: RequestHandle, error: SllmError) -> None:
        with self._lock:
            try:
                self._queue.remove(handle)
            except ValueError:
                return
        handle.finish_reason = "error"
        self._complete(handle, error)

    def _drop_cancelled(self) -> None:
        with self._lock:
            gone = [r for r in self._batch + self._prefilling if r.handle.cancelled]
        for r in gone:
            r.gen.state.finish_reason = "cancelled"
            if r in self._prefilling and r.gen.prefill_chunks_done < r.gen.prefill_chunks_total:
                log.info("request %s on %s cancelled during its prefill, after %d of %d chunks",
                         r.handle.request.request_id, self.name, r.gen.prefill_chunks_done,
                         r.gen.prefill_chunks_total)
        self._leave(gone)

    def _hand_off(self) -> None:
        """Requests asked to move (Instance.handoff) leave with their state, between two steps."""
        with self._lock:
            rows = [r for r in self._batch + self._prefilling if r.handle.handoff_wanted]
            queued = [h for h in self._queue if h.handoff_wanted]
            for h in queued:
                self._queue.remove(h)
        for h in queued:
            h.handoff_state = self._initial_state(h)
            h.finish_reason = "migrated"
            h.handed_off.set()
            self._complete(h, {"type": "migrated", "state": h.handoff_state})
        for r in rows:
            r.handle.handoff_state = r.gen.snapshot()   # at a token boundary: the worker is between steps
            r.gen.state.finish_reason = "migrated"
            r.handle.handed_off.set()
        self._leave(rows)

    def _prefill_some(self) -> None:
        """Prefill work before the next decode step: one chunk each of the requests still
        prefilling, oldest first, until `prefill_chunk` prompt tokens ran this turn (at least
        one chunk). Chat-length newcomers that arrive together thus all join before the next
        step, and a long prompt delays the batch by at most one chunk per step."""
        with self._lock:
            waiting = list(self._prefilling)
        budget = self.prefill_chunk
        for r in waiting:
            if budget <= 0:
                return
            budget -= r.gen.next_chunk_tokens
            self._prefill_one(r)

    def _prefill_one(self, r: _Running) -> None:
        """One prefill chunk of `r`; when it was the last, the request samples its first
        token and joins the batch."""
        gen = r.gen
        if gen.at_limit:  # a resumed request whose context is full
            gen.state.finish_reason = "length"
            self._leave([r])
            return
        try:
            logits = gen.prefill_next()
            r.handle.prefill_chunks_done = gen.prefill_chunks_done
            if logits is None:
                return
            self._emit(r, gen.accept(logits))
        except BaseException as e:
            log.exception("request %s on %s failed in its prefill", r.handle.request.request_id, self.name)
            self._fail([r], e)
            return
        if gen.finished:
            self._leave([r])
            return
        with self._lock:
            self._kv.add(gen.cache, gen.cache.get_seq_length())
            gen.cache = None  # the batch holds it now
            self._prefilling.remove(r)
            self._batch.append(r)
            self.peak_batch = max(self.peak_batch, len(self._batch))

    def _decode_step(self) -> None:
        """One token for every request in the batch; the finished ones leave."""
        with self._lock:
            rows = list(self._batch)
        if not rows:
            return
        try:
            logits = self._kv.decode([r.gen.state.output_ids[-1] for r in rows])
        except BaseException as e:
            log.exception("a decode step of %d requests on %s failed", len(rows), self.name)
            self._fail(rows, e)
            return
        done = []
        for i, r in enumerate(rows):
            r.peak_batch = max(r.peak_batch, len(rows))
            try:
                self._emit(r, r.gen.accept(logits[i]))
            except BaseException as e:
                log.exception("request %s on %s failed", r.handle.request.request_id, self.name)
                r.gen.state.finish_reason = "error"
                r.extra["error"] = e
            if r.gen.finished:
                done.append(r)
        self._leave(done)

    def _emit(self, r: _Running, event: dict | None) -> None:
        st = r.gen.state
        if len(st.output_ids) > r.base_tokens:  # a token was sampled (an end-of-sequence one has no event)
            r.last_at = time.perf_counter()
            if r.first_at is None:
                r.first_at = r.last_at
        if event is not None:
            r.handle._put(event)

    def _fail(self, rows: list[_Running], error: BaseException) -> None:
        for r in rows:
            r.gen.state.finish_reason = "error"
            r.extra["error"] = error
        self._leave(rows)

    def _leave(self, rows: list[_Running]) -> None:
        """These requests leave the batch at once; each gets its final event."""
        if not rows:
            return
        with self._lock:
            in_batch = [i for i, r in enumerate(self._batch) if r in rows]
            if in_batch:
                self._kv.remove(in_batch)
            self._batch = [r for r in self._batch if r not in rows]
            self._prefilling = [r for r in self._prefilling if r not in rows]
            remaining = [r.need_tokens for r in self._batch + self._prefilling]
            release = self.kv_reserved - self._kv_needed(remaining)
            self.kv_reserved -= release
            self.served += len(rows)
        if release > 0 and self.kv_budget is not None:
            self.kv_budget.release(release)
        for r in rows:  # after they left: whoever sees the final event finds them gone
            self._complete(r.handle, self._final(r))

    def _final(self, r: _Running) -> Any:
        """A finished request's done event (or its error)."""
        h, gen, st = r.handle, r.gen, r.gen.state
        h.finish_reason = st.finish_reason
        if st.finish_reason == "cancelled":
            return RequestCancelledError(f"request {h.request.request_id} was cancelled")
        if st.finish_reason == "migrated":
            return {"type": "migrated", "state": h.handoff_state}
        if st.finish_reason == "error":
            e = r.extra.get("error")
            return e if isinstance(e, SllmError) else InferenceError(f"{type(e).__name__}: {e}")
        n = gen.emitted_tokens - r.base_tokens
        sampled = len(st.output_ids) - r.base_tokens
        decode_s = (r.last_at - r.first_at) if r.first_at is not None and r.last_at is not None else 0.0
        stats = {
            "finish_reason": st.finish_reason, "tokens": n, "prompt_tokens": len(st.prompt_ids),
            "ttft_s": (r.first_at - h.arrived_at) if r.first_at is not None else None,
            "queue_s": r.started - h.submitted_at,
            "prefill_s": (r.first_at - r.started) if r.first_at is not None else None,
            "prefill_chunks": gen.prefill_chunks_done,
            # decode rate after the first token (the first one pays the prefill)
            "tokens_per_s": (sampled - 1) / decode_s if n > 1 and decode_s > 0 else None,
            "total_s": time.perf_counter() - h.arrived_at,
            "batch_size": r.peak_batch,  # the most requests it decoded together with (itself included)
        }
        if r.base_tokens:
            stats["resumed_at"] = r.base_tokens
        return {"type": "done", "stats": stats}
