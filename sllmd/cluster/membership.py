"""The node's view of its peers, driven by Serf's membership events.

Membership starts its own Serf agent (or attaches to one with --serf-rpc), joins the --join
addresses (retrying until one answers), streams member events and keeps `members()` current.
A supervisor thread restarts an agent that died and re-publishes this node's tags. Tags carry
only the digest: "ep" (peer endpoint), "pk" (Curve public key, z85) and "v" (state version).
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, replace
from typing import Callable

from sllmd.cluster.cluster_key import load_cluster_key
from sllmd.cluster.serf_agent import SerfAgent
from sllmd.cluster.serf_rpc import SerfRpc, SerfRpcError

log = logging.getLogger(__name__)

EVENTS = "member-join,member-leave,member-failed,member-update,member-reap"
# The agent streams member events only after ~1 s of quiet (its coalescing, not configurable),
# while gossip carries a tag change in ~0.15-0.2 s on loopback: the member list is also read
# this often, so a peer's new state version is seen in about the gossip time. The interval
# grows with the cluster (a members call lists everyone), reaching the events' own pace at
# 500 members.
def members_poll_s(n_members: int) -> float:
    return min(1.0, max(0.1, 0.002 * n_members))
TAG_LIMIT = 512          # Serf's limit on a member's encoded tags


@dataclass(frozen=True)
class Member:
    name: str
    status: str                 # alive | suspect | failed | left
    address: str                # gossip HOST:PORT
    endpoint: str | None
    public_key: bytes | None
    version: int
    last_heard: float


def member_from_serf(m: dict, now: float | None = None) -> Member:
    tags = m.get("Tags") or {}
    try:
        version = int(tags.get("v", 0))
    except ValueError:
        version = 0
    pk = tags.get("pk")
    return Member(name=m["Name"], status=m.get("Status", "alive"), address=f"{m.get('Addr')}:{m.get('Port')}",
                  endpoint=tags.get("ep") or None, public_key=pk.encode() if pk else None, version=version,
                  last_heard=time.time() if now is None else now)


class Membership:
    def __init__(self, config, on_change: Callable[[Member], None] | None = None, *, poll_s: float = 0.5,
                 log_dir=None):
        self.config, self.on_change, self.poll_s, self.log_dir = config, on_change, poll_s, log_dir
        self._members: dict[str, Member] = {}
        self._tags: dict[str, str] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._agent: SerfAgent | None = None
        self._rpc: SerfRpc | None = None
        self._thread: threading.Thread | None = None
        self.joined = threading.Event()

    # --- life ---------------------------------------------------------------------------------
    def start(self) -> None:
        c = self.config
        if c.serf_rpc:
            self._rpc_address, self._rpc_auth = c.serf_rpc, None
        else:
            key = load_cluster_key(c.cluster_key) if c.cluster_key else None
            self._agent = SerfAgent(c.node_name, c.gossip_listen or "127.0.0.1:7946", key, self._tags,
                                    profile=c.serf_profile, log_dir=self.log_dir)
            self._agent.start()
            self._rpc_address, self._rpc_auth = self._agent.rpc_address, self._agent.rpc_auth
        self._connect()
        self._thread = threading.Thread(target=self._supervise, name="membership", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        rpc, self._rpc = self._rpc, None
        if rpc is not None:
            if self._agent is not None:
                try:
                    rpc.leave()
                except SerfRpcError as e:
                    log.debug("serf leave: %s", e)
            rpc.close()
        if self._agent is not None:
            self._agent.stop()

    def _connect(self) -> None:
        rpc = SerfRpc(self._rpc_address, self._rpc_auth)
        rpc.stream(EVENTS, self._on_event)
        if self._tags:
            rpc.update_tags(self._tags)
        self._rpc = rpc
        self._refresh()

    def _supervise(self) -> None:
        """Joins until one address answers, restarts a dead agent, reconnects a lost RPC, and
        reads the member list between the agent's (coalesced) events."""
        next_check = time.monotonic()
        while not self._stopping.wait(min(self.poll_s, members_poll_s(len(self._members)))):
            if self._rpc is not None and not self._rpc.closed:
                try:
                    self._refresh()
                except SerfRpcError as e:
                    log.debug("membership: reading members: %s", e)
            if time.monotonic() < next_check:
                continue
            next_check = time.monotonic() + self.poll_s
            try:
                if self._agent is not None and not self._agent.alive():
                    log.warning("serf agent died; restarting it")
                    if self._rpc is not None:
                        self._rpc.close()
                    self._rpc = None
                    self._agent.restart()
                    self.joined.clear()
                if self._rpc is None or self._rpc.closed:
                    self._connect()
                if not self.joined.is_set():
                    self._try_join()
            except SerfRpcError as e:
                log.warning("membership: %s", e)

    def _try_join(self) -> None:
        if not self.config.join:
            self.joined.set()
            return
        try:
            n = self._rpc.join(list(self.config.join))
        except SerfRpcError as e:
            log.info("join %s: %s (retrying)", ",".join(self.config.join), e)
            return
        if n > 0:
            log.info("joined the cluster through %d of %s", n, ",".join(self.config.join))
            self.joined.set()
            self._refresh()

    # --- the view -----------------------------------------------------------------------------
    def _refresh(self) -> None:
        for m in self._rpc.members():
            self._update(member_from_serf(m))

    def _on_event(self, event: dict) -> None:
        for m in event.get("Members", []):
            member = member_from_serf(m)
            if event.get("Event") == "member-reap":
                with self._lock:
                    self._members.pop(member.name, None)
                member = replace(member, status="left")
                if self.on_change:
                    self.on_change(member)
                continue
            self._update(member)

    def _update(self, member: Member) -> None:
        with self._lock:
            old = self._members.get(member.name)
            if old is not None and member.status not in ("alive", "suspect"):
                # failed or departed: last heard is when it was last heard alive, not when we learnt it
                member = replace(member, last_heard=old.last_heard)
            self._members[member.name] = member
        if self.on_change and (old is None or replace(old, last_heard=0) != replace(member, last_heard=0)):
            try:
                self.on_change(member)
            except Exception:
                log.exception("membership on_change failed for %s", member.name)

    def members(self) -> list[Member]:
        with self._lock:
            return sorted(self._members.values(), key=lambda m: m.name)

    def get(self, name) -> Member | None:
        with self._lock:
            return self._members.get(name)

    def publish(self, *, endpoint: str, public_key: bytes, version: int) -> None:
        pk = public_key.decode() if isinstance(public_key, bytes) else str(public_key)
        tags = {"ep": endpoint, "pk": pk, "v": str(int(version))}
        if sum(len(k) + len(v) + 4 for k, v in tags.items()) > TAG_LIMIT:
            raise ValueError("membership tags exceed Serf's 512-byte limit")
        self._tags.update(tags)
        if self._agent is not None:
            self._agent.tags = dict(self._tags)
        rpc = self._rpc
        if rpc is not None:
            rpc.update_tags(tags)

    def admitted_keys(self) -> set[bytes]:
        with self._lock:
            return {m.public_key for m in self._members.values()
                    if m.public_key and m.status in ("alive", "suspect")}
