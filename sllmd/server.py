"""The daemon's request server: one I/O thread owns the socket, handlers run on worker threads.

    clients ──frames──► I/O thread ──decode/validate──► control workers (pin, unpin, show; stale reads)
                           ▲    │                        stream threads  (infer, import, load, evict, rm)
                           │    └─ hello, ping, cancel answered inline; status, models, ps too,
                           │       from the node's snapshot while it is fresh (sllmd.snapshot)
                           └──── outbox (queue) + endpoint.wake() ◄── replies encoded by the workers

Every message arrives with the kernel's credentials of the process that opened
its connection: a greeting holds only for the same credentials, and an import
reads a local path only if that user may (sllmd.transport.credentials).

Only the I/O thread touches the endpoint. Workers put encoded replies on the
outbox and wake the poller; the I/O thread sends them, keeps a per-client
backlog when a client's queue is full, and sends a heartbeat for every
request that has been quiet for `heartbeat_s`. A heartbeat or reply that
cannot be delivered (the client went away) cancels that client's requests:
a streaming handler sees the cancel flag at its next token and closes the
node's generator. A malformed, oversized, unknown or out-of-order message
gets a typed error reply; nothing a client sends can stop the loop.
"""
from __future__ import annotations

import collections
import logging
import os
import queue
import socket
import threading
import time
from typing import Any, Callable

from sllmd.errors import SllmError
from sllmd.protocol import (LONG_RUNNING, PROTOCOL_VERSION, BadMessageError, BusyError, Cancel, CancelledError,
                            Done, Error, Event, HandshakeRequiredError, Heartbeat, Hello, Message, Ping, Progress,
                            Result, ShuttingDownError, Token, VersionMismatchError, Welcome, decode_request, encode,
                            error_reply_fields)
from sllmd.events import EventBus
from sllmd.protocol.messages import Ack
from sllmd.snapshot import READ_ONLY, Snapshots
from sllmd.transport import Credentials, SendResult, ServerEndpoint, check_readable

log = logging.getLogger(__name__)

MAX_CLIENTS = 4096            # greeted connections remembered (least recently active forgotten first)
MAX_BACKLOG = 10_000          # replies held for a client that does not read before it counts as gone
MAX_CONTROL_QUEUE = 1024      # quick requests waiting for a control worker before "busy"
PROGRESS_INTERVAL_S = 0.1
MAX_WATCHES = 128             # watch streams at once; they have their own threads, not the long requests' slots
WATCHES = frozenset({"watch", "peer_watch"})
READ_INTEREST_S = 5.0         # after a read, retake a stale snapshot in the background for this long
# Requests after which the next read must see their effect: the snapshot is retaken before their reply.
MUTATING = frozenset({"load", "evict", "remove", "pin", "unpin", "import", "infer"})
_RETAKE = object()            # a control-queue item: retake the snapshot


def _daemon_version() -> str:
    try:
        from importlib.metadata import version
        return version("sllmd")
    except Exception:
        return "unknown"


class _Call:
    """One in-flight request. `cancelled` is set by the I/O thread and read by the worker.
    `credentials`: who the kernel says opened the connection it came on."""

    __slots__ = ("peer", "id", "type", "cancelled", "gone", "last_sent", "long", "credentials", "flow")

    def __init__(self, peer: bytes, msg: Message, long: bool, credentials: Credentials | None):
        self.peer, self.id, self.type, self.long = peer, msg.id, msg.TYPE, long
        self.credentials = credentials
        self.cancelled = threading.Event()
        self.gone = False
        self.last_sent = time.monotonic()
        self.flow = None     # a flow-controlled stream (sllmd.watch.Watch): hears the client's acks


class _Client:
    """A greeted client connection (keyed by its ZeroMQ routing id)."""

    __slots__ = ("name", "credentials", "backlog")

    def __init__(self, name: str, credentials: Credentials | None):
        self.name, self.credentials = name, credentials
        self.backlog: collections.deque[bytes] = collections.deque()


class Server:
    """Serves the client protocol; sllmd.cluster.peer_server.PeerServer serves the peer protocol
    with the same machinery by naming its own messages and handlers."""

    PROTOCOL = PROTOCOL_VERSION
    HELLO: type[Message] = Hello
    CANCEL: type[Message] = Cancel
    ACK: type[Message] = Ack
    LONG = LONG_RUNNING

    def __init__(self, node: Any, endpoint: ServerEndpoint, *, max_frame_bytes: int = 16 << 20,
                 heartbeat_s: float = 1.0, max_streams: int = 64, control_workers: int = 4, cluster: Any = None,
                 metrics: Any = None):
        self.node = node
        self.metrics = metrics   # sllmd.http.metrics.Metrics, shared with --http (made on first use when None)
        self.cluster = cluster   # sllmd.cluster.Cluster: infer is placed cluster-wide (None: this node only)
        self.endpoint = endpoint
        self.max_frame_bytes = max_frame_bytes
        self.heartbeat_s = heartbeat_s
        self.max_streams = max_streams
        self._version = _daemon_version()
        self._started_at = time.time()

        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._calls: dict[tuple[bytes, int], _Call] = {}
        self._n_long = 0
        self._n_watch = 0
        self._clients: collections.OrderedDict[bytes, _Client] = collections.OrderedDict()   # I/O thread only
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._control: queue.SimpleQueue = queue.SimpleQueue()
        self._snapshots = Snapshots(node, readers={"nodes": self._node_rows},
                                    also_changes=lambda: getattr(getattr(self, "cluster", None), "serial", 0))
        events = getattr(node, "events", None)   # what `watch` streams (sllmd.events)
        self.events = events if isinstance(events, EventBus) else EventBus()
        self._last_read = 0.0            # I/O thread only
        self._retake_queued = False
        self._control_threads = [threading.Thread(target=self._control_worker, name=f"sllmd-ctl-{i}", daemon=True)
                                 for i in range(control_workers)]
        self._io_thread = threading.Thread(target=self._io_loop, name="sllmd-io", daemon=True)
        self._accepting = True
        self._stop = False
        self._closed = False
        self._handlers: dict[str, Callable[[Message, _Call], Message | bytes]] = self._make_handlers()

    def _make_handlers(self) -> dict[str, Callable[[Message, _Call], Message | bytes]]:
        return {
            "metrics": self._metrics,
            "status": self._read, "models": self._read, "ps": self._read, "load": self._load,
            "evict": self._evict, "remove": self._remove, "pin": self._pin, "unpin": self._unpin,
            "import": self._import, "infer": self._infer, "show": self._show,
            "requests": self._requests, "nodes": self._nodes, "migrate": self._migrate,
            "watch": self._watch,
        }

    def _decode(self, frame: bytes) -> Message:
        return decode_request(frame, self.max_frame_bytes)

    # --- lifecycle (any thread) -----------------------------------------------------------------------
    def start(self) -> None:
        for t in self._control_threads:
            t.start()
        self._io_thread.start()
        log.info("serving on %s (protocol %d)", self.endpoint.address, self.PROTOCOL)

    def stop_accepting(self) -> None:
        """New requests get a `shutting_down` error from now on; in-flight ones go on."""
        self._accepting = False

    @property
    def serving(self) -> bool:
        """False once the I/O thread has ended (after close(), or if its socket failed)."""
        return self._io_thread.is_alive()

    def in_flight(self) -> int:
        with self._lock:
            return len(self._calls)

    def wait_idle(self, timeout: float) -> bool:
        """Waits until no request is in flight (their last replies handed to the socket)."""
        with self._idle:
            return self._idle.wait_for(lambda: not self._calls, timeout)

    def cancel_all(self) -> None:
        with self._lock:
            for call in self._calls.values():
                call.cancelled.set()

    def close(self, timeout: float = 5.0) -> None:
        """Stops serving: cancels what is still in flight, waits up to `timeout` for the workers'
        last replies, flushes them, then closes the endpoint. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self.stop_accepting()
        self.cancel_all()
        if not self.wait_idle(timeout):
            with self._lock:
                stuck = [f"{c.type}#{c.id}" for c in self._calls.values()]
            log.warning("closing with %d request(s) still running: %s", len(stuck), ", ".join(stuck[:10]))
        for _ in self._control_threads:
            self._control.put(None)
        self._stop = True
        self.endpoint.wake()
        for t in (*self._control_threads, self._io_thread):
            if t.is_alive():
                t.join(timeout)
        self.endpoint.close()
        log.info("server closed")

    # --- the I/O thread -----------------------------------------------------------------------------
    def _io_loop(self) -> None:
        next_beat = time.monotonic() + self.heartbeat_s / 2
        while True:
            has_backlog = any(c.backlog for c in self._clients.values())
            wait = max(0.0, next_beat - time.monotonic())
            if has_backlog:
                wait = min(wait, 0.005)
            try:
                batch = self.endpoint.recv(wait)
            except Exception:   # the socket itself failed: nothing to serve with
                log.exception("receiving failed; the server stops")
                self.cancel_all()
                return
            for peer, frames, credentials in batch:
                try:
                    self._on_frames(peer, frames, credentials)
                except Exception:
                    log.exception("unexpected failure handling a message; serving on")
            self._drain_outbox()
            self._flush_backlogs()
            now = time.monotonic()
            if not self._retake_queued and now - self._last_read < READ_INTEREST_S and self._snapshots.stale():
                self._retake_queued = True   # someone reads: have the next read find a fresh snapshot
                self._control.put(_RETAKE)
            if now >= next_beat:
                self._heartbeats(now)
                next_beat = now + self.heartbeat_s / 2
            if self._stop:
                self._drain_outbox()
                self._flush_backlogs()
                return

    def _on_frames(self, peer: bytes, frames: list[bytes], credentials: Credentials | None) -> None:
        if len(frames) != 1:
            self._send_error(peer, None, BadMessageError(f"expected one frame per message, got {len(frames)}"))
            return
        try:
            msg = self._decode(frames[0])
        except BadMessageError as e:
            log.debug("bad message from %s: %s", peer.hex(), e)
            self._send_error(peer, getattr(e, "request_id", None), e)
            return
        if isinstance(msg, self.HELLO):
            self._hello(peer, msg, credentials)
            return
        client = self._clients.get(peer)
        if client is None or client.credentials != credentials:
            # A routing id is chosen by the client: one greeted by another user is not this one's.
            self._send_error(peer, msg.id, HandshakeRequiredError("say hello first"))
            return
        self._clients.move_to_end(peer)
        if isinstance(msg, self.CANCEL):
            with self._lock:
                call = self._calls.get((peer, msg.id))
            if call is not None:
                log.debug("cancel %s#%d", call.type, call.id)
                call.cancelled.set()
            return
        if isinstance(msg, self.ACK):   # a watcher took updates up to seq: the watch may send more
            with self._lock:
                call = self._calls.get((peer, msg.id))
            if call is not None and call.flow is not None:
                call.flow.ack(msg.seq)
            return
        if not self._accepting:
            self._send_error(peer, msg.id, ShuttingDownError("the daemon is shutting down"))
            return
        if isinstance(msg, Ping):
            self._send(peer, encode(Result(id=msg.id, data={"time": time.time()})))
            return
        if msg.TYPE in READ_ONLY and not getattr(msg, "all", False) and self._answer_from_snapshot(peer, msg):
            return
        long = msg.TYPE in self.LONG
        watch = msg.TYPE in WATCHES   # a watcher never takes a slot an infer could use
        with self._lock:
            if (peer, msg.id) in self._calls:
                problem: SllmError | None = BadMessageError(f"request id {msg.id} is already in flight")
            elif watch and self._n_watch >= MAX_WATCHES:
                problem = BusyError(f"{self._n_watch} watches are open; close one or try again later")
            elif long and not watch and self._n_long >= self.max_streams:
                problem = BusyError(f"{self._n_long} long requests are running; try again later")
            elif not long and self._control.qsize() >= MAX_CONTROL_QUEUE:
                problem = BusyError("too many requests are waiting; try again later")
            else:
                problem = None
                call = _Call(peer, msg, long and not watch, credentials)
                self._calls[(peer, msg.id)] = call
                self._n_long += call.long
                self._n_watch += watch
        if problem is not None:
            self._send_error(peer, msg.id, problem)
            return
        if long:
            threading.Thread(target=self._run, args=(call, msg), name=f"sllmd-{msg.TYPE}-{msg.id}",
                             daemon=True).start()
        else:
            self._control.put((call, msg))

    def _answer_from_snapshot(self, peer: bytes, msg: Message) -> bool:
        """Answers a read-only request on the I/O thread if the snapshot is fresh; False: a worker must."""
        self._last_read = time.monotonic()
        snap = self._snapshots.fresh()
        if snap is None:
            return False
        with self._lock:
            if (peer, msg.id) in self._calls:
                return False   # the worker path answers "already in flight"
            in_flight = len(self._calls)
        try:
            frame = snap.reply(msg.TYPE, msg.id, lambda: self._daemon_info(in_flight))
        except Exception:   # the node failed that part: the worker path answers as the handler would
            return False
        self._send(peer, frame)
        return True

    def _hello(self, peer: bytes, msg: Message, credentials: Credentials | None) -> None:
        if msg.version != self.PROTOCOL:
            self._send_error(peer, msg.id, VersionMismatchError(
                f"this daemon speaks protocol {self.PROTOCOL}, the client speaks {msg.version}"))
            return
        if not self._accepting:
            self._send_error(peer, msg.id, ShuttingDownError("the daemon is shutting down"))
            return
        known = self._clients.get(peer)
        if known is None or known.credentials != credentials:
            self._clients[peer] = _Client(getattr(msg, "client", None) or getattr(msg, "node", ""), credentials)
            self._forget_idle_clients()
        self._clients.move_to_end(peer)
        self._send(peer, encode(Welcome(id=msg.id, version=self.PROTOCOL, server=self._version,
                                        max_frame_bytes=self.max_frame_bytes, heartbeat_s=self.heartbeat_s)))

    def _forget_idle_clients(self) -> None:
        if len(self._clients) <= MAX_CLIENTS:
            return
        with self._lock:
            busy = {peer for peer, _ in self._calls}
        for peer in list(self._clients):
            if len(self._clients) <= MAX_CLIENTS:
                break
            if peer not in busy:
                del self._clients[peer]

    def _send(self, peer: bytes, frame: bytes) -> bool:
        client = self._clients.get(peer)
        if client is not None and client.backlog:
            return self._queue_backlog(peer, client, frame)
        result = self.endpoint.send(peer, frame)
        if result is SendResult.SENT:
            return True
        if result is SendResult.GONE:
            self._peer_gone(peer)
            return False
        if client is None:   # an ungreeted connection that does not read: its error reply is dropped
            log.debug("dropping a reply to unread connection %s", peer.hex())
            return False
        return self._queue_backlog(peer, client, frame)

    def _queue_backlog(self, peer: bytes, client: _Client, frame: bytes) -> bool:
        if len(client.backlog) >= MAX_BACKLOG:
            log.warning("client %s reads no replies (%d waiting); cancelling its requests", peer.hex(),
                        len(client.backlog))
            self._peer_gone(peer)
            return False
        client.backlog.append(frame)
        return True

    def _flush_backlogs(self) -> None:
        for peer, client in list(self._clients.items()):
            while client.backlog:
                result = self.endpoint.send(peer, client.backlog[0])
                if result is SendResult.SENT:
                    client.backlog.popleft()
                elif result is SendResult.GONE:
                    self._peer_gone(peer)
                    break
                else:
                    break

    def _send_error(self, peer: bytes, request_id: int | None, exc: BaseException) -> None:
        self._send(peer, encode(Error(id=request_id, **error_reply_fields(exc))))

    def _peer_gone(self, peer: bytes) -> None:
        self._clients.pop(peer, None)
        with self._lock:
            calls = [c for (p, _), c in self._calls.items() if p == peer]
        for call in calls:
            call.gone = True
            call.cancelled.set()
        if calls:
            log.info("client %s went away; cancelled %d request(s)", peer.hex(), len(calls))

    def _drain_outbox(self) -> None:
        while True:
            try:
                call, frame, final = self._outbox.get_nowait()
            except queue.Empty:
                return
            if not call.gone:
                self._send(call.peer, frame)
                call.last_sent = time.monotonic()
            if final:
                with self._idle:
                    self._calls.pop((call.peer, call.id), None)
                    self._n_long -= call.long
                    self._n_watch -= call.type in WATCHES
                    self._idle.notify_all()

    def _heartbeats(self, now: float) -> None:
        with self._lock:
            quiet = [c for c in self._calls.values() if not c.gone and now - c.last_sent >= self.heartbeat_s]
        for call in quiet:
            call.last_sent = now
            self._send(call.peer, encode(Heartbeat(id=call.id)))

    # --- worker side ------------------------------------------------------------------------------
    def _control_worker(self) -> None:
        while True:
            item = self._control.get()
            if item is None:
                return
            if item is _RETAKE:
                self._retake_queued = False
                try:
                    self._snapshots.take()
                except Exception:
                    log.exception("taking a snapshot of the node failed")
                continue
            self._run(*item)

    def _post(self, call: _Call, msg: Message, final: bool = False) -> None:
        self._outbox.put((call, encode(msg), final))
        self.endpoint.wake()

    def _emit(self, call: _Call, msg: Message) -> None:
        """Sends a non-final reply; raises CancelledError once the request is cancelled."""
        if call.cancelled.is_set():
            raise CancelledError("request cancelled")
        self._post(call, msg)

    def _run(self, call: _Call, msg: Message) -> None:
        started = time.monotonic()
        try:
            if call.cancelled.is_set():
                raise CancelledError("request cancelled")
            final = self._handlers[msg.TYPE](msg, call)
            frame = final if isinstance(final, bytes | tuple) else encode(final)   # tuple: frames, as encoded
        except SllmError as e:
            if isinstance(e, CancelledError) and not self._accepting:  # stopped by the shutdown, not its client:
                e = ShuttingDownError("sllmd is shutting down; the request was stopped")  # as a new request hears
            level = logging.DEBUG if isinstance(e, CancelledError) else logging.INFO
            log.log(level, "%s#%d failed: %s: %s", call.type, call.id, e.code, e)
            frame = encode(Error(id=call.id, **error_reply_fields(e)))
        except Exception as e:
            log.exception("%s#%d failed unexpectedly", call.type, call.id)
            frame = encode(Error(id=call.id, **error_reply_fields(e)))
        if call.type in MUTATING and self._snapshots.node_version() is not None:
            try:   # the client's next read sees what this request did
                self._snapshots.take(force=True)
            except Exception:
                log.exception("taking a snapshot of the node failed")
        log.debug("%s#%d finished in %.1f ms", call.type, call.id, (time.monotonic() - started) * 1e3)
        self._outbox.put((call, frame, True))
        self.endpoint.wake()

    # --- handlers: one protocol request -> one Node call ----------------------------------------------------
    def _read(self, msg, call) -> Message | bytes:
        """status, models, ps, nodes when the snapshot was stale: retaken here, then answered from.
        models/ps with `all` gather every cluster node's (this node's alone without a cluster)."""
        if getattr(msg, "all", False):
            local = self.node.models if msg.TYPE == "models" else self.node.ps
            if self.cluster is not None:
                rows = self.cluster.models_all() if msg.TYPE == "models" else self.cluster.ps_all()
            else:
                rows = [dict(r, node=self._node_name()) for r in local()]
            return Result(id=msg.id, data=rows)
        snap = self._snapshots.take(kind=msg.TYPE)
        with self._lock:
            in_flight = len(self._calls) - 1   # not counting this request
        return snap.reply(msg.TYPE, msg.id, lambda: self._daemon_info(in_flight))

    def _daemon_info(self, in_flight: int) -> dict:
        return {"version": self._version, "protocol": PROTOCOL_VERSION, "pid": os.getpid(),
                "socket": self.endpoint.address, "started_at": self._started_at,
                "uptime_s": time.time() - self._started_at, "requests_in_flight": in_flight,
                "clients": len(self._clients)}

    def _node_name(self) -> str:
        return getattr(getattr(self.node, "config", None), "node_name", None) or socket.gethostname()

    def _requests(self, msg, call) -> Message:
        if msg.all and self.cluster is not None:
            return Result(id=msg.id, data=self.cluster.requests_all())
        return Result(id=msg.id, data=self._local_requests())

    def _local_requests(self) -> list[dict]:
        return [dict(r, node=self._node_name()) for r in self.node.requests()]

    def _metrics(self, msg, call) -> Message:
        """The Prometheus text, the same as GET /metrics (read now, from the node)."""
        if self.metrics is None:
            from sllmd.http.metrics import Metrics
            self.metrics = Metrics(self.node, self.cluster)
        return Result(id=msg.id, data=self.metrics.render().decode("utf-8"))

    def _nodes(self, msg, call) -> Message | bytes:
        return self._read(msg, call)   # from the snapshot (its "nodes" part: _node_rows), retaken here

    def _node_rows(self) -> list[dict]:
        """The cluster's members; without a cluster, this node alone."""
        if self.cluster is not None:
            return self.cluster.nodes()
        from sllmd.cluster.locality import local_state
        return [{"name": self._node_name(), "status": "alive", "address": None, "endpoint": None, "public_key": None,
                 "version": getattr(self.node, "version", 0), "self": True, "last_heard": time.time(),
                 "state": local_state(self.node), "state_age_s": 0.0}]

    def _migrate(self, msg, call) -> Message:
        if self.cluster is None:
            from sllmd.errors import InvalidRequestError
            raise InvalidRequestError("migration moves a request between cluster nodes: start sllmd with "
                                      "--peer-listen (see README, A cluster of nodes)")
        return Result(id=msg.id, data=self.cluster.migrate(msg.request_id, msg.to))

    def _watch(self, msg, call) -> Message:
        """Streams `update`s until the client cancels or goes away (sllmd.watch)."""
        from sllmd.watch import Watch

        def send(frame: bytes) -> None:
            self._outbox.put((call, frame, False))
            self.endpoint.wake()

        watch = Watch(self.node, self.events, self._snapshots, request_id=msg.id, interval_s=msg.interval_s,
                      send=send, cancelled=call.cancelled,
                      cluster=self.cluster if getattr(msg, "cluster", False) else None,
                      max_events=msg.max_events)
        call.flow = watch
        watch.run()   # returns only by raising CancelledError
        raise CancelledError("watch ended")

    def _show(self, msg, call) -> Message:
        return Result(id=msg.id, data=self.node.show(msg.name))

    def _load(self, msg, call) -> Message:
        return Result(id=msg.id, data=self.node.load(msg.name, keep_alive=msg.keep_alive))

    def _evict(self, msg, call) -> Message:
        return Result(id=msg.id, data=self.node.evict(msg.name, tier=msg.tier, force=msg.force))

    def _remove(self, msg, call) -> Message:
        return Result(id=msg.id, data=self.node.remove(msg.name, force=msg.force))

    def _pin(self, msg, call) -> Message:
        self.node.pin(msg.name)
        return Result(id=msg.id, data=None)

    def _unpin(self, msg, call) -> Message:
        self.node.unpin(msg.name)
        return Result(id=msg.id, data=None)

    def _import(self, msg, call) -> Message:
        last = [0.0]

        def progress(done: int, total: int) -> None:
            if call.cancelled.is_set():
                raise CancelledError("import cancelled")
            now = time.monotonic()
            if done < total and now - last[0] < PROGRESS_INTERVAL_S:
                return
            last[0] = now
            self._emit(call, Progress(id=msg.id, done=max(0, int(done)), total=max(0, int(total))))

        source = msg.source
        if not source.startswith(("http://", "https://")):   # a local read: only if the requesting user may
            source = os.path.expanduser(source.removeprefix("file://"))
            check_readable(source, call.credentials)

        def notify(event: str, data: dict) -> None:   # a conversion's phases, capacity evictions
            self._emit(call, Event(id=msg.id, event=event, data=data))

        return Result(id=msg.id, data=self.node.import_model(msg.name, source, progress=progress, notify=notify,
                                                             cancelled=call.cancelled.is_set,
                                                             no_tokenizer=msg.no_tokenizer))

    def _infer(self, msg, call) -> Message:
        if self.cluster is not None:   # placed on the fastest node (or `node`), relayed from there
            events = self.cluster.infer(msg.to_request(), call.cancelled, node=getattr(msg, "node", None))
        else:
            events = self.node.infer(msg.to_request(), cancelled=call.cancelled)  # a cancel stops a prefill too
        return self._stream(msg, call, events)

    def _stream(self, msg, call, events) -> Message:
        """Sends an infer's token/event stream (tokens numbered from 0); returns its done reply."""
        done: Message | None = None
        index = 0
        try:
            for ev in events:
                if call.cancelled.is_set():
                    raise CancelledError("request cancelled")
                kind = ev.get("type")
                if kind == "token":
                    self._emit(call, Token(id=msg.id, text=ev.get("text") or "", token_id=ev.get("token_id"),
                                           index=index))
                    index += 1
                elif kind == "done":
                    done = Done(id=msg.id, stats=ev.get("stats"))
                    break
                else:
                    self._emit(call, Event(id=msg.id, event=str(kind),
                                           data={k: v for k, v in ev.items() if k != "type"}))
        finally:
            if done is None:
                close = getattr(events, "close", None)
                if close is not None:
                    close()   # stops the node's decode loop: the request ended early
        # Let the node's generator end on its own (its cleanup, e.g. keep_alive=0 unloading,
        # happens before the client hears "done").
        for extra in events:
            log.warning("%s#%d: ignoring %r after done", call.type, call.id, extra.get("type"))
        return done or Done(id=msg.id, stats=None)
