"""A small client of Serf's msgpack RPC (`serf agent -rpc-addr`, IPC version 1).

Every request is a msgpack header {"Command", "Seq"} and, for most commands, a body; every
reply is a header {"Seq", "Error"} followed by a body for the commands that return one. A
`stream` keeps sending event bodies under its Seq until `stop`. One reader thread matches
replies to waiting callers by Seq and hands stream events to their callbacks.
"""
from __future__ import annotations

import ipaddress
import itertools
import logging
import socket
import threading
from typing import Callable

import msgpack

from sllmd.errors import SerfRpcError

log = logging.getLogger(__name__)

IPC_VERSION = 1
BODY_REPLIES = {"members", "members-filtered", "join", "stats", "get-coordinate"}


def _address_text(addr) -> str:
    if isinstance(addr, str):
        addr = addr.encode("utf-8", "surrogateescape")
    try:
        return str(ipaddress.ip_address(bytes(addr)))
    except ValueError:
        return repr(addr)


def normalize_member(m: dict) -> dict:
    """Serf's member map with Addr as text ("127.0.0.1"; IPv4 in IPv6 form unwrapped)."""
    out = dict(m)
    addr = _address_text(m.get("Addr", b""))
    if addr.startswith("::ffff:"):
        addr = addr.removeprefix("::ffff:")
    out["Addr"] = addr
    out["Tags"] = dict(m.get("Tags") or {})
    return out


class SerfRpc:
    def __init__(self, address: str, auth_key: str | None = None, timeout: float = 5.0):
        host, _, port = address.rpartition(":")
        self.address, self.timeout = address, timeout
        try:
            self._sock = socket.create_connection((host, int(port)), timeout=timeout)
        except OSError as e:
            raise SerfRpcError(f"serf rpc: cannot connect to {address}: {e.strerror or e}") from None
        self._sock.settimeout(None)
        self._send_lock = threading.Lock()
        self._seq = itertools.count(1)
        self._pending: dict[int, dict] = {}
        self._streams: dict[int, Callable[[dict], None]] = {}
        self._lock = threading.Lock()
        self._closed = False
        self._reader = threading.Thread(target=self._read_loop, name="serf-rpc", daemon=True)
        self._reader.start()
        self._call("handshake", {"Version": IPC_VERSION})
        if auth_key:
            self._call("auth", {"AuthKey": auth_key})

    # --- the calls ----------------------------------------------------------------------------
    def members(self) -> list[dict]:
        return [normalize_member(m) for m in self._call("members")["Members"]]

    def update_tags(self, tags: dict[str, str], delete: list[str] = ()) -> None:
        self._call("tags", {"Tags": {str(k): str(v) for k, v in tags.items()}, "DeleteTags": list(delete)})

    def join(self, addresses: list[str]) -> int:
        return int(self._call("join", {"Existing": list(addresses), "Replay": False})["Num"])

    def stream(self, types: str, on_event: Callable[[dict], None]) -> int:
        """Subscribes to events ("member-join,member-failed,..." or "*"); on_event runs on the reader thread."""
        return self._call("stream", {"Type": types}, stream=on_event)

    def stop(self, seq: int) -> None:
        self._call("stop", {"Stop": seq})
        with self._lock:
            self._streams.pop(seq, None)

    def leave(self) -> None:
        self._call("leave")

    def close(self) -> None:
        self._closed = True
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        self._reader.join(timeout=self.timeout)

    @property
    def closed(self) -> bool:
        return self._closed

    # --- the wire ----------------------------------------------------------------------------
    def _call(self, command: str, body: dict | None = None, stream: Callable[[dict], None] | None = None):
        seq = next(self._seq)
        waiter = {"event": threading.Event(), "command": command}
        with self._lock:
            if self._closed:
                raise SerfRpcError(f"serf rpc {self.address}: connection closed")
            self._pending[seq] = waiter
            if stream is not None:
                self._streams[seq] = stream
        data = msgpack.packb({"Command": command, "Seq": seq})
        if body is not None:
            data += msgpack.packb(body)
        try:
            with self._send_lock:
                self._sock.sendall(data)
        except OSError as e:
            raise SerfRpcError(f"serf rpc {self.address}: {command}: {e.strerror or e}") from None
        if not waiter["event"].wait(self.timeout):
            with self._lock:
                self._pending.pop(seq, None)
                self._streams.pop(seq, None)
            raise SerfRpcError(f"serf rpc {self.address}: {command}: no answer in {self.timeout:g} s")
        if "lost" in waiter:
            raise SerfRpcError(f"serf rpc {self.address}: {command}: connection lost")
        if waiter.get("error"):
            with self._lock:
                self._streams.pop(seq, None)
            raise SerfRpcError(f"serf rpc {self.address}: {command}: {waiter['error']}")
        return seq if stream is not None else waiter.get("body")

    def _read_loop(self) -> None:
        unpacker = msgpack.Unpacker(raw=False, unicode_errors="surrogateescape")
        objects = self._objects(unpacker)
        try:
            for header in objects:
                seq, error = header.get("Seq"), header.get("Error") or ""
                with self._lock:
                    waiter = self._pending.pop(seq, None)
                    handler = self._streams.get(seq)
                if waiter is not None:
                    if waiter["command"] in BODY_REPLIES:
                        waiter["body"] = next(objects)
                    waiter["error"] = error
                    waiter["event"].set()
                elif handler is not None:
                    event = next(objects)
                    if "Members" in event:
                        event = dict(event, Members=[normalize_member(m) for m in event["Members"]])
                    try:
                        handler(event)
                    except Exception:
                        log.exception("serf event handler failed on %s", event.get("Event"))
                else:
                    log.debug("serf rpc: reply for unknown seq %s", seq)
        except (OSError, StopIteration, ValueError, msgpack.UnpackException) as e:
            if not self._closed:
                log.warning("serf rpc %s: connection lost: %s", self.address, e)
        finally:
            self._closed = True
            with self._lock:
                waiters, self._pending = list(self._pending.values()), {}
            for waiter in waiters:
                waiter["lost"] = True
                waiter["event"].set()

    def _objects(self, unpacker):
        while True:
            for obj in unpacker:
                yield obj
            data = self._sock.recv(65536)
            if not data:
                return
            unpacker.feed(data)
