"""The submitter's side of one request (RequestHandle): an iterator of its events.

The instance's worker puts token events, then one final item (the done event
or the SllmError the request ended with); whoever submitted the request
iterates them. Closing the iterator early, or calling cancel(), cancels the
request; so does the `cancelled` event given at submit (the server sets it when
the client cancels or goes away).
"""
from __future__ import annotations

import queue
import threading
import time
from typing import Any, Callable, Iterator

from .request import InferRequest, RequestState

_END = object()


class RequestHandle:
    """Yields {"type": "token", ...} events, then one {"type": "done", "stats": ...};
    a failure raises the SllmError it carried."""

    def __init__(self, request: InferRequest, arrived_at: float, prompt_ids: list[int] | None = None,
                 cancelled: threading.Event | None = None, resume_from: RequestState | None = None):
        self.request = request
        self.prompt_ids = prompt_ids
        self.resume_from = resume_from  # a request state to continue instead of starting from the prompt
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
        # live migration (Instance.handoff): asked to stop at a token boundary and hand over its state
        self.handoff_wanted = False
        self.migrating_to: str | None = None   # the destination while a migration of it runs (its rounds too)
        self.handoff_state: RequestState | None = None
        self.handed_off = threading.Event()

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
