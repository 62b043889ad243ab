"""The Python client of sllmd: every daemon operation, synchronous, token streams as iterators.

    from sllmd.client import Client
    with Client() as c:     # socket: $SLLMD_SOCKET, else the per-user path, else /run/sllmd/sllmd.sock
        c.import_model("smol", "/models/smollm2.gguf")
        for piece in c.infer("smol", "What is the capital of France?", max_tokens=32):
            print(piece, end="", flush=True)

Errors come back as the daemon raised them (sllmd.errors / sllmd.protocol
classes, same `code`). `DaemonUnreachableError` means no daemon listens or it
went away; `DaemonTimeoutError` means it accepted the request but showed no
sign of life for `timeout` seconds (the daemon sends heartbeats while it
works, so a slow load or a long queue is not a timeout). A Client is not
thread-safe: use one per thread. Several requests may be open at once on one
Client (e.g. `status()` while iterating an infer stream).
"""
from __future__ import annotations

import collections
import itertools
import logging
import os
import time
from typing import Any, Callable, Iterator

from sllmd.config import default_socket_path, parse_duration
from sllmd.protocol import (PROTOCOL_VERSION, BadMessageError, Cancel, DaemonTimeoutError, DaemonUnreachableError,
                            Done, Error, Event, Evict, HandshakeRequiredError, Heartbeat, Hello, Import, Infer,
                            InvalidArgumentError, Load,
                            Message, Models, OversizedError, Pin, Ping, Progress, Ps, Remove, Result, Show, Status,
                            Token,
                            Unpin, Welcome, decode_reply, encode, exception_from_reply)
from sllmd.transport import Transport, ZmqTransport, probe_ipc

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 30.0
SYSTEM_SOCKET = "/run/sllmd/sllmd.sock"   # where systemd/sllmd.service puts the daemon's socket


def socket_candidates(env=os.environ) -> list[str]:
    """Where a client looks for sllmd when neither `socket` nor $SLLMD_SOCKET says: the per-user
    default path first, then the system daemon's (the systemd unit's RuntimeDirectory)."""
    paths = [default_socket_path(env)]
    if SYSTEM_SOCKET not in paths:
        paths.append(SYSTEM_SOCKET)
    return paths


def find_socket(env=os.environ) -> str:
    """The first candidate with a daemon listening, else the first that exists, else the first."""
    paths = socket_candidates(env)

    def listening(path: str) -> bool:
        try:
            return probe_ipc(path)
        except OSError:   # e.g. permission denied: connecting says so with a hint
            return False
    live = next((p for p in paths if listening(p)), None)
    return live or next((p for p in paths if os.path.exists(p)), paths[0])


def _address(socket: str) -> str:
    return socket if "://" in socket else "ipc://" + socket


def _build(make: Callable[[int], Message], rid: int) -> Message:
    """A request checked before it leaves: a bad argument is the caller's error (exit 2), not the daemon's."""
    try:
        return make(rid)
    except BadMessageError as e:
        raise InvalidArgumentError(str(e)) from None


class Client:
    def __init__(self, socket: str | None = None, timeout: float = DEFAULT_TIMEOUT, *,
                 transport: Transport | None = None, client_name: str = "sllmd.client"):
        explicit = socket or os.environ.get("SLLMD_SOCKET")
        self.socket = explicit or find_socket(os.environ)
        self.address = _address(self.socket)
        self.timeout = timeout
        self._client_name = client_name
        self._own_transport = transport is None
        self._transport = transport or ZmqTransport()
        self._ids = itertools.count(1)
        self._inbox: dict[int, collections.deque[Message]] = {}
        self._orphan_errors: collections.deque[Error] = collections.deque()
        self._open: set[int] = set()
        self._ep = None
        self.welcome: Welcome | None = None
        try:
            self._ep = self._connect(explicit=bool(explicit) or transport is not None)
            self._handshake()
        except BaseException:
            self.close()
            raise

    # --- what a client of another protocol (sllmd.cluster.peer_server.PeerClient) replaces -------------
    def _connect(self, explicit: bool):
        try:
            return self._transport.connect(self.address)
        except PermissionError:
            raise DaemonUnreachableError(f"permission denied on {self.socket} "
                                         "(is this user in the daemon's group?)") from None
        except DaemonUnreachableError:
            if explicit:
                raise
            tried = " or ".join(socket_candidates(os.environ))
            raise DaemonUnreachableError(
                f"sllmd is not running (no daemon at {tried}); start it with `sllmd` or "
                "`systemctl start sllmd`, or point --socket / $SLLMD_SOCKET at its socket") from None

    def _hello_message(self, rid: int) -> Message:
        return Hello(id=rid, version=PROTOCOL_VERSION, client=self._client_name)

    def _cancel_message(self, rid: int) -> Message:
        return Cancel(id=rid)

    def _ack_message(self, rid: int, seq: int) -> Message:
        from sllmd.protocol.messages import Ack
        return Ack(id=rid, seq=seq)

    @staticmethod
    def _decode_reply(frame: bytes) -> Message:
        return decode_reply(frame)

    # --- plumbing ---------------------------------------------------------------------------------
    def close(self) -> None:
        for rid in list(self._open):
            self._cancel(rid)
        if self._ep is not None:
            self._ep.close()
            self._ep = None
        if self._own_transport and self._transport is not None:
            self._transport.close()
            self._transport = None

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _handshake(self) -> None:
        msg = self._hello_message(next(self._ids))
        self._send(msg)
        reply = self._wait(msg.id, self.timeout)
        if not isinstance(reply, Welcome):
            raise BadMessageError(f"expected welcome, got {reply.TYPE}")
        self.welcome = reply

    @property
    def _silence_probe_s(self) -> float:
        beat = self.welcome.heartbeat_s if self.welcome else 1.0
        return 3 * beat + 0.5

    def _send(self, msg: Message) -> None:
        if self._ep is None:
            raise DaemonUnreachableError("the client is closed")
        frame = encode(msg)
        limit = self.welcome.max_frame_bytes if self.welcome else None
        if limit is not None and len(frame) > limit:
            raise OversizedError(f"{msg.TYPE} of {len(frame)} bytes exceeds the daemon's limit of {limit} bytes")
        if not self._ep.send(frame, self.timeout):
            raise DaemonTimeoutError(f"could not send to sllmd at {self.socket} within {self.timeout:g}s")
        self._open.add(msg.id)

    def _receive_one(self, timeout: float) -> bool:
        frames = self._ep.recv(timeout)
        if frames is None:
            return False
        try:
            if len(frames) != 1:
                raise BadMessageError(f"expected one frame, got {len(frames)}")
            msg = self._decode_reply(frames[0])
        except BadMessageError as e:
            log.warning("ignoring a malformed reply: %s", e)
            return True
        if msg.id is None:   # an error for a request the daemon could not read
            self._orphan_errors.append(msg)
        elif msg.id in self._open:
            self._inbox.setdefault(msg.id, collections.deque()).append(msg)
        else:
            log.debug("dropping %s for finished request %s", msg.TYPE, msg.id)
        return True

    def _wait(self, rid: int, timeout: float) -> Message:
        """The next reply to request `rid` (heartbeats swallowed); raises on error replies and silence."""
        silent_since = time.monotonic()
        probed = False
        while True:
            box = self._inbox.get(rid)
            while box:
                msg = box.popleft()
                if isinstance(msg, Heartbeat):
                    silent_since = time.monotonic()
                    continue
                if isinstance(msg, Error | Result | Done | Welcome):
                    self._finish(rid)
                if isinstance(msg, Error):
                    raise exception_from_reply(msg.code, msg.message, msg.exit_code)
                return msg
            if self._orphan_errors and len(self._open) == 1:
                err = self._orphan_errors.popleft()
                self._finish(rid)
                raise exception_from_reply(err.code, err.message, err.exit_code)
            if self._ep is None:
                raise DaemonUnreachableError("the client is closed")
            silent = time.monotonic() - silent_since
            if silent >= timeout:
                self._cancel(rid)
                raise DaemonTimeoutError(f"sllmd at {self.socket} sent nothing for {timeout:g}s")
            if not probed and silent >= self._silence_probe_s:
                probed = True   # a live daemon beats every heartbeat_s; check that it still listens
                if self.address.startswith("ipc://") and not probe_ipc(self.socket):
                    self._finish(rid)
                    raise DaemonUnreachableError(f"sllmd at {self.socket} went away")
            if self._receive_one(min(timeout - silent, self._silence_probe_s)):
                continue

    def _finish(self, rid: int) -> None:
        self._open.discard(rid)
        self._inbox.pop(rid, None)

    def _cancel(self, rid: int) -> None:
        if rid in self._open:
            self._finish(rid)
            if self._ep is not None:
                try:
                    self._ep.send(encode(self._cancel_message(rid)), 0.5)
                except Exception:   # best effort: the daemon also notices a closed connection
                    log.debug("could not send cancel for %d", rid, exc_info=True)

    def _call(self, make: Callable[[int], Message]) -> Any:
        """Sends a request and returns its result data; says hello again once if the daemon restarted."""
        for attempt in (1, 2):
            msg = _build(make, next(self._ids))
            self._send(msg)
            try:
                reply = self._wait(msg.id, self.timeout)
            except HandshakeRequiredError:
                if attempt == 2:
                    raise
                self._handshake()
                continue
            if not isinstance(reply, Result):
                raise BadMessageError(f"expected result, got {reply.TYPE}")
            return reply.data

    # --- operations -----------------------------------------------------------------------------------
    def ping(self) -> float:
        """Round trip time in seconds."""
        t = time.perf_counter()
        self._call(lambda i: Ping(id=i))
        return time.perf_counter() - t

    def status(self) -> dict:
        return self._call(lambda i: Status(id=i))

    def models(self, all: bool = False) -> list[dict]:
        """This node's models; all=True: every cluster node's, each row with its "node"."""
        return self._call(lambda i: Models(id=i, all=all))

    def ps(self, all: bool = False) -> list[dict]:
        """This node's instances; all=True: every cluster node's, each row with its "node"."""
        return self._call(lambda i: Ps(id=i, all=all))

    def requests(self, all: bool = False) -> list[dict]:
        """Running and queued requests (id, model, tokens_in, tokens_out, state, age_s, node)."""
        from sllmd.protocol.messages import Requests
        return self._call(lambda i: Requests(id=i, all=all))

    def nodes(self) -> list[dict]:
        """The cluster's members (name, status, addresses, public key); without a cluster, this node."""
        from sllmd.protocol.messages import Nodes
        return self._call(lambda i: Nodes(id=i))

    def metrics(self) -> str:
        """The daemon's Prometheus metrics in the text exposition format (as GET /metrics with --http)."""
        from sllmd.protocol.messages import MetricsRequest
        return self._call(lambda i: MetricsRequest(id=i))

    def migrate(self, request_id: str, to: str) -> dict:
        """Moves the running request `request_id` to cluster node `to` (live migration); returns
        where it runs now, the tokens sent, the pause at the handoff and the steps' times."""
        from sllmd.protocol.messages import Migrate
        return self._call(lambda i: Migrate(id=i, request_id=request_id, to=to))

    def show(self, name: str) -> dict:
        """`models`' entry for NAME plus architecture, parameters, context length, dtype, chat template, path."""
        return self._call(lambda i: Show(id=i, name=name))

    def load(self, name: str, keep_alive: float | str | None = None) -> dict:
        ka = None if keep_alive is None else parse_duration(keep_alive)
        return self._call(lambda i: Load(id=i, name=name, keep_alive=ka))

    def evict(self, name: str, tier: str = "device", force: bool = False) -> dict:
        """force: with tier "ssd", remove the model even if it is pinned."""
        return self._call(lambda i: Evict(id=i, name=name, tier=tier, force=force))

    def remove(self, name: str, force: bool = False) -> dict:
        """Removes NAME from every tier (a pinned one only with force; an import in flight is
        cancelled: the reply then says "cancelled_import")."""
        return self._call(lambda i: Remove(id=i, name=name, force=force))

    def pin(self, name: str) -> None:
        self._call(lambda i: Pin(id=i, name=name))

    def unpin(self, name: str) -> None:
        self._call(lambda i: Unpin(id=i, name=name))

    def import_model(self, name: str, source: str | os.PathLike,
                     progress: Callable[[int, int], None] | None = None,
                     on_event: Callable[[str, dict], None] | None = None, no_tokenizer: bool = False) -> dict:
        """Imports SOURCE (our format, a HF model directory, .safetensors, .gguf) as NAME.
        The daemon refuses a model it could not serve; no_tokenizer accepts one without a tokenizer.

        progress(bytes written, bytes total); on_event(name, data) hears "phase" (what the
        import is doing: phase, done, total, unit, elapsed_s) and "evicted" (a model removed to
        make room under --ssd-capacity; the reply's "evicted" lists them all too).

        A local path is made absolute here: the daemon runs in another directory.
        """
        source = os.fspath(source)
        if os.path.exists(source):
            source = os.path.abspath(source)
        for msg in self._stream(lambda i: Import(id=i, name=name, source=source, no_tokenizer=no_tokenizer)):
            if isinstance(msg, Progress) and progress is not None:
                progress(msg.done, msg.total)
            elif isinstance(msg, Event) and on_event is not None:
                on_event(msg.event, msg.data or {})
            elif isinstance(msg, Result):
                return msg.data
        raise BadMessageError("import ended without a result")

    def infer(self, model: str, prompt: str | None = None, *, messages: list[dict] | None = None,
              max_tokens: int | None = None, temperature: float | None = None, top_p: float | None = None,
              seed: int | None = None, stop: list[str] | None = None, keep_alive: float | str | None = None,
              chat: bool = True, node: str | None = None) -> "InferStream":
        """Starts a generation; iterate the result for text pieces (or `.events()` for dicts).

        Closing the stream early (or leaving a `for` loop over it) cancels the request in the daemon.
        """
        ka = None if keep_alive is None else parse_duration(keep_alive)
        make = lambda i: Infer(id=i, model=model, prompt=prompt, messages=messages, max_tokens=max_tokens,  # noqa: E731
                               temperature=temperature, top_p=top_p, seed=seed, stop=stop, keep_alive=ka, chat=chat,
                               node=node)   # node: run on that cluster node (None: placement picks)
        _build(make, 0)   # validate now, in the caller's frame, rather than on first iteration
        return InferStream(self, self._stream(make))

    def watch(self, interval_s: float = 0.5, cluster: bool = False, max_events: int = 1000) -> "WatchStream":
        """Streams the daemon's state: iterate for update dicts (seq, time, dropped, snapshot,
        events; see sllmd.watch), one at most every interval_s, until closed. Closing the stream
        (or leaving a `for` loop over it) ends the watch in the daemon. cluster: the snapshot's
        models/ps/requests/nodes are every cluster node's. max_events: events the daemon holds
        for this watcher while it does not read (the rest are dropped and counted)."""
        from sllmd.protocol.messages import Watch
        make = lambda i: Watch(id=i, interval_s=interval_s, cluster=cluster, max_events=max_events)  # noqa: E731
        _build(make, 0)
        replies = self._stream(make)
        first = next(replies)   # the watch runs from here on: what happens next is in its updates
        return WatchStream(self, replies, first)

    def _ack(self, rid: int, seq: int) -> None:
        """Tells the daemon the replies of stream `rid` up to `seq` were taken (watch's flow control)."""
        if rid in self._open and self._ep is not None:
            if not self._ep.send(encode(self._ack_message(rid, seq)), self.timeout):
                raise DaemonTimeoutError(f"could not send to sllmd at {self.socket} within {self.timeout:g}s")

    def generate(self, model: str, prompt: str | None = None, **kwargs) -> str:
        """The whole text of an `infer` (same arguments)."""
        with self.infer(model, prompt, **kwargs) as stream:
            return "".join(stream)

    def _stream(self, make: Callable[[int], Message]) -> Iterator[Message]:
        """Every reply to one streaming request, up to and including its final one."""
        for attempt in (1, 2):
            msg = _build(make, next(self._ids))
            self._send(msg)
            try:
                first = self._wait(msg.id, self.timeout)
            except HandshakeRequiredError:
                if attempt == 2:
                    raise
                self._handshake()
                continue
            break
        try:
            reply = first
            while True:
                yield reply
                if isinstance(reply, Result | Done):
                    return
                reply = self._wait(msg.id, self.timeout)
        finally:
            self._cancel(msg.id)   # a no-op once the request has finished


class InferStream:
    """The replies of one infer request. Iterating yields text pieces; `events()` yields dicts:
    {"type": "token", "text", "token_id"}, other events as {"type": NAME, ...}, and last
    {"type": "done", "stats": {...}}. `stats` holds the final stats once the stream is done."""

    def __init__(self, client: Client, replies: Iterator[Message]):
        self._client = client
        self._replies = replies
        self.stats: dict | None = None
        self.done = False

    def events(self) -> Iterator[dict]:
        try:
            for msg in self._replies:
                if isinstance(msg, Token):
                    yield {"type": "token", "text": msg.text, "token_id": msg.token_id, "index": msg.index}
                elif isinstance(msg, Event):
                    yield {"type": msg.event, **(msg.data or {})}
                elif isinstance(msg, Done):
                    self.stats, self.done = msg.stats or {}, True
                    yield {"type": "done", "stats": self.stats}
                    return
        finally:
            if not self.done:
                self.close()

    def __iter__(self) -> Iterator[str]:
        for event in self.events():
            if event["type"] == "token":
                yield event["text"]

    def text(self) -> str:
        return "".join(self)

    def close(self) -> None:
        """Cancels the request if it is still running."""
        self._replies.close()

    def __enter__(self) -> "InferStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class WatchStream:
    """The updates of one watch request, as dicts (sllmd.watch describes them); `close()`
    (or leaving a `with` block) ends the watch in the daemon. Each update taken from the
    iterator is acknowledged: a caller that stops iterating makes the daemon hold back. The
    watch starts when Client.watch returns (its first update already came)."""

    def __init__(self, client: Client, replies: Iterator[Message], first: Message | None = None):
        self._client = client
        self._replies = replies
        self._first = first     # the first reply, taken when the watch was opened
        self.closed = False

    def __iter__(self) -> Iterator[dict]:
        """Updates until closed; leaving a `for` loop over it early closes the watch."""
        try:
            while True:
                try:
                    yield next(self)
                except StopIteration:
                    return
        finally:
            self.close()

    def __next__(self) -> dict:
        if self.closed:
            raise StopIteration
        from sllmd.protocol.messages import Update
        while True:
            msg, self._first = self._first, None
            if msg is None:
                try:
                    msg = next(self._replies)
                except StopIteration:
                    self.closed = True
                    raise
            if isinstance(msg, Update):
                self._client._ack(msg.id, int(msg.data.get("seq", 0)))
                return msg.data

    def close(self) -> None:
        """Ends the watch in the daemon (idempotent)."""
        if not self.closed:
            self.closed = True
            self._replies.close()

    def __enter__(self) -> "WatchStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
