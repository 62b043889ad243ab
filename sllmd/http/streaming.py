"""One HTTP infer: the node's (or the cluster's) blocking event generator on its own
thread, its events handed to the event loop, and the ASGI response that sends them.

    event loop                                 stream thread (one per request, at most `limit`)
    InferResponse ──await next()──► asyncio.Queue ◄── call_soon_threadsafe ── for ev in infer(req, cancelled)
        │  watches receive() for http.disconnect ──► cancelled.set() ──► the node stops the request
        └─ first event decides the status: an error before it is an HTTP error (404, 429, 503 ...);
           after it a stream is 200 text/event-stream, ending in `data: [DONE]`

The response starts at the first token, so a model that must be loaded first
(from SSD, DRAM or a peer) gives a slow first chunk, and a failure to place or
load it a proper status. A client that goes away, or a send that fails, sets
the request's `cancelled` event: the node stops it even during its prefill or
its model's load. After "done" the thread lets the generator finish on its own
(its cleanup, e.g. keep_alive 0 unloading, runs before the client hears done),
as Server._stream does.
"""
from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from typing import Any, Callable, Iterator

from sllmd.errors import BusyError, CancelledError
from sllmd.http import openai_objects as objects
from sllmd.http.errors import HttpError, http_error
from sllmd.http.openai_schema import Parsed

log = logging.getLogger(__name__)

InferFn = Callable[[Any, threading.Event], Iterator[dict]]
_END = object()


class _Failure:
    __slots__ = ("exc",)

    def __init__(self, exc: BaseException):
        self.exc = exc


class Streams:
    """The HTTP infers in flight: at most `limit` threads; counted and cancellable for the shutdown."""

    def __init__(self, limit: int):
        self.limit = limit
        self._lock = threading.Condition()
        self._jobs: set[InferJob] = set()

    def admit(self, job: "InferJob") -> None:
        with self._lock:
            if len(self._jobs) >= self.limit:
                raise BusyError(f"{len(self._jobs)} HTTP requests are running (max_streams {self.limit}); "
                                "try again later")
            self._jobs.add(job)

    def leave(self, job: "InferJob") -> None:
        with self._lock:
            self._jobs.discard(job)
            self._lock.notify_all()

    def in_flight(self) -> int:
        with self._lock:
            return len(self._jobs)

    def cancel_all(self) -> None:
        with self._lock:
            for job in self._jobs:
                job.cancelled.set()

    def wait_idle(self, timeout: float) -> bool:
        with self._lock:
            return self._lock.wait_for(lambda: not self._jobs, timeout)


class InferJob:
    """Runs infer(request, cancelled) on a thread; `next()` awaits its events on the loop."""

    def __init__(self, infer: InferFn, request: Any, streams: Streams, loop: asyncio.AbstractEventLoop):
        self.request = request
        self.cancelled = threading.Event()
        self.finished = False
        self._infer, self._streams, self._loop = infer, streams, loop
        self._queue: asyncio.Queue = asyncio.Queue()
        streams.admit(self)   # BusyError when `limit` are running
        self._thread = threading.Thread(target=self._work, name=f"sllmd-http-{request.request_id[:8]}", daemon=True)

    def start(self) -> "InferJob":
        self._thread.start()
        return self

    # --- the stream thread ---------------------------------------------------------------------
    def _put(self, item: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:   # the loop is gone (the server stopped): nobody reads any more
            self.cancelled.set()

    def _work(self) -> None:
        events = None
        done = None
        try:
            events = self._infer(self.request, self.cancelled)
            for ev in events:
                if self.cancelled.is_set():
                    raise CancelledError("request cancelled")
                kind = ev.get("type")
                if kind == "token":
                    if ev.get("text"):
                        self._put(ev)
                elif kind == "done":
                    done = ev
                    break
            if done is not None:
                for extra in events:   # the generator's own cleanup runs before the client hears done
                    log.warning("request %s: ignoring %r after done", self.request.request_id, extra.get("type"))
                self._put(done)
            else:
                self._put(_Failure(CancelledError("the request ended without finishing")))
        except BaseException as e:   # noqa: BLE001 -- every failure goes to the client, none kills the daemon
            self._put(_Failure(e))
        finally:
            if done is None and events is not None:
                close = getattr(events, "close", None)
                if close is not None:
                    try:
                        close()   # stops the node's decode loop (or the peer's, through its cancel)
                    except Exception:
                        log.exception("closing request %s failed", self.request.request_id)
            self._put(_END)
            self._streams.leave(self)

    # --- the event loop ---------------------------------------------------------------------------
    async def next(self) -> dict | None:
        """The next token or done event; None after the end; raises the request's failure."""
        if self.finished:
            return None
        item = await self._queue.get()
        if item is _END:
            self.finished = True
            return None
        if isinstance(item, _Failure):
            self.finished = True
            raise item.exc
        if item.get("type") == "done":
            self.finished = True
        return item


class InferResponse:
    """The ASGI answer to one completion request, streamed or whole."""

    def __init__(self, job: InferJob, parsed: Parsed, on_done: Callable[[int, dict | None], None]):
        self.job, self.parsed, self.on_done = job, parsed, on_done
        self.status = 200

    async def __call__(self, scope, receive, send) -> None:
        watcher = asyncio.ensure_future(self._watch(receive))
        stats = None
        try:
            stats = await (self._stream(send) if self.parsed.stream else self._whole(send))
        except OSError as e:   # the client went away while we answered (uvicorn's ClientDisconnected)
            log.debug("request %s: sending failed: %s", self.job.request.request_id, e)
        finally:
            watcher.cancel()
            if not self.job.finished:
                self.job.cancelled.set()   # the client went away, or sending failed: stop the request
            self.on_done(self.status, stats)

    async def _watch(self, receive) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                if not self.job.finished:
                    log.debug("request %s: the client went away; cancelling", self.job.request.request_id)
                    self.job.cancelled.set()
                return

    async def _send_error(self, send, error: HttpError) -> None:
        self.status = error.status
        body = error.body_bytes()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        headers += [(k.lower().encode(), v.encode()) for k, v in error.headers().items()]
        await send({"type": "http.response.start", "status": error.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def _first(self) -> dict | None | HttpError:
        try:
            return await self.job.next()
        except BaseException as e:  # noqa: BLE001
            if isinstance(e, asyncio.CancelledError):
                raise
            return http_error(e)

    async def _whole(self, send) -> dict | None:
        parsed, created = self.parsed, int(time.time())
        pieces: list[str] = []
        first = await self._first()
        if isinstance(first, HttpError):
            await self._send_error(send, first)
            return None
        ev, stats = first, None
        try:
            while ev is not None:
                if ev["type"] == "token":
                    pieces.append(ev["text"])
                elif ev["type"] == "done":
                    stats = ev.get("stats")
                    break
                ev = await self.job.next()
        except Exception as e:
            await self._send_error(send, http_error(e))
            return None
        body = objects.completion(parsed.kind, parsed.request.request_id, parsed.request.model, created,
                                  "".join(pieces), stats)
        data = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
        await send({"type": "http.response.body", "body": data})
        return stats

    async def _stream(self, send) -> dict | None:
        parsed = self.parsed
        first = await self._first()
        if isinstance(first, HttpError):
            await self._send_error(send, first)
            return None
        writer = objects.ChunkWriter(parsed.kind, parsed.request.request_id, parsed.request.model, int(time.time()),
                                     parsed.include_usage)
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
                                (b"x-accel-buffering", b"no"),
                                (b"x-request-id", parsed.request.request_id.encode())]})
        ev = first
        head = writer.start()
        try:
            while ev is not None:
                if self.job.cancelled.is_set():
                    return None
                if ev["type"] == "token":
                    await send({"type": "http.response.body", "body": head + writer.text(ev["text"]),
                                "more_body": True})
                    head = b""
                elif ev["type"] == "done":
                    stats = ev.get("stats")
                    await send({"type": "http.response.body", "body": head + writer.finish(stats)})
                    return stats
                ev = await self.job.next()
        except OSError:   # the client went away mid-send
            return None
        except Exception as e:
            error = http_error(e)
            log.info("request %s failed after its first token: %s", parsed.request.request_id, error.message)
            try:
                await send({"type": "http.response.body", "body": head + writer.error(error.body())})
            except OSError:
                pass
            return None
        await send({"type": "http.response.body", "body": head + objects.DONE})
        return None
