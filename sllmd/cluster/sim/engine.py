"""The event loop: requests arrive, the policy places them on the servers' states, and the
servers load, serve and free GPUs in simulated time. Only time, loading and decoding are
simulated; the decision is the policy's (placement.place on NodeViews).

A request's times: it waits for its instance (an existing one's queue, or a new instance's
GPUs and load), then prefills (prefill_s + t_in * prefill_s_per_token: its first token,
which ends the startup latency) and decodes t_out tokens at tpot_s each.

Migration (policy "ours", DESIGN.md section 9): the victim keeps decoding on its source while
its destination gets its model ready and re-prefills its tokens (migration_a * (t_in + tokens)
+ migration_b0); then it continues on the destination from the tokens it had, and the source's
GPUs go to the model that asked for them. A victim that finishes first simply finishes.
Preemption (policy "shepherd"): the victim is stopped at once and placed again from scratch.

Views: each server's state is re-taken when it changed, and a busy one's also when it is older
than refresh_s (its queue estimates age); gossip delay is not simulated (stale_after_s applies
to fetched_at, the time a state was taken).
"""
from __future__ import annotations

import heapq
import random
import time

from sllmd.cluster.locality import NodeView
from sllmd.cluster.sim import policies as policies_mod
from sllmd.cluster.sim.config import Scenario
from sllmd.cluster.sim.servers import Instance, Run, Server
from sllmd.cluster.sim.workload import generate, mean_output_tokens

RETRY_S = 0.5   # a request no node could take is placed again after this long (a client's retry)


class Simulation:
    def __init__(self, scenario: Scenario, policy: str, rps: float, *, on_decision=None):
        self.sc, self.rps = scenario, rps
        self.models = {m.name: m for m in scenario.models}
        mean_out = mean_output_tokens(scenario)
        self.servers = [Server(f"s{i:0{len(str(scenario.servers.count - 1))}d}", scenario.servers, mean_out)
                        for i in range(scenario.servers.count)]
        self.by_name = {s.name: s for s in self.servers}
        self._seed_tiers(random.Random(f"tiers:{scenario.seed}"))
        self.policy = policies_mod.make(policy, self.models, stale_after_s=scenario.stale_after_s,
                                        seed=scenario.seed)
        self.on_decision = on_decision   # called (request, now, views, choice): tests compare with place()
        self.events: list = []
        self.seq = 0
        self.views: list[NodeView] = [NodeView(s.name, "alive", {}, 0, 0.0) for s in self.servers]
        self.busy: set[int] = set()
        self.dirty: set[int] = set(range(len(self.servers)))
        self.index = {s.name: i for i, s in enumerate(self.servers)}
        self.rows: list[dict] = []
        self.decision_s: list[float] = []
        self.counts = {"migrations": 0, "preemptions": 0, "retries": 0, "evictions": 0}

    def _seed_tiers(self, rng: random.Random) -> None:
        n = len(self.servers)
        for k, m in enumerate(self.sc.models):
            if m.ssd_on is not None or m.dram_on is not None:
                for i in dict.fromkeys([*(m.dram_on or ()), *(m.ssd_on or ())]):
                    self.servers[i].ssd.insert(m.name, m.bytes)
                for i in m.dram_on or ():
                    self.servers[i].dram.insert(m.name, m.bytes)
                continue
            holders = rng.sample(range(n), min(max(m.ssd_copies, m.dram_copies), n))
            for j, i in enumerate(holders):
                self.servers[i].ssd.insert(m.name, m.bytes)
                if j < m.dram_copies:
                    self.servers[i].dram.insert(m.name, m.bytes)

    # --- events ---------------------------------------------------------------------------
    def at(self, t: float, kind: str, *payload) -> int:
        self.seq += 1
        heapq.heappush(self.events, (t, self.seq, kind, payload))
        return self.seq

    def run(self) -> dict:
        reqs = generate(self.sc, self.rps)
        for r in reqs:
            row = {"id": r.id, "model": r.model, "arrival": r.arrival, "t_in": r.t_in, "t_out": r.t_out,
                   "first_token": None, "end": None, "node": None, "path": None, "estimate_s": None,
                   "migrations": 0, "preemptions": 0}
            self.rows.append(row)
            self.at(r.arrival, "arrive", Run(r, row))
        while self.events:
            t, _, kind, payload = heapq.heappop(self.events)
            getattr(self, "_on_" + kind)(t, *payload)
        return {"rows": self.rows, "decision_s": self.decision_s, "counts": dict(self.counts)}

    def _changed(self, s: Server) -> None:
        s.changed()
        i = self.index[s.name]
        self.dirty.add(i)

    def _refresh(self, now: float) -> None:
        every = self.busy if self.sc.stale_after_s == float("inf") else range(len(self.servers))
        for i in list(every):
            if now - self.servers[i].state_at >= self.sc.refresh_s:
                self.dirty.add(i)
        for i in self.dirty:
            s = self.servers[i]
            self.views[i] = NodeView(s.name, "alive", s.take_state(now), s.version, now)
            if s.busy():
                self.busy.add(i)
            else:
                self.busy.discard(i)
        self.dirty.clear()

    # --- placing --------------------------------------------------------------------------
    def _on_arrive(self, now: float, run: Run) -> None:
        self._refresh(now)
        t0 = time.perf_counter()
        choice = self.policy.decide(run.req, now, self.views)
        self.decision_s.append(time.perf_counter() - t0)
        if self.on_decision is not None:
            self.on_decision(run.req, now, self.views, choice)
        if choice is None:      # every option refused (e.g. its instances' queues are full): retry later
            self.counts["retries"] += 1
            self.at(now + RETRY_S, "arrive", run)
            return
        s = self.by_name[choice.node]
        if run.record["node"] is None:
            run.record.update(node=s.name, path=choice.path, estimate_s=choice.estimate.seconds)
        detail = choice.estimate.detail
        if choice.path == "migration":
            victim = self._running(s, detail["victim"])
            if victim is not None:
                if detail["kind"] == "preempt":
                    self._preempt(now, s, victim)
                else:
                    self._migrate(now, s, victim, self.by_name[detail["to"]], detail["to_path"])
            path = s.local_path(run.req.model) or "repo"
            self._serve(now, s, run, path, front=True)
            return
        self._serve(now, s, run, choice.path)

    def _running(self, s: Server, req_id: int) -> Run | None:
        for inst in s.instances.values():
            if inst.running is not None and inst.running.req.id == req_id and not inst.releasing:
                return inst.running
        return None

    def _serve(self, now: float, s: Server, run: Run, path: str, front: bool = False) -> None:
        """Queue `run` on s's instance of its model, starting one (loaded over `path`) if there is none."""
        model = self.models[run.req.model]
        inst = s.instances.get(model.name)
        if inst is None:
            if path == "instance":    # evicted since the state was taken: load it again
                path = s.local_path(model.name) or "repo"
            inst = s.instances[model.name] = Instance(model, "waiting", path, last_used=now)
            (s.waiting.appendleft if front else s.waiting.append)(inst)
        inst.queue.append(run)
        self._changed(s)
        self._grant(now, s)
        self._start_next(now, s, inst)

    # --- GPUs and loads -------------------------------------------------------------------
    def _grant(self, now: float, s: Server) -> None:
        """Give free (or freed: idle instances evicted, LRU) GPUs to the waiting instances, in order."""
        while s.waiting:
            inst = s.waiting[0]
            need = inst.model.gpus
            if s.free_gpus() < need:
                idle = sorted((i for i in s.instances.values() if i.idle), key=lambda i: i.last_used)
                if s.free_gpus() + sum(i.model.gpus for i in idle) < need:
                    return
                for victim in idle:
                    if s.free_gpus() >= need:
                        break
                    del s.instances[victim.model.name]
                    self.counts["evictions"] += 1
            s.waiting.popleft()
            start = max(now, s.loader_free_at)
            inst.state, inst.ready_at = "loading", start + s.load_seconds(inst.path, inst.model.bytes)
            s.loader_free_at = inst.ready_at
            self.at(inst.ready_at, "loaded", s, inst)
            self._changed(s)

    def _on_loaded(self, now: float, s: Server, inst: Instance) -> None:
        name, nbytes = inst.model.name, inst.model.bytes
        in_use = set(s.instances)
        if inst.path in ("peer", "repo"):
            s.ssd.insert(name, nbytes, protect=in_use)
        s.ssd.touch(name)
        s.dram.insert(name, nbytes, protect=in_use)
        inst.state = "loaded"
        self._changed(s)
        self._start_next(now, s, inst)

    # --- serving --------------------------------------------------------------------------
    def _start_next(self, now: float, s: Server, inst: Instance) -> None:
        if inst.state != "loaded" or inst.running is not None or not inst.queue or inst.releasing:
            return
        run = inst.queue.popleft()
        m = inst.model
        if run.source is not None and run.source[0].event == 0:   # its victim finished meanwhile
            self._start_next(now, s, inst)
            return
        inst.running, inst.last_used = run, now
        run.started, run.tpot_s = now, m.tpot_s
        if run.source is not None:       # a migration's destination: re-prefill, then hand off
            src_run, src = run.source
            mig = m.migration_a * (run.req.t_in + self._produced(src_run, now)) + m.migration_b0
            run.prefill_s = mig
            run.event = self.at(now + mig, "handoff", s, inst, run)
        else:
            run.prefill_s = m.prefill_s + m.prefill_s_per_token * run.req.t_in
            if run.record["first_token"] is None:
                run.record["first_token"] = now + run.prefill_s
            end = now + run.prefill_s + (run.req.t_out - run.tokens_done) * m.tpot_s
            run.event = self.at(end, "finish", s, inst, run)
        self._changed(s)

    @staticmethod
    def _produced(run: Run, now: float) -> int:
        """Output tokens `run` has produced by `now` (it runs on its instance)."""
        m_tpot = run.tpot_s
        decoded = max(0.0, now - run.started - run.prefill_s) / m_tpot
        return min(run.req.t_out, run.tokens_done + int(decoded))

    def _on_finish(self, now: float, s: Server, inst: Instance, run: Run) -> None:
        if run.event == 0 or inst.running is not run:
            return
        run.event = 0
        inst.running = None
        inst.last_used = now
        run.record["end"] = now
        s.times.observe_request(inst.model.name, {"total_s": now - run.started, "queue_s": 0.0})
        mig = run.migrating_to
        if mig is not None:       # finished before its handoff: the destination's copy is dropped
            dest_run, dest, dest_inst = mig
            dest_run.event = 0
            if dest_inst.running is dest_run:
                dest_inst.running = None
            elif dest_run in dest_inst.queue:
                dest_inst.queue.remove(dest_run)
            self._changed(dest)
            self._start_next(now, dest, dest_inst)
            self._grant(now, dest)
        if inst.releasing:
            self._drop(now, s, inst)
        self._changed(s)
        self._start_next(now, s, inst)
        self._grant(now, s)

    def _drop(self, now: float, s: Server, inst: Instance) -> None:
        """Remove an instance whose GPUs go elsewhere; what queued on it is placed again."""
        if s.instances.get(inst.model.name) is inst:
            del s.instances[inst.model.name]
        while inst.queue:
            self.at(now, "arrive", inst.queue.popleft())

    def _migrate(self, now: float, s: Server, victim: Run, dest: Server, dest_path: str) -> None:
        inst = s.instances[victim.req.model]
        inst.releasing = True
        resume = Run(victim.req, victim.record, tokens_done=0)
        resume.source = (victim, s)
        victim.migrating_to = (resume, dest, None)
        self._serve(now, dest, resume, dest_path)
        victim.migrating_to = (resume, dest, dest.instances[victim.req.model])
        victim.record["migrations"] += 1
        self.counts["migrations"] += 1
        self._changed(s)

    def _on_handoff(self, now: float, dest: Server, dest_inst: Instance, resume: Run) -> None:
        if resume.event == 0:
            return
        victim, s = resume.source
        if victim.event == 0:     # it finished already (handled in _on_finish)
            return
        produced = self._produced(victim, now)
        victim.event, victim.migrating_to = 0, None     # its finish on the source will not come
        src_inst = s.instances[victim.req.model]
        src_inst.running = None
        self._drop(now, s, src_inst)
        m = dest_inst.model
        resume.source, resume.tokens_done = None, produced
        resume.started, resume.prefill_s = now, 0.0
        resume.event = self.at(now + (resume.req.t_out - produced) * m.tpot_s, "finish", dest, dest_inst, resume)
        self._changed(s)
        self._changed(dest)
        self._grant(now, s)

    def _preempt(self, now: float, s: Server, victim: Run) -> None:
        inst = s.instances[victim.req.model]
        victim.event = 0
        inst.running = None
        self._drop(now, s, inst)
        victim.record["preemptions"] += 1
        self.counts["preemptions"] += 1
        self._changed(s)
        self.at(now, "arrive", Run(victim.req, victim.record))


def warm_bound(scenario: Scenario, rps: float) -> dict:
    """The oracle lower bound: every request finds an idle warm instance (no load, no queue)."""
    models = {m.name: m for m in scenario.models}
    rows = []
    for r in generate(scenario, rps):
        m = models[r.model]
        first = r.arrival + m.prefill_s + m.prefill_s_per_token * r.t_in
        rows.append({"id": r.id, "model": r.model, "arrival": r.arrival, "t_in": r.t_in, "t_out": r.t_out,
                     "first_token": first, "end": first + r.t_out * m.tpot_s, "node": None, "path": "bound",
                     "estimate_s": None, "migrations": 0, "preemptions": 0})
    return {"rows": rows, "decision_s": [], "counts": {"migrations": 0, "preemptions": 0, "retries": 0,
                                                        "evictions": 0}}


def simulate(scenario: Scenario, policy: str, rps: float, **kw) -> dict:
    if policy == "oracle":
        return warm_bound(scenario, rps)
    return Simulation(scenario, policy, rps, **kw).run()
