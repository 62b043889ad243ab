"""Live migration of a running request (DESIGN.md section 9), the source's side and the relay.

    client ◄── this node's stream (unchanged connection) ◄── follow(): tokens from here ...
                                                              └─ after the handoff: tokens from D
    migrate(rid, D):  D loads the model (peer_prepare)
                      the instance stops the request at a token boundary and hands over its state
                      follow() sends the state to D (peer_resume) and relays D's stream

Token-based: what crosses the wire is the request state (prompt and output token ids, sampler
state, detokenizer position: kilobytes), never the KV cache; D prefills it inside its running
batch. The node that ran the request keeps relaying its stream, so the client's connection
never changes and no token is lost or repeated (the instance stops exactly at a token
boundary; D streams only what comes after the state). If D fails or refuses before its first
token, the request resumes here from the same state: the client sees a pause, not an error.

Rounds: before the handoff D prefills the tokens so far while the source keeps decoding
(peer_park, parked in D's instance), each round only the tokens since the last, until D could
catch up with what is left within about one decode step; the handoff's state then leaves D only
those few tokens to prefill (Instance.park / resume start warm), so the client's pause is about
one decode step plus a round trip, not a prefill of the whole sequence.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from sllmd.errors import (CancelledError, InvalidRequestError, NodeNotFoundError, PeerFailedError, RequestNotFoundError,
                          ShuttingDownError)

from sllmd.protocol.codec import pack

log = logging.getLogger(__name__)

HANDOFF_TIMEOUT_S = 30.0     # the instance reaches a token boundary within one step; this bounds a stuck one
MAX_ROUNDS = 8
FINAL = (InvalidRequestError, CancelledError, ShuttingDownError)   # errors a resume elsewhere would repeat
RESUME_TIMEOUT_S = 120.0     # the destination's first token after the handoff (a prefill of the whole state)


@dataclass
class _Move:
    """One migration in flight: where to, and what happened (filled by follow())."""
    to: str
    reason: str = ""
    done: threading.Event = field(default_factory=threading.Event)
    result: dict = field(default_factory=dict)


class Migrations:
    """Owned by the Cluster. `follow` wraps every stream this node runs; `migrate` moves one."""

    def __init__(self, node, peer_client: Callable[[str], Any], is_alive: Callable[[str], bool], name: str):
        self.node = node
        self._peer = peer_client          # node name -> PeerClient
        self._alive = is_alive
        self.name = name
        self._moves: dict[str, _Move] = {}
        self._lock = threading.Lock()

    # --- the streams ------------------------------------------------------------------------------
    def run(self, request, cancelled: threading.Event | None = None) -> Iterator[dict]:
        """A request run on this node, followed across a migration."""
        return self.follow(request.request_id, self.node.infer(request, cancelled=cancelled), cancelled)

    def resume(self, state: dict, cancelled: threading.Event | None = None) -> Iterator[dict]:
        """A request state continued on this node (the destination's side), itself movable again."""
        return self.follow(str(state.get("request_id")), self.node.resume(state, cancelled=cancelled), cancelled)

    def follow(self, request_id: str, events: Iterator[dict], cancelled) -> Iterator[dict]:
        last_token_at = None
        try:
            for ev in events:
                if ev.get("type") == "migrated":
                    close = getattr(events, "close", None)
                    if close is not None:   # the request left this instance: its lease goes now, so a
                        close()             # model waiting for device room can take its place at once
                    yield from self._hand_over(request_id, ev["state"], last_token_at, cancelled)
                    return
                if ev.get("type") == "token":
                    last_token_at = time.perf_counter()
                yield ev
        finally:
            close = getattr(events, "close", None)
            if close is not None:
                close()

    def _hand_over(self, request_id: str, state, last_token_at, cancelled) -> Iterator[dict]:
        """Relays the destination's stream; on a failure before its first token, resumes here."""
        with self._lock:
            move = self._moves.get(request_id)
        to = move.to if move is not None else None
        wire_state = state.to_dict() if hasattr(state, "to_dict") else dict(state)
        started = time.perf_counter()
        stream = None
        first = None
        if to is not None:
            try:
                stream = iter(self._peer(to).resume(wire_state))
                first = next((e for e in stream if e.get("type") != "heartbeat"), None)
                if first is None:
                    raise PeerFailedError(f"node {to} ended the resumed stream at once")
            except Exception as e:
                log.warning("migrating %s to %s failed after the handoff (%s); resuming it here", request_id, to, e)
                if stream is not None and hasattr(stream, "close"):
                    stream.close()
                stream, to = None, None
                if move is not None:
                    move.result["fallback"] = f"{type(e).__name__}: {e}"
        if stream is None:   # resume here, from the very state handed over
            stream = iter(self.follow(request_id, self.node.resume(wire_state, cancelled=cancelled), cancelled))
            first = next(stream, None)
        now = time.perf_counter()
        if move is not None:
            move.result.update(ran_on=to or self.name, handoff_to_first_s=now - started,
                               last_token_to_handoff_s=(started - last_token_at) if last_token_at else None,
                               pause_s=(now - last_token_at) if last_token_at is not None else None,
                               tokens_sent=len(wire_state.get("prompt_ids") or []) +
                               len(wire_state.get("output_ids") or []), state_bytes=len(pack(wire_state)),
                               output_tokens_before=len(wire_state.get("output_ids") or []))
            move.done.set()
        relayed_ids: list[int] = []
        relayed_text: list[str] = []
        try:
            ev = first
            while ev is not None:
                if ev.get("type") == "done" and move is not None:
                    stats = dict(ev.get("stats") or {})
                    stats["migration"] = {k: v for k, v in move.result.items()}
                    ev = dict(ev, stats=stats)
                if ev.get("type") == "token":   # D numbers its stream from 0; the server numbering
                    ev = {k: v for k, v in ev.items() if k != "index"}   # this stream continues its own
                    if ev.get("token_id") is not None:
                        relayed_ids.append(int(ev["token_id"]))
                    relayed_text.append(ev.get("text") or "")
                if ev.get("type") != "heartbeat":
                    yield ev
                if ev.get("type") == "done":
                    return
                try:
                    ev = next(stream, None)
                except FINAL:
                    raise
                except Exception as e:
                    if to is None:
                        raise
                    log.warning("node %s failed while running the migrated request %s (%s); resuming it here "
                                "after the %d token(s) it sent", to, request_id, e, len(relayed_ids))
                    if hasattr(stream, "close"):
                        stream.close()
                    stream = iter(self._recover(request_id, wire_state, relayed_ids, "".join(relayed_text),
                                                cancelled, move, to))
                    to = None
                    ev = next(stream, None)
            raise PeerFailedError(f"the migrated request {request_id} ended without finishing")
        finally:
            with self._lock:
                if self._moves.get(request_id) is move:
                    self._moves.pop(request_id, None)
            if hasattr(stream, "close"):
                stream.close()

    def _recover(self, request_id: str, handed: dict, relayed_ids: list[int], relayed_text: str, cancelled,
                 move: _Move | None, failed: str) -> Iterator[dict]:
        """The destination died after it started answering: the request continues here from the
        state handed over plus every token it relayed. Greedy output continues exactly; a sampled
        request draws from a fresh seed stream (the destination's sampler state died with it)."""
        state = dict(handed, output_ids=list(handed.get("output_ids") or []) + relayed_ids,
                     emitted_text=str(handed.get("emitted_text") or "") + relayed_text,
                     detok_offsets=None, held_text="", rng_state=None)
        if move is not None:
            move.result["recovered"] = {"failed_node": failed, "tokens_from_it": len(relayed_ids), "on": self.name}
        return self.follow(request_id, self.node.resume(state, cancelled=cancelled), cancelled)

    def _changed(self) -> None:
        changed = getattr(self.node, "changed", None)
        if changed is not None:
            changed()

    # --- moving one -------------------------------------------------------------------------------
    @staticmethod
    def _rounds(peer, handle) -> list[dict]:
        """Prefills the request's tokens on the destination while it keeps decoding here, round
        by round, each sending only the tokens since the last. Stops when the destination could
        catch up with what is left within about one decode step (measured: the round's prefill
        rate against the tokens decoded here meanwhile), or after MAX_ROUNDS."""
        rounds: list[dict] = []
        held = 0
        rid, model = handle.request.request_id, handle.request.model
        for _ in range(MAX_ROUNDS):
            st = handle.state
            if st is None or handle.done.is_set():
                break   # still queued (its prompt moves at the handoff) or finished
            ids = list(st.all_ids)[:-1]   # the last token is fed at the handoff: its logits start the next step
            if len(ids) <= held:
                break
            t = time.perf_counter()
            peer.park(model, rid, ids)
            took = time.perf_counter() - t
            behind = max(0, len(handle.state.all_ids) - 1 - len(ids)) if handle.state is not None else 0
            sent, held = len(ids) - held, len(ids)
            tpot = took / behind if behind else float("inf")        # this node's time per token meanwhile
            catch_up = behind * took / sent                          # the destination's time for what is left
            rounds.append({"tokens": sent, "bytes": len(pack(ids[len(ids) - sent:])), "seconds": took,
                           "behind": behind, "catch_up_s": catch_up,
                           "tpot_s": None if behind == 0 else tpot})
            if catch_up <= tpot:
                break
        return rounds

    def migrate(self, request_id: str, to: str, reason: str = "") -> dict:
        """Moves the request `request_id`, running here, to node `to`; returns what happened.
        `reason` (e.g. the scheduler's, making room for another model) goes into its stats."""
        if to == self.name:
            raise InvalidRequestError(f"request {request_id} already runs on {to}")
        if not self._alive(to):
            raise NodeNotFoundError(f"node {to!r} is not an alive member; see `sllmctl nodes`")
        found = self.node.find_request(request_id)
        if found is None:
            raise RequestNotFoundError(f"no request {request_id} runs on {self.name} (it may have finished)")
        instance, handle = found
        with self._lock:
            if request_id in self._moves:
                raise InvalidRequestError(f"request {request_id} is already being migrated")
            move = self._moves[request_id] = _Move(to, reason or "requested")
            move.result["reason"] = move.reason
        handle.migrating_to = to   # `sllmctl requests` shows it migrating from its first round
        self._changed()
        try:
            t0 = time.perf_counter()
            peer = self._peer(to)
            prepared = peer.prepare(handle.request.model)   # the destination loads the model first
            t1 = time.perf_counter()
            rounds = self._rounds(peer, handle)
            t_rounds = time.perf_counter()
            if instance.handoff(handle, HANDOFF_TIMEOUT_S) is None:
                raise RequestNotFoundError(f"request {request_id} finished before it could move")
            t2 = time.perf_counter()
            if not move.done.wait(RESUME_TIMEOUT_S):
                raise PeerFailedError(f"request {request_id} was handed over but nothing resumed it within "
                                      f"{RESUME_TIMEOUT_S:.0f} s")
        except BaseException as e:
            handle.migrating_to = None   # it stays here
            self._changed()
            with self._lock:
                if self._moves.get(request_id) is move and not move.done.is_set():
                    self._moves.pop(request_id, None)
            self._count("failed")
            self._publish(request_id, to, "failed", move.reason, error=str(e) or type(e).__name__)
            raise
        result = dict(move.result, request_id=request_id, source=self.name, to=to, rounds=len(rounds) + 1,
                      round_detail=rounds, prepare_s=t1 - t0, rounds_s=t_rounds - t1, handoff_s=t2 - t_rounds,
                      total_s=time.perf_counter() - t0, destination_load=prepared,
                      tokens_in_rounds=sum(r["tokens"] for r in rounds),
                      bytes_sent=sum(r["bytes"] for r in rounds) + int(move.result.get("state_bytes") or 0))
        result["moved_s"] = result["total_s"] - result["prepare_s"]   # the migration proper: rounds + handoff
        cost = getattr(self.node, "migration_cost", None)
        if cost is not None and result.get("ran_on") == to:   # a*(t_in + t_out) + b0, fitted from real ones;
            times = getattr(self.node, "service_times", None)
            prefill = times.prefill_s_per_token() if times is not None else None
            result["estimate_s"] = cost.estimate(int(result.get("tokens_sent") or 0), prefill)   # the destination's
            cost.observe(int(result.get("tokens_sent") or 0), result["moved_s"])         # load is priced apart
        self._count("ok" if result.get("ran_on") == to else "fallback")
        self._publish(request_id, to, "ok" if result.get("ran_on") == to else "fallback", move.reason,
                      ran_on=result.get("ran_on"), seconds=result["total_s"], tokens=result.get("tokens_sent"))
        log.info("migrated %s from %s to %s: %s", request_id, self.name, result.get("ran_on"), result)
        return result

    def _publish(self, request_id: str, to: str, outcome: str, reason: str, **fields) -> None:
        """A `migration` event for watchers (sllmd.events): ok, fallback (it resumed here), failed."""
        events = getattr(self.node, "events", None)
        if events is not None:
            events.publish("migration", **{"id": request_id, "from": self.name, "to": to, "outcome": outcome,
                                           "reason": reason, **fields})

    def _count(self, outcome: str) -> None:
        """sllmd_migrations_total: ok (it moved), fallback (it resumed here), failed."""
        stats = getattr(self.node, "stats", None)
        if stats is not None:
            stats.migration(outcome)
