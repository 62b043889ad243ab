"""The `watch` push channel against a real sllmd: updates at a bounded rate, the events of loads,
evictions and requests, a watcher that stops reading costs the daemon nothing, closing frees it,
a malformed watch is refused; and the event bus itself (coalescing, bounded queues)."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time

import msgpack
import pytest

from daemon_helpers import DaemonProcess, remove_tree, short_tempdir, sllmctl
from sllmd.client import Client
from sllmd.errors import BadMessageError, InvalidArgumentError
from sllmd.events import EventBus
from sllmd.watch import WINDOW

SNAPSHOT_KEYS = {"status", "models", "ps", "requests", "nodes", "loader"}


@pytest.fixture(scope="module")
def daemon(tiny_servable_checkpoint):
    root = short_tempdir()
    proc = DaemonProcess(root).start()
    with Client(proc.socket) as c:
        c.import_model("tiny", tiny_servable_checkpoint)
    yield proc
    proc.close()
    remove_tree(root)


def read_until(stream, done, timeout: float = 30.0) -> tuple[list[dict], list[dict]]:
    """Updates (and their events, in order) until done(events so far) or the timeout."""
    updates, events = [], []
    deadline = time.monotonic() + timeout
    while True:
        update = next(stream)     # not a for loop: leaving one closes the watch
        updates.append(update)
        events.extend(update["events"])
        if done(events) or time.monotonic() > deadline:
            break
    return updates, events


def kinds(events: list[dict], model: str | None = None) -> list[str]:
    return [e["kind"] for e in events if model is None or e.get("model") == model]


def in_flight(c: Client) -> int:
    return c.status()["daemon"]["requests_in_flight"]


def wait_in_flight(c: Client, n: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if in_flight(c) == n:
            return True
        time.sleep(0.05)
    return False


def test_updates_arrive_at_the_bounded_rate(daemon):
    with Client(daemon.socket) as c, c.watch(interval_s=0.1) as stream:
        t0 = time.monotonic()
        updates = []
        for update in stream:
            updates.append(update)
            if time.monotonic() - t0 >= 1.0:
                break
    assert 4 <= len(updates) <= 12, len(updates)        # 1 s at most one per 0.1 s (the first at once)
    assert [u["seq"] for u in updates] == list(range(1, len(updates) + 1))
    gaps = [b["time"] - a["time"] for a, b in zip(updates, updates[1:])]
    assert min(gaps) >= 0.09, gaps
    first = updates[0]
    assert set(first) == {"seq", "time", "dropped", "snapshot", "events"}
    snap = first["snapshot"]
    assert set(snap) == SNAPSHOT_KEYS
    assert snap["status"]["tiers"]["device"]["capacity_bytes"] == 512 << 20 and "daemon" not in snap["status"]
    assert [m["name"] for m in snap["models"]] == ["tiny"] and snap["nodes"] == []
    assert {"bytes_read", "bytes_direct", "bytes_cached", "bytes_h2d"} <= set(snap["loader"])


def test_load_and_evict_produce_events_and_move_the_tier_occupancy(daemon):
    with Client(daemon.socket) as c, c.watch(interval_s=0.05) as stream:
        c.evict("tiny", tier="device")
        c.evict("tiny", tier="dram")     # whatever ran before: the load reads the disk
        read_until(stream, lambda ev: True)
        before = next(stream)["snapshot"]
        assert before["status"]["tiers"]["device"]["used_bytes"] == 0
        assert [m["state"] for m in before["models"]] == ["on_ssd"]
        bytes_read = before["loader"]["bytes_read"]

        c.load("tiny")
        updates, events = read_until(stream, lambda ev: "load_finished" in kinds(ev))
        assert kinds(events, "tiny")[0] == "load_started" and "load_finished" in kinds(events, "tiny")
        started = next(e for e in events if e["kind"] == "load_started")
        finished = next(e for e in events if e["kind"] == "load_finished")
        assert started["tier"] == "ssd" and started["bytes"] > 0 and started["time"] <= finished["time"]
        assert finished["tier"] == "ssd" and finished["seconds"] > 0 and finished["bytes"] == started["bytes"]
        after, _ = read_until(stream, lambda ev: True)   # the next update's snapshot is taken after the load
        snap = after[-1]["snapshot"]
        assert snap["status"]["tiers"]["device"]["used_bytes"] > 0
        assert [(m["name"], m["state"]) for m in snap["models"]] == [("tiny", "loaded")]
        assert [p["name"] for p in snap["ps"]] == ["tiny"]
        assert snap["loader"]["bytes_read"] >= bytes_read + started["bytes"]   # counters: a UI takes differences

        c.evict("tiny", tier="device")
        _, events = read_until(stream, lambda ev: "evicted" in kinds(ev))
        evicted = [e for e in events if e["kind"] == "evicted"]
        assert evicted[0]["model"] == "tiny" and evicted[0]["tier"] == "device" and evicted[0]["reason"] == "manual"
        after, _ = read_until(stream, lambda ev: True)
        snap = after[-1]["snapshot"]
        assert snap["status"]["tiers"]["device"]["used_bytes"] == 0 and snap["ps"] == []


def test_a_load_that_fails_says_why(daemon, tiny_servable_checkpoint):
    with Client(daemon.socket) as c, c.watch(interval_s=0.05) as stream:
        c.import_model("broken", tiny_servable_checkpoint)
        data = daemon.store / "models" / "broken" / "data-00000.bin"
        with open(data, "r+b") as f:     # a flipped byte: its block's checksum no longer matches
            f.seek(data.stat().st_size // 2)
            byte = f.read(1)
            f.seek(-1, 1)
            f.write(bytes([byte[0] ^ 0xFF]))
        with pytest.raises(Exception) as err:
            c.load("broken")
        _, events = read_until(stream, lambda ev: "load_failed" in kinds(ev, "broken"))
        c.remove("broken")
    assert kinds(events, "broken")[:1] == ["import_progress"] and "load_started" in kinds(events, "broken"), events
    (failed,) = [e for e in events if e["kind"] == "load_failed"]
    assert failed["code"] == err.value.code == "corrupt_checkpoint" and failed["tier"] == "ssd" and failed["error"]


def test_an_infer_produces_request_started_and_finished(daemon):
    with Client(daemon.socket) as c, c.watch(interval_s=0.05) as stream:
        next(stream)
        with c.infer("tiny", "hello there", max_tokens=4, seed=1) as s:
            text = s.text()
        assert isinstance(text, str)
        _, events = read_until(stream, lambda ev: "request_finished" in kinds(ev))
    started = [e for e in events if e["kind"] == "request_started"]
    finished = [e for e in events if e["kind"] == "request_finished"]
    assert len(started) == 1 and len(finished) == 1
    assert started[0]["id"] == finished[0]["id"] and started[0]["model"] == "tiny"
    assert finished[0]["outcome"] == "ok" and finished[0]["tokens"] == s.stats["tokens"]
    assert started[0]["time"] <= finished[0]["time"]


def test_a_cancelled_infer_finishes_as_cancelled(daemon):
    with Client(daemon.socket) as c, c.watch(interval_s=0.05) as stream:
        next(stream)
        with c.infer("tiny", "hello there", max_tokens=200, seed=1) as s:
            next(iter(s))              # one piece, then leave: the request is cancelled
        _, events = read_until(stream, lambda ev: "request_finished" in kinds(ev))
    (finished,) = [e for e in events if e["kind"] == "request_finished"]
    assert finished["outcome"] == "cancelled" and finished["tokens"] >= 1


def test_a_watcher_that_never_reads_costs_the_daemon_nothing(daemon):
    # what "nothing" means, without timing anything: the daemon holds back after WINDOW unread updates
    # (it makes none meanwhile), keeps at most max_events for the watcher, and serves everyone else
    with Client(daemon.socket) as c:
        c.load("tiny")
        idle = Client(daemon.socket)
        stream = idle.watch(interval_s=0.05, max_events=8)
        try:
            assert next(stream)["seq"] == 1     # taken and acknowledged; then the watcher stops reading
            time.sleep(0.5)    # the daemon sends WINDOW more updates (nothing happened yet), then holds back
            for _ in range(3):
                c.generate("tiny", "hello there", max_tokens=4, seed=1)
            for _ in range(9):   # 12 requests: 24 events for a queue of 8
                c.generate("tiny", "hi", max_tokens=1, seed=1)
            time.sleep(1.0)   # 20 intervals: without flow control 20 more updates would be on their way
            c.ping()

            seen = [next(stream) for _ in range(WINDOW + 1)]
            assert [u["seq"] for u in seen] == list(range(2, WINDOW + 3))     # nothing was made meanwhile
            assert all(u["events"] == [] and u["dropped"] == 0 for u in seen[:-1])
            last = seen[-1]            # the first update after it read again says what it lost
            assert last["dropped"] == 24 - 8 and len(last["events"]) == 8
            assert kinds(last["events"])[-2:] == ["request_started", "request_finished"]   # the newest kept
        finally:
            stream.close()
            idle.close()
            c.evict("tiny", tier="device")   # the next tests load it afresh


def test_closing_the_watch_frees_it_on_the_daemon(daemon):
    with Client(daemon.socket) as c:
        assert wait_in_flight(c, 0)
        with Client(daemon.socket) as w:
            stream = w.watch(interval_s=0.05)
            next(stream)
            assert in_flight(c) == 1
            stream.close()
            assert wait_in_flight(c, 0)
            for update in w.watch(interval_s=0.05):   # leaving a for loop closes it too
                break
            assert wait_in_flight(c, 0)
        # a client process that dies: the undeliverable heartbeat or update ends its watch
        proc = subprocess.Popen([sys.executable, "-m", "sllmctl", "watch", "--interval", "0.05", "--socket",
                                 daemon.socket], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            assert wait_in_flight(c, 1, timeout=30)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
        assert wait_in_flight(c, 0)


def test_watchers_never_take_the_slots_of_requests(tiny_servable_checkpoint):
    root = short_tempdir()
    try:
        with DaemonProcess(root, "--max-streams", "1") as d, Client(d.socket) as c:
            c.import_model("tiny", tiny_servable_checkpoint)
            watchers = [Client(d.socket) for _ in range(3)]
            streams = [w.watch(interval_s=0.05) for w in watchers]
            try:
                assert all(next(s)["seq"] == 1 for s in streams)
                assert in_flight(c) == 3
                assert isinstance(c.generate("tiny", "hello", max_tokens=2, seed=1), str)   # the one slot is free
            finally:
                for s, w in zip(streams, watchers):
                    s.close()
                    w.close()
    finally:
        remove_tree(root)


def test_a_malformed_watch_is_refused_and_the_daemon_serves_on(daemon):
    with Client(daemon.socket) as c:
        for rid, bad in enumerate(({"interval_s": -1}, {"interval_s": 60.0}, {"interval_s": "fast"}, {"cluster": 1},
                                   {"max_events": 0}, {"every": 1}), start=900):
            c._ep.send(msgpack.packb({"type": "watch", "id": rid, **bad}), 5)
            c._open.add(rid)
            with pytest.raises(BadMessageError) as err:
                c._wait(rid, 5)
            assert err.value.code == "bad_message" and "watch" in str(err.value), bad
        assert "interval_s must be in [0.05, 10.0]" in str(_refusal(c, {"interval_s": -1}))
        with pytest.raises(InvalidArgumentError, match="interval_s"):    # refused before it is sent
            c.watch(interval_s=-1)
        c._ep.send(msgpack.packb({"type": "ack", "id": 12345, "seq": 3}), 5)   # an ack for nothing: ignored
        assert c.ping() < 1
        with c.watch(interval_s=0.05) as stream:
            assert next(stream)["seq"] == 1


def _refusal(c: Client, fields: dict) -> BaseException:
    rid = 990
    c._ep.send(msgpack.packb({"type": "watch", "id": rid, **fields}), 5)
    c._open.add(rid)
    try:
        c._wait(rid, 5)
    except BadMessageError as e:
        return e
    raise AssertionError("accepted")


def test_sllmctl_watch_prints_events_and_json_updates(daemon):
    run = sllmctl("watch", "--json", "--count", "3", "--interval", "0.05", socket_path=daemon.socket)
    assert run.returncode == 0, run.stderr
    lines = [json.loads(line) for line in run.stdout.splitlines()]
    assert [u["seq"] for u in lines] == [1, 2, 3] and set(lines[0]["snapshot"]) == SNAPSHOT_KEYS
    assert sllmctl("watch", "--interval", "0", socket_path=daemon.socket).returncode == 2

    proc = subprocess.Popen([sys.executable, "-m", "sllmctl", "watch", "--interval", "0.05", "--socket",
                             daemon.socket], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        with Client(daemon.socket) as c:
            assert wait_in_flight(c, 1, timeout=30)
            c.load("tiny")
            c.evict("tiny", tier="device")
            time.sleep(0.5)
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=10)
    lines = out.splitlines()
    assert any("load_started" in line and "model=tiny" in line and "bytes=" in line for line in lines), out
    assert any("load_finished" in line and "model=tiny" in line for line in lines), out
    assert any("evicted" in line and "tier=device" in line and "reason=manual" in line for line in lines), out


# --- the bus itself -----------------------------------------------------------------------------
def test_the_bus_coalesces_progress_and_bounds_each_queue():
    bus = EventBus()
    bus.publish("load_started", model="a")          # nobody listens: nothing is kept
    sub = bus.subscribe(max_events=4)
    bus.publish("load_started", model="a", tier="ssd")
    for done in range(10):
        bus.publish("load_progress", model="a", tier="ssd", done=done)
    bus.publish("load_progress", model="b", tier="ssd", done=1)
    events, dropped = sub.take()
    assert [(e["kind"], e.get("model"), e.get("done")) for e in events] == [
        ("load_started", "a", None), ("load_progress", "a", 9), ("load_progress", "b", 1)]
    assert dropped == 9 and all(isinstance(e["time"], float) for e in events)

    for i in range(10):
        bus.publish("evicted", model=f"m{i}")
    events, dropped = sub.take()
    assert [e["model"] for e in events] == ["m6", "m7", "m8", "m9"] and dropped == 6   # the oldest go first
    assert sub.take() == ([], 0)

    bus.publish("load_progress", model="a", tier="ssd", done=1)   # a coalesced event that is dropped
    for i in range(4):                                             # as the oldest is forgotten as well
        bus.publish("evicted", model=f"n{i}")
    bus.publish("load_progress", model="a", tier="ssd", done=2)
    events, dropped = sub.take()
    assert [e.get("done") for e in events] == [None, None, None, 2] and dropped == 2
    bus.publish("node", name="A", status="joined", self=True)   # any field name, "self" included
    assert sub.take()[0][0]["self"] is True
    bus.unsubscribe(sub)
    assert not bus.watched


# --- a cluster ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def endless_checkpoint(tmp_path_factory):
    """A tiny llama without an end token: it answers until max_tokens (a request long enough to move)."""
    from conftest import make_tiny_model
    from sllmd import store
    from test_inference import tiny_tokenizer
    tok = tiny_tokenizer()
    tok.eos_token = None
    model = make_tiny_model("llama", seed=0, vocab_size=len(tok), max_position_embeddings=100_000, eos_token_id=None)
    return store.save_model(model, tmp_path_factory.mktemp("endless") / "tiny", tokenizer=tok)


def test_a_cluster_watch_shows_every_node_and_their_comings_and_goings(endless_checkpoint):
    from cluster_helpers import close_all, make_nodes
    root = short_tempdir()
    a, b = make_nodes(root, ["A", "B"], "--keep-alive", "-1")
    try:
        a.start()
        with a.client() as c, c.watch(interval_s=0.1, cluster=True) as stream:
            first = next(stream)["snapshot"]
            assert [n["name"] for n in first["nodes"]] == ["A"]
            b.start()
            with b.client() as cb:
                cb.import_model("tiny", endless_checkpoint)

            def b_joined(events):
                return any(e["kind"] == "node" and e["name"] == "B" and e["status"] == "joined" for e in events)
            _, events = read_until(stream, b_joined, timeout=60)
            assert b_joined(events), events
            deadline, snap = time.monotonic() + 60, None
            while time.monotonic() < deadline:   # B's models arrive with the next pull of its state
                snap = next(stream)["snapshot"]
                if any(m.get("node") == "B" and m["name"] == "tiny" for m in snap["models"]):
                    break
            assert {(n["name"], n["status"]) for n in snap["nodes"]} == {("A", "alive"), ("B", "alive")}
            assert [(m["node"], m["name"]) for m in snap["models"]] == [("B", "tiny")]

            with b.client() as cb:      # B's own events reach A's cluster watch (relayed over peer_watch)
                cb.load("tiny")
                cb.generate("tiny", "hello", max_tokens=2, seed=1)
            _, events = read_until(stream, lambda ev: "request_finished" in kinds(ev), timeout=60)
            on_b = [(e["kind"], e["node"]) for e in events if e.get("model") == "tiny"]
            assert ("load_started", "B") in on_b and ("load_finished", "B") in on_b, events
            assert ("request_started", "B") in on_b and ("request_finished", "B") in on_b, events
            assert all(e["node"] == "A" for e in events if e["kind"] == "node")

            c.import_model("tiny", endless_checkpoint)   # a request on A moves to B: both tell the watch
            started = threading.Event()

            def consume():
                with a.client() as ca, ca.infer("tiny", "a story", max_tokens=1500, temperature=0.0, chat=False,
                                                node="A") as s:
                    for i, _ in enumerate(s.events()):
                        if i == 50:
                            started.set()
            reader = threading.Thread(target=consume)
            reader.start()
            try:
                assert started.wait(60)
                rid = next(r["id"] for r in c.requests() if r["model"] == "tiny")
                moved = c.migrate(rid, "B")
            finally:
                reader.join(120)
            assert moved["ran_on"] == "B"
            _, events = read_until(stream, lambda ev: any(e["kind"] == "request_finished" and e["node"] == "B"
                                                          and e["id"] == rid for e in ev), timeout=60)
            mine = [e for e in events if e.get("id") == rid]
            (migration,) = [e for e in mine if e["kind"] == "migration"]
            assert (migration["from"], migration["to"], migration["outcome"], migration["node"]) == \
                ("A", "B", "ok", "A") and migration["tokens"] > 0, migration
            finished = {e["node"]: e for e in mine if e["kind"] == "request_finished"}
            assert finished["A"]["outcome"] == "migrated" and finished["B"]["outcome"] == "ok", finished
            assert any(e["kind"] == "request_started" and e["node"] == "B" and e["resumed"] for e in mine), mine

            b.kill9()
            _, events = read_until(stream, lambda ev: any(e["kind"] == "node" and e["name"] == "B" and
                                                          e["status"] == "failed" for e in ev), timeout=60)
            (failed,) = [e for e in events if e["kind"] == "node" and e["status"] == "failed"]
            assert failed["previous"] in ("alive", "suspect") and failed["self"] is False
    finally:
        close_all([a, b])
        remove_tree(root)
