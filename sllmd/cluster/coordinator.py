"""Any node coordinates: the cluster side of one sllmd.

    Serf (membership) ──tags: ep, pk, v──► sync thread ──StatePull when v moved──► peer views
    client infer ──► Cluster.infer ──place()──► this node: Node.infer
                                           └──► a peer: PeerClient.infer, relayed token by token

The sync thread keeps this node's digest (peer endpoint, Curve key, state version) in its
Serf tags and pulls a peer's full state when the version it gossips moves (and every
REFRESH_S, so a quiet peer's state does not go stale). A relayed stream runs on the server's
stream thread that asked for it: no extra thread per forwarded request. A candidate that
refuses or fails before its first token hands the request to the next one; after the first
token a failure is the client's error (live migration will do better).
"""
from __future__ import annotations

import dataclasses
import logging
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterator

from sllmd.errors import (CancelledError, InvalidRequestError, NodeNotFoundError, PeerFailedError, ShuttingDownError,
                          SllmError)

log = logging.getLogger(__name__)

SYNC_INTERVAL_S = 0.05     # how often the digest and the members' versions are compared
REFRESH_S = 3.0            # a peer's state is pulled at least this often while it is alive
STALE_AFTER_S = 10.0       # a view older than this is unknown to placement
REPOSITORY_INDEX_AGE_S = 5.0   # placement reads a repository's index at most this often
PULL_WORKERS = 4
LIVE = ("alive", "suspect")
# Errors that the next candidate would repeat: the request itself is at fault, or it was stopped.
FINAL = (InvalidRequestError, CancelledError, ShuttingDownError)


def _key_text(key: Any) -> str | None:
    if key is None:
        return None
    return key.decode("ascii", "replace") if isinstance(key, (bytes, bytearray)) else str(key)


def _request_dict(request: Any) -> dict:
    return dict(request) if isinstance(request, dict) else request.to_dict()


def _estimate(e: Any) -> dict | None:
    return None if e is None else dataclasses.asdict(e)


class Cluster:
    def __init__(self, config, node, *, membership=None, transport_keys: tuple[bytes, bytes] | None = None):
        self.config = config
        self.node = node
        self.name: str = getattr(config, "node_name", None) or socket.gethostname()
        self._membership = membership
        self._keys = transport_keys
        self._views: dict[str, Any] = {}              # peer name -> NodeView (last pulled)
        self._clients: dict[str, Any] = {}            # peer name -> PeerClient
        self._pulling: set[str] = set()
        self._refused: dict[str, tuple[int, float]] = {}   # peer -> (version, when) of a state placement cannot use
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._sync_thread: threading.Thread | None = None
        self._pulls: ThreadPoolExecutor | None = None
        self._peer_server = None
        self._endpoint = None
        self._published: int | None = None
        self._advertised: str | None = None      # the peer endpoint gossiped (the bound one, never a wildcard)
        self.migrations = None                   # sllmd.cluster.migration.Migrations once started
        self.serial = 0     # moves whenever a member or a pulled view changes: `nodes` snapshots are keyed on it
        self._member_status: dict[str, str] = {}  # member -> the status last told to watchers (`node` events)

    # --- lifecycle --------------------------------------------------------------------------------
    def start(self) -> None:
        from sllmd.cluster import curve_keys
        from sllmd.cluster.membership import Membership
        from sllmd.cluster.peer_server import PeerServer
        from sllmd.cluster.peer_transport import advertised_endpoint, bind_peer
        if self._keys is None:
            self._keys = curve_keys.load_or_create(self.config.state_dir)
        public, secret = self._keys
        try:
            from sllmd.cluster.bandwidth import probe
            log.info("bandwidth probe: %s", probe(self.node))   # seeds the EWMAs real loads then refine
        except Exception:
            log.exception("the bandwidth probe failed; placement uses the cluster's measurements")
        if self._membership is None:
            self._membership = Membership(self.config, on_change=self._member_changed)
        self._endpoint = bind_peer(self.config.peer_listen, public, secret, admitted=self._admitted)
        self._advertised = advertised_endpoint(self._endpoint.address, getattr(self.config, "gossip_listen", None))
        from sllmd.cluster.migration import Migrations
        self.migrations = Migrations(self.node, self._peer_client, self._is_alive, self.name)
        self._peer_server = PeerServer(self.node, self._endpoint, state_provider=self._local_state,
                                       migrations=self.migrations)
        self._peer_server.start()
        fetcher = getattr(self.node, "repositories", None)
        if fetcher is not None:
            fetcher.peers = self.holders_of   # peer transfer: a model a member holds comes from it
        self._membership.start()
        self._publish()
        self._pulls = ThreadPoolExecutor(PULL_WORKERS, thread_name_prefix="sllmd-cluster-pull")
        self._sync_thread = threading.Thread(target=self._sync_loop, name="sllmd-cluster-sync", daemon=True)
        self._sync_thread.start()
        log.info("cluster node %s: peer socket %s, public key %s", self.name, self._advertised,
                 _key_text(public))

    def close(self) -> None:
        """Leaves the cluster (peers see `left`), then stops serving peers. Idempotent."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._wake.set()
        if getattr(getattr(self.node, "repositories", None), "peers", None) == self.holders_of:
            self.node.repositories.peers = None
        if self._sync_thread is not None:
            self._sync_thread.join(5.0)
        if self._pulls is not None:
            self._pulls.shutdown(wait=False, cancel_futures=True)
        for step, what in ((lambda: self._membership.stop(), "leaving the cluster"),
                           (lambda: self._peer_server.close(), "closing the peer server")):
            try:
                step()
            except AttributeError:
                pass   # never started
            except Exception:
                log.exception("%s failed", what)
        with self._lock:
            clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            try:
                client.close()
            except Exception:
                log.debug("closing a peer client failed", exc_info=True)

    # --- membership and state ---------------------------------------------------------------------
    def _admitted(self, key: bytes) -> bool:
        try:
            return key in self._membership.admitted_keys()
        except Exception:
            log.exception("the admitted keys are unknown; refusing %r", key)
            return False

    def _member_changed(self, member) -> None:
        """Membership saw a change: pull again, and tell watchers (a `node` event: joined when
        first seen, then alive/suspect/failed/left as its status changes)."""
        self._wake.set()
        with self._lock:
            before = self._member_status.get(member.name)
            self._member_status[member.name] = member.status
            self.serial += 1
        if before == member.status:
            return
        events = getattr(self.node, "events", None)
        if events is not None:
            status = "joined" if before is None and member.status == "alive" else member.status
            events.publish("node", name=member.name, status=status, previous=before, address=member.address,
                           self=member.name == self.name)

    def _local_state(self) -> tuple[int, dict]:
        from sllmd.cluster.locality import local_state
        version = self.node.version
        return version, local_state(self.node)

    def _publish(self) -> None:
        version = self.node.version
        self._membership.publish(endpoint=self._advertised, public_key=self._keys[0], version=version)
        self._published = version

    def _sync_loop(self) -> None:
        while not self._stop.is_set():
            try:
                if self.node.version != self._published:
                    self._publish()
                self._pull_moved()
            except Exception:
                log.exception("cluster sync failed; retrying")
            self._wake.wait(SYNC_INTERVAL_S)
            self._wake.clear()

    def _pull_moved(self) -> None:
        now = time.monotonic()
        for m in self._membership.members():
            if m.name == self.name or m.status not in LIVE or not m.endpoint or not m.public_key:
                continue
            with self._lock:
                view = self._views.get(m.name)
                if m.name in self._pulling:
                    continue
                if view is not None and view.version == m.version and now - view.fetched_at < REFRESH_S:
                    continue
                refused = self._refused.get(m.name)
                if refused is not None and refused[0] == m.version and now - refused[1] < REFRESH_S:
                    continue   # its state at this version was unusable: asked again after a while
                self._pulling.add(m.name)
            self._pulls.submit(self._pull, m)

    def _pull(self, member) -> None:
        from sllmd.cluster.locality import NodeView, state_problem
        try:
            version, state = self._client(member).state()
            problem = state_problem(state)
            if problem is not None:   # that peer's view stays as it was (and goes stale): nobody else pays
                log.warning("ignoring the state pulled from %s: %s", member.name, problem)
                with self._lock:
                    self._refused[member.name] = (member.version, time.monotonic())
                return
            with self._lock:
                old = self._views.get(member.name)
                self._views[member.name] = NodeView(name=member.name, status=member.status, state=state,
                                                    version=version, fetched_at=time.monotonic())
                if old is None or old.version != version:
                    self.serial += 1
            log.debug("pulled the state of %s (version %d)", member.name, version)
        except Exception as e:
            log.info("could not pull the state of %s: %s", member.name, e)
            self._drop_client(member.name)
        finally:
            with self._lock:
                self._pulling.discard(member.name)

    def _client(self, member):
        from sllmd.cluster.peer_server import PeerClient
        with self._lock:
            client = self._clients.get(member.name)
            if client is not None and (client.address, client.server_public) == (member.endpoint, member.public_key):
                return client
        public, secret = self._keys
        client = PeerClient(member.endpoint, member.public_key, public, secret, node_name=self.name)
        with self._lock:
            old = self._clients.get(member.name)
            self._clients[member.name] = client
        if old is not None:
            old.close()
        return client

    def holders_of(self, model: str) -> list[tuple[str, Any]]:
        """Peer transfer's sources: the alive peers whose last pulled state has `model` on SSD, as
        (name, PeerClient), in name order."""
        with self._lock:
            pulled = dict(self._views)
        out = []
        for m in sorted(self._membership.members(), key=lambda m: m.name):
            view = pulled.get(m.name)
            if m.name == self.name or m.status not in LIVE or view is None or not m.endpoint or not m.public_key:
                continue
            if any(x.get("name") == model and "ssd" in (x.get("tiers") or []) and not x.get("error")
                   and x.get("state") != "importing" for x in (view.state or {}).get("models") or []):
                out.append((m.name, self._client(m)))
        return out

    def _peer_client(self, name: str):
        member = self._membership.get(name)
        if member is None or member.status not in LIVE or not member.endpoint or not member.public_key:
            raise NodeNotFoundError(f"node {name!r} is not an alive member; see `sllmctl nodes`")
        return self._client(member)

    def watch_peers(self) -> list[str]:
        """The live members, other than this node, whose watch stream can be asked for."""
        return sorted(m.name for m in self._membership.members()
                      if m.name != self.name and m.status in LIVE and m.endpoint and m.public_key)

    def peer_watch(self, name: str, interval_s: float, max_events: int) -> Iterator[dict]:
        """Member `name`'s own watch updates (peer_watch); closing the iterator ends it there."""
        return self._peer_client(name).watch(interval_s=interval_s, max_events=max_events)

    def _is_alive(self, name: str) -> bool:
        member = self._membership.get(name)
        return member is not None and member.status in LIVE

    def migrate(self, request_id: str, to: str) -> dict:
        """Moves a running request to node `to`: here if it runs here, else asks the node running it."""
        from sllmd.errors import RequestNotFoundError
        if to != self.name and not self._is_alive(to):
            raise NodeNotFoundError(f"node {to!r} is not an alive member; see `sllmctl nodes`")
        matches = [r["id"] for r in self.node.requests() if str(r.get("id", "")).startswith(request_id)]
        if len(matches) == 1:   # `sllmctl requests` shows ids cut short: a unique prefix names one
            request_id = matches[0]
        if self.node.find_request(request_id) is not None:
            return self.migrations.migrate(request_id, to)
        for row in self.requests_all():
            if row.get("id") == request_id and row.get("node") != self.name:
                return self._peer_client(row["node"]).migrate(request_id, to)
        raise RequestNotFoundError(f"no node runs a request {request_id} (see `sllmctl requests --all`)")

    def _drop_client(self, name: str) -> None:
        with self._lock:
            client = self._clients.pop(name, None)
        if client is not None:
            try:
                client.close()
            except Exception:
                pass

    def views(self) -> list:
        """This node's state (taken now) and every member's last pulled state, with its current status."""
        from sllmd.cluster.locality import NodeView
        version, state = self._local_state()
        out = [NodeView(name=self.name, status="alive", state=state, version=version, fetched_at=time.monotonic())]
        with self._lock:
            pulled = dict(self._views)
        for m in self._membership.members():
            if m.name == self.name or m.name not in pulled:
                continue
            out.append(dataclasses.replace(pulled[m.name], status=m.status))
        return out

    def nodes(self) -> list[dict]:
        """Every member, this one included: name, status, addresses, Curve public key, its state."""
        now_wall, now = time.time(), time.monotonic()
        with self._lock:
            pulled = dict(self._views)
        version, state = self._local_state()
        out = []
        for m in sorted(self._membership.members(), key=lambda m: m.name):
            mine = m.name == self.name
            view = pulled.get(m.name)
            out.append({
                "name": m.name, "status": "alive" if mine else m.status, "address": m.address,
                "endpoint": m.endpoint, "public_key": _key_text(m.public_key), "version": m.version, "self": mine,
                "last_heard": now_wall if mine else m.last_heard,
                "state": state if mine else (view.state if view is not None else None),
                "state_age_s": 0.0 if mine else (now - view.fetched_at if view is not None else None)})
        if not any(n["self"] for n in out):   # Serf has not listed us yet
            out.insert(0, {"name": self.name, "status": "alive", "address": getattr(self.config, "gossip_listen", None),
                           "endpoint": self._advertised, "public_key": _key_text(self._keys[0]),
                           "version": version, "self": True, "last_heard": now_wall, "state": state,
                           "state_age_s": 0.0})
        return out

    def member_statuses(self) -> dict[str, int]:
        """How many members are in each status, this node counted alive (sllmd_cluster_nodes)."""
        counts = {"alive": 1}
        for m in self._membership.members():
            if m.name != self.name:
                counts[m.status] = counts.get(m.status, 0) + 1
        return counts

    def _per_node(self, key: str, local: Callable[[], list[dict]]) -> list[dict]:
        rows = [dict(r, node=self.name) for r in local()]
        with self._lock:
            pulled = dict(self._views)
        for name, view in sorted(pulled.items()):
            member = self._membership.get(name)
            if member is None or member.status not in LIVE:
                continue
            items = (view.state or {}).get(key) or []
            if isinstance(items, dict):
                items = [dict(v, name=k) if isinstance(v, dict) else {"name": k, "value": v} for k, v in items.items()]
            rows.extend(dict(r, node=name) for r in items if isinstance(r, dict))
        return rows

    def models_all(self) -> list[dict]:
        return self._per_node("models", self.node.models)

    def ps_all(self) -> list[dict]:
        return self._per_node("instances", self.node.ps)

    def requests_all(self) -> list[dict]:
        local = getattr(self.node, "requests", None)
        return self._per_node("requests", local if local is not None else list)

    # --- requests ---------------------------------------------------------------------------------
    def infer(self, request, cancelled: threading.Event | None = None, *, node: str | None = None) -> Iterator[dict]:
        """Places the request (or sends it to `node`), runs it there and streams its events.
        Raises before streaming when no candidate accepts it."""
        req = _request_dict(request)
        model = req["model"]
        t0 = time.perf_counter()
        decision, order = self._candidates(model, node)
        place_ms = (time.perf_counter() - t0) * 1e3
        tried: list[dict] = []
        made_room: list[dict] = []
        for name in order:
            if cancelled is not None and cancelled.is_set():
                raise CancelledError("request cancelled")
            t1 = time.perf_counter()
            option = self._option(decision, name)
            if option is not None and option.path == "migration":   # move the requests that fill its device
                from sllmd.cluster.make_room import run_moves
                made_room = run_moves(option, lambda rid, to, why, at=name: self._migrate_on(at, rid, to, why))
                log.info("infer %s: made room on %s by moving %s", model, name, made_room)
            try:
                events, first = self._open(name, request, req, cancelled)
            except FINAL:
                raise
            except SllmError as e:
                if node is not None or len(order) == 1:
                    raise
                log.info("infer %s: %s refused or failed before its first token (%s: %s); trying the next",
                         model, name, e.code, e)
                tried.append({"node": name, "error": e.code, "message": str(e)})
                continue
            except Exception as e:
                if node is not None or len(order) == 1:
                    raise PeerFailedError(f"node {name} failed: {e}") from e
                log.info("infer %s: %s failed before its first token (%s); trying the next", model, name, e)
                tried.append({"node": name, "error": "peer_failed", "message": str(e)})
                continue
            placement = {"node": name, "forced": node is not None, "tried": tried, "place_ms": place_ms,
                         "path": option.path if option is not None else None, "made_room": made_room,
                         "first_event_ms": (time.perf_counter() - t1) * 1e3,
                         "winner": _estimate(decision.winner) if decision else None,
                         "runner_up": _estimate(decision.runner_up) if decision else None,
                         "candidates": [_estimate(c) for c in decision.candidates] if decision else []}
            log.debug("infer %s placed on %s: %s", model, name, placement)
            return self._relay(name, events, first, placement, cancelled)
        raise PeerFailedError(f"no node could run {model!r}: " +
                              "; ".join(f"{t['node']}: {t['message']}" for t in tried))

    def _candidates(self, model: str, forced: str | None) -> tuple[Any, list[str]]:
        if forced is not None:
            if forced != self.name:
                member = self._membership.get(forced)
                if member is None or member.status not in LIVE:
                    state = "is " + member.status if member is not None else "is not a member"
                    raise NodeNotFoundError(f"node {forced!r} {state}; see `sllmctl nodes`")
            return None, [forced]
        from sllmd.cluster import make_room
        from sllmd.cluster.placement import place
        views, now = self.views(), time.monotonic()
        repository = self._repository_sizes(model, views)
        decision = place(model, views, now, stale_after_s=STALE_AFTER_S, prefer=self.name,   # a tie is served
                         repository=repository,                                             # here: no hop
                         migration=make_room.hook(views, now, stale_after_s=STALE_AFTER_S, repository=repository))
        order = list(dict.fromkeys(c.node for c in decision.candidates))   # place() orders them: known, then stale
        if not order:
            order = [self.name]   # nobody is known to hold it: this node answers (model_not_found, or runs it)
        return decision, order

    def _repository_sizes(self, model: str, views: list) -> dict[str, int]:
        """{model: size} when no node holds `model` and this node's repositories list it: the
        repository path placement then prices on every node that can fetch from one. (This
        node's repositories stand for theirs: nodes of one cluster share them, as a rule.)"""
        from sllmd.cluster.placement import holding
        fetcher = getattr(self.node, "repositories", None)
        if fetcher is None or not getattr(fetcher, "repositories", None) or holding(model, views):
            return {}
        try:
            found = fetcher.lookup(model, max_age_s=REPOSITORY_INDEX_AGE_S)
        except Exception as e:
            log.info("the repositories could not be asked for %s: %s", model, e)
            return {}
        return {model: int(found[1].size_bytes)} if found is not None else {}

    @staticmethod
    def _option(decision, name: str):
        """The estimate that put `name` in the order (its best option), None when forced."""
        if decision is None:
            return None
        return next((c for c in decision.candidates if c.node == name), None)

    def _migrate_on(self, at: str, request_id: str, to: str, reason: str) -> dict:
        """Node `at`, which runs `request_id`, moves it to `to` (the scheduler's migration option)."""
        if at == self.name:
            return self.migrations.migrate(request_id, to, reason=reason)
        return self._peer_client(at).migrate(request_id, to, reason=reason)

    def _open(self, name: str, request, req: dict, cancelled) -> tuple[Iterator[dict], dict | None]:
        """Starts the request on `name`; returns its event stream and its first event (None: it ended)."""
        if name == self.name:
            events = self.migrations.run(request, cancelled) if self.migrations is not None \
                else self.node.infer(request, cancelled=cancelled)
        else:
            member = self._membership.get(name)
            if member is None or member.status not in LIVE or not member.endpoint:
                raise PeerFailedError(f"node {name} is not alive")
            try:
                events = iter(self._client(member).infer(req))
            except Exception:
                self._drop_client(name)
                raise
        try:
            first = self._next_event(events, cancelled)
        except BaseException:
            close = getattr(events, "close", None)
            if close is not None:
                close()
            if name != self.name:
                self._drop_client(name)
            raise
        return events, first

    @staticmethod
    def _next_event(events: Iterator[dict], cancelled) -> dict | None:
        """The next token/done/progress event (heartbeats skipped); None at the end of the stream."""
        for ev in events:
            if cancelled is not None and cancelled.is_set():
                raise CancelledError("request cancelled")
            if ev.get("type") != "heartbeat":
                return ev
        return None

    def _relay(self, name: str, events: Iterator[dict], first: dict | None, placement: dict,
               cancelled) -> Iterator[dict]:
        stats = getattr(self.node, "stats", None)
        if name != self.name and stats is not None:   # counted in sllmd_requests_total where it runs
            stats.request_forwarded()
        sent = 0
        ev = first
        try:
            while ev is not None:
                kind = ev.get("type")
                if kind == "token":
                    index = ev.get("index")
                    if index is not None and index < sent:
                        log.warning("dropping a duplicate token %d from %s", index, name)
                    else:
                        sent += 1
                        yield {k: v for k, v in ev.items() if k != "index"}
                elif kind == "done":
                    stats = dict(ev.get("stats") or {})
                    stats["placement"] = placement
                    yield dict(ev, stats=stats)
                    if name == self.name:   # the node's generator ends on its own (its cleanup runs first)
                        for extra in events:
                            log.warning("ignoring %r after done", extra.get("type"))
                    return
                else:
                    yield ev
                try:
                    ev = self._next_event(events, cancelled)
                except FINAL:
                    raise
                except Exception as e:
                    if name == self.name:
                        raise
                    self._drop_client(name)
                    code = getattr(e, "code", type(e).__name__)
                    raise PeerFailedError(f"node {name} failed after {sent} token(s): {code}: {e}") from e
            if name != self.name:
                raise PeerFailedError(f"node {name} ended the stream after {sent} token(s) without finishing")
        finally:
            close = getattr(events, "close", None)
            if close is not None:
                close()   # a cancel or an early end: the node (or peer, through PeerCancel) stops the request
