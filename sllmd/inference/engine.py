"""An instance: a loaded model serving requests on its own worker thread.

Requests queue per instance (bounded: a full queue raises BusyError at once,
nothing is dropped silently) and run one at a time; each token is handed to
the request's handle as soon as it is sampled. The prompt is tokenized and
checked against the context at submit, so a prompt that cannot fit fails there
(InvalidRequestError) before anything streams. Whoever submitted the request
iterates the handle; closing it, or setting the `cancelled` event given to
submit (the server's: the client cancelled or went away), cancels the request
(queued: it never runs; running: it stops before the next token or prefill
chunk) and frees its slot.
"""
from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from typing import Any, Callable, Iterator

from .decode import PREFILL_CHUNK_TOKENS, build_prompt_ids, check_prompt_fits, context_limit, stop_token_ids
from sllmd.errors import BusyError, InferenceError, InstanceClosedError, RequestCancelledError, SllmError
from .generation import Generation
from .request import InferRequest, RequestState

log = logging.getLogger(__name__)

_END = object()


class RequestHandle:
    """The submitter's side of one request: an iterator of event dicts.

    Yields {"type": "token", ...} events, then one {"type": "done", "stats": ...};
    a failure raises the SllmError it carried."""

    def __init__(self, request: InferRequest, arrived_at: float, prompt_ids: list[int] | None = None,
                 cancelled: threading.Event | None = None):
        self.request = request
        self.prompt_ids = prompt_ids
        self._external_cancel = cancelled  # set by whoever relays the client's cancel (the server)
        self.arrived_at = arrived_at  # perf_counter() when the request reached the daemon
        self.submitted_at = time.perf_counter()
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        self._cancel = threading.Event()
        self.done = threading.Event()
        self.state: RequestState | None = None
        self.finish_reason: str | None = None
        self._withdraw: Callable[["RequestHandle"], None] | None = None  # frees a queued request's slot
        self.prefill_chunks_done = 0  # progress of the prompt's prefill (chunks of the instance's prefill_chunk)
        self.prefill_chunks_total = 0

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set() or (self._external_cancel is not None and self._external_cancel.is_set())

    def cancel(self) -> None:
        self._cancel.set()
        if self._withdraw is not None:
            self._withdraw(self)

    def _put(self, item: Any) -> None:
        self._events.put(item)

    def _finish(self, final: Any) -> None:
        self._events.put(final)
        self._events.put(_END)
        self.done.set()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        try:
            while True:
                item = self._events.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            if not self.done.is_set():
                self.cancel()  # the consumer went away: stop the request


class Instance:
    """A model on a device, serving its request queue with one worker thread."""

    def __init__(self, name: str, model, tokenizer, *, device: str, nbytes: int, queue_depth: int = 16,
                 on_finished: Callable[["Instance", RequestHandle], None] | None = None,
                 prefill_chunk: int = PREFILL_CHUNK_TOKENS):
        if queue_depth < 1:
            raise ValueError("queue_depth must be >= 1")
        if prefill_chunk < 1:
            raise ValueError("prefill_chunk must be >= 1")
        self.name, self.model, self.tokenizer = name, model, tokenizer
        self.device, self.nbytes, self.queue_depth = device, nbytes, queue_depth
        self.on_finished = on_finished
        self.prefill_chunk = prefill_chunk
        self.eos = stop_token_ids(model, tokenizer)
        self.context = context_limit(model)
        self._lock = threading.Lock()
        self._queue: collections.deque[RequestHandle] = collections.deque()
        self._wake = threading.Condition(self._lock)
        self._running: RequestHandle | None = None
        self._closing = False
        self.served = 0
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
        handle = RequestHandle(request, arrived_at, prompt_ids, cancelled)
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
        """A queued request was cancelled: it leaves the queue and never runs."""
        with self._lock:
            try:
                self._queue.remove(handle)
            except ValueError:
                return  # already running or finished
        handle.finish_reason = "cancelled"
        handle._finish(RequestCancelledError(f"request {handle.request.request_id} was cancelled"))
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
        with self._lock:
            return 1 if self._running is not None else 0

    def requests(self) -> list[dict[str, Any]]:
        """The running request, then the queued ones in order: id, model, tokens in/out, state, age."""
        with self._lock:
            handles = ([(self._running, "running")] if self._running is not None else []) \
                + [(h, "queued") for h in self._queue]
        now = time.perf_counter()
        out = []
        for h, state in handles:
            st = h.state
            if state == "running" and st is None:
                state = "starting"
            elif state == "running" and h.prefill_chunks_done < h.prefill_chunks_total:
                state = "prefill"
            out.append({"id": h.request.request_id, "model": self.name, "state": state,
                        "tokens_in": len(h.prompt_ids) if h.prompt_ids is not None else None,
                        "tokens_out": len(st.output_ids) if st is not None else 0,
                        "max_tokens": h.request.sampling.max_tokens, "age_s": now - h.arrived_at})
        return out

    @property
    def busy(self) -> bool:
        with self._lock:
            return self._running is not None or bool(self._queue)

    def close(self, timeout: float | None = None, drain: bool = True) -> bool:
        """Stops taking requests; queued ones get InstanceClosedError; the running
        one finishes (drain; cancelled if it is still running after `timeout`) or is
        cancelled at once. True when the worker stopped."""
        with self._lock:
            self._closing = True
            dropped = list(self._queue)
            self._queue.clear()
            if not drain and self._running is not None:
                self._running.cancel()
            self._wake.notify_all()
        for h in dropped:
            h._finish(InstanceClosedError(f"model {self.name!r} was unloaded before the request ran"))
        if threading.current_thread() is self._thread:
            return False
        self._thread.join(timeout)
        if self._thread.is_alive() and drain:
            # Out of time: the running request ends with an error instead of finishing.
            with self._lock:
                running = self._running
            if running is not None:
                log.warning("%s: request %s did not finish in time; cancelling it", self.name,
                            running.request.request_id)
                running.cancel()
            self._thread.join(5.0)
        return not self._thread.is_alive()

    # --- worker side ------------------------------------------------------------
    def _work(self) -> None:
        while True:
            with self._lock:
                while not self._queue and not self._closing:
                    self._wake.wait()
                if not self._queue:
                    return  # closing and drained
                handle = self._queue.popleft()
                self._running = handle
            try:
                final = self._serve(handle)
            except BaseException as e:  # the worker must survive anything a request does
                log.exception("request %s on %s failed", handle.request.request_id, self.name)
                final = e if isinstance(e, SllmError) else InferenceError(f"{type(e).__name__}: {e}")
                handle.finish_reason = "error"
            with self._lock:
                self._running = None  # before the final event: whoever sees it finds the instance idle
            handle._finish(final)
            if self.on_finished is not None:
                try:
                    self.on_finished(self, handle)
                except Exception:
                    log.exception("on_finished callback failed for %s", self.name)

    def _serve(self, handle: RequestHandle) -> Any:
        """Runs one request, streaming its tokens; returns its final item (done event or error)."""
        req = handle.request
        if handle.cancelled:
            handle.finish_reason = "cancelled"
            return RequestCancelledError(f"request {req.request_id} was cancelled")
        started = time.perf_counter()
        prompt_ids = handle.prompt_ids if handle.prompt_ids is not None else build_prompt_ids(self.tokenizer, req)
        state = RequestState(req.request_id, req.model, req.sampling, prompt_ids)
        handle.state = state
        gen = Generation(self.model, self.tokenizer, state, self.eos, prefill_chunk=self.prefill_chunk)
        handle.prefill_chunks_total = gen.prefill_chunks_total

        def should_stop() -> bool:
            handle.prefill_chunks_done = gen.prefill_chunks_done
            return handle.cancelled

        first_at = last_at = None
        while True:
            if handle.cancelled:
                state.finish_reason = "cancelled"
                break
            sampled = len(state.output_ids)
            event = gen.step(should_stop)
            handle.prefill_chunks_done = gen.prefill_chunks_done
            if len(state.output_ids) > sampled:  # a token was sampled (an end-of-sequence one has no event)
                last_at = time.perf_counter()
                if first_at is None:
                    first_at = last_at
            if event is not None:
                handle._put(event)
            if event is None or gen.finished:
                break
        self.served += 1
        if state.finish_reason == "cancelled" and gen.prefill_chunks_done < gen.prefill_chunks_total:
            log.info("request %s on %s cancelled during its prefill, after %d of %d chunks", req.request_id,
                     self.name, gen.prefill_chunks_done, gen.prefill_chunks_total)
        n = gen.emitted_tokens
        decode_s = (last_at - first_at) if first_at is not None and last_at is not None else 0.0
        handle.finish_reason = state.finish_reason
        stats = {
            "finish_reason": state.finish_reason, "tokens": n, "prompt_tokens": len(state.prompt_ids),
            "ttft_s": (first_at - handle.arrived_at) if first_at is not None else None,
            "queue_s": started - handle.submitted_at,
            "prefill_s": (first_at - started) if first_at is not None else None,
            "prefill_chunks": gen.prefill_chunks_done,
            # decode rate after the first token (the first one pays the prefill)
            "tokens_per_s": (len(state.output_ids) - 1) / decode_s if n > 1 and decode_s > 0 else None,
            "total_s": time.perf_counter() - handle.arrived_at,
        }
        if state.finish_reason == "cancelled":
            return RequestCancelledError(f"request {req.request_id} was cancelled")
        return {"type": "done", "stats": stats}
