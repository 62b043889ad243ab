"""The node end to end, in-process: serverless infer from each tier, states and
tiers after loads and evictions, keep_alive, pressure, pins, concurrency,
clients that go away, failures, restart; and SmolLM2 answering "Paris"."""
from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from conftest import make_tiny_model
from sllmd import store
from sllmd.config import Config
from sllmd.errors import CorruptCheckpointError, OutOfMemoryError, SllmError
from sllmd.inference import InferRequest, SamplingParams
from sllmd.errors import BusyError, InvalidRequestError
from sllmd.node import Node
from sllmd.tiers.states import EvictReason
from sllmd.errors import ModelInUseError, ModelNotFoundError, ShuttingDownError
from test_inference import tiny_tokenizer

MiB = 1 << 20


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def sources(tmp_path_factory, tok):
    """Three tiny Llama checkpoints with different weights (each rounds to one 2 MiB arena range)."""
    root = tmp_path_factory.mktemp("sources")
    return {f"m{i}": store.save_model(make_tiny_model("llama", seed=i, vocab_size=len(tok),
                                                      max_position_embeddings=100_000),
                                      root / f"m{i}", tokenizer=tok)
            for i in range(3)}


def make_config(tmp_path: Path, **kw) -> Config:
    base = dict(socket=str(tmp_path / "sock"), store_dir=tmp_path / "store", dram_bytes=16 * MiB,
                chunk_size=1 * MiB, device_memory_bytes=8 * MiB, keep_alive_s=300.0, queue_depth=4,
                verify_checksums=True)
    base.update(kw)
    return Config(**base)


@pytest.fixture
def node_factory(tmp_path):
    nodes = []

    def make(**kw):
        n = Node(make_config(tmp_path, **kw))
        n.start()
        nodes.append(n)
        return n

    yield make
    for n in nodes:
        n.close()


def infer(node, model, prompt="héllo", max_tokens=6, **kw):
    events = list(node.infer(InferRequest(model, prompt=prompt, sampling=SamplingParams(max_tokens=max_tokens), **kw)))
    assert events[-1]["type"] == "done"
    return "".join(e["text"] for e in events[:-1]), events[-1]["stats"]


def model_info(node, name):
    return next(m for m in node.models() if m["name"] == name)


def test_serverless_infer_from_each_tier(node_factory, sources):
    node = node_factory()
    info = node.import_model("m0", str(sources["m0"]))
    assert (info["state"], info["tiers"]) == ("on_ssd", ["ssd"])
    cold, stats = infer(node, "m0")
    assert stats["load_tier"] == "ssd" and stats["load_s"] > 0 and stats["ttft_s"] >= stats["load_s"]
    assert stats["tokens"] == 6 and stats["finish_reason"] == "length"
    m = model_info(node, "m0")
    assert (m["state"], m["tiers"], m["device"]) == ("loaded", ["ssd", "dram", "device"], "cpu")
    [p] = node.ps()
    assert (p["name"], p["state"], p["active_requests"], p["queued"]) == ("m0", "loaded", 0, 0)
    assert p["expires_at"] == pytest.approx(time.time() + 300, abs=5)

    out = node.evict("m0")
    assert out["evicted"] == ["device"] and out["reason"] == "manual"
    assert (out["state"], out["tiers"]) == ("in_dram", ["ssd", "dram"]) and node.ps() == []
    warm, stats = infer(node, "m0")
    assert stats["load_tier"] == "dram" and warm == cold
    hot, stats = infer(node, "m0")
    assert (stats["load_tier"], stats["load_s"]) == ("device", 0.0) and hot == cold

    out = node.evict("m0", tier="dram")  # the instance keeps running on its own memory
    assert out["evicted"] == ["dram"] and out["tiers"] == ["ssd", "device"]
    node.evict("m0")
    assert model_info(node, "m0")["state"] == "on_ssd"
    assert infer(node, "m0")[1]["load_tier"] == "ssd"
    reasons = [(e["name"], e["tier"], e["reason"]) for e in node.status()["evictions"]]
    assert reasons == [("m0", "device", "manual"), ("m0", "dram", "manual"), ("m0", "device", "manual")]


def test_load_keep_alive_and_idle_eviction(node_factory, sources):
    node = node_factory()
    node.import_model("m0", str(sources["m0"]))
    info = node.load("m0", keep_alive=-1)
    assert info["state"] == "loaded" and info["expires_at"] is None and info["load_tier"] == "ssd"
    infer(node, "m0", keep_alive=0.3)  # the last request's keep_alive wins
    assert node.ps()[0]["expires_at"] is not None
    deadline = time.time() + 5
    while model_info(node, "m0")["state"] != "in_dram" and time.time() < deadline:
        time.sleep(0.05)
    assert node.ps() == []
    m = model_info(node, "m0")
    assert (m["state"], m["reason"]) == ("in_dram", "idle")
    infer(node, "m0", keep_alive=0)  # 0: unloaded as soon as the request ends
    assert node.ps() == []
    assert [e["reason"] for e in node.status()["evictions"]] == ["idle", "idle"]


def test_pressure_evicts_the_idle_model_never_the_serving_one(node_factory, sources):
    node = node_factory(device_memory_bytes=2 * MiB, room_wait_s=0.2)  # room for one instance
    for name in ("m0", "m1"):
        node.import_model(name, str(sources[name]))
    infer(node, "m0")
    _, stats = infer(node, "m1")
    assert stats["load_tier"] == "ssd"
    assert [p["name"] for p in node.ps()] == ["m1"]
    m0 = model_info(node, "m0")
    assert (m0["state"], m0["reason"], m0["tiers"]) == ("in_dram", "pressure", ["ssd", "dram"])

    stream = node.infer(InferRequest("m1", prompt="z", sampling=SamplingParams(max_tokens=50_000)))
    assert next(stream)["type"] == "token"  # m1 is serving now
    with pytest.raises(OutOfMemoryError) as err:
        node.load("m0")
    assert err.value.exit_code == 75 and "serving" in str(err.value)
    assert model_info(node, "m0")["state"] == "in_dram"  # not failed: the device was merely full
    with pytest.raises(ModelInUseError):
        node.evict("m1")
    with pytest.raises(ModelInUseError):
        node.remove("m1")
    stream.close()  # the client goes away: the request stops and its lease goes
    deadline = time.time() + 10
    while node.ps()[0]["active_requests"] and time.time() < deadline:
        time.sleep(0.02)
    assert node.load("m0")["load_tier"] == "dram"
    assert [p["name"] for p in node.ps()] == ["m0"]


def test_concurrent_requests_to_two_models(node_factory, sources):
    node = node_factory(queue_depth=8)
    for name in ("m0", "m1"):
        node.import_model(name, str(sources[name]))
    prompts = ["héllo", "Paris", "日本語", "wörld"]
    expected = {}
    for name in ("m0", "m1"):
        for p in prompts:
            expected[name, p] = infer(node, name, p)[0]
        node.evict(name)  # the concurrent requests also race to load them
    results, errors = {}, []

    def client(name, p):
        try:
            results[name, p] = infer(node, name, p)[0]
        except Exception as e:
            errors.append(e)

    threads = [threading.Thread(target=client, args=key) for key in expected]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and results == expected
    assert expected["m0", "héllo"] != expected["m1", "héllo"]  # different models really answered
    assert sorted(p["name"] for p in node.ps()) == ["m0", "m1"]


def test_busy_when_the_queue_is_full(node_factory, sources):
    node = node_factory(queue_depth=1)
    node.import_model("m0", str(sources["m0"]))
    long = node.infer(InferRequest("m0", prompt="x", sampling=SamplingParams(max_tokens=50_000)))
    next(long)
    queued = node.infer(InferRequest("m0", prompt="y", sampling=SamplingParams(max_tokens=2)))
    t = threading.Thread(target=lambda: list(queued))  # waits in the queue
    t.start()
    deadline = time.time() + 5
    while node.ps()[0]["queued"] == 0 and time.time() < deadline:
        time.sleep(0.01)
    with pytest.raises(BusyError) as err:
        next(node.infer(InferRequest("m0", prompt="z")))
    assert (err.value.code, err.value.exit_code) == ("busy", 75)
    long.close()
    t.join(10)
    assert not t.is_alive()


def test_pins_remove_and_restart(node_factory, sources, tmp_path):
    node = node_factory()
    node.import_model("m0", str(sources["m0"]))
    node.import_model("m1", str(sources["m1"]))
    node.pin("m0")
    answer = infer(node, "m0")[0]
    node.remove("m1")
    assert [m["name"] for m in node.models()] == ["m0"]
    assert not (tmp_path / "store" / "models" / "m1").exists()
    with pytest.raises(ModelNotFoundError):
        node.infer(InferRequest("m1", prompt="x"))
    node.close()
    node.close()  # idempotent
    with pytest.raises(ShuttingDownError):
        node.models()
    again = node_factory()
    [m] = again.models()
    assert (m["name"], m["pinned"], m["state"], m["tiers"]) == ("m0", True, "on_ssd", ["ssd"])
    assert infer(again, "m0")[0] == answer
    again.unpin("m0")
    assert not again.models()[0]["pinned"]


def test_a_corrupt_checkpoint_fails_its_load_and_says_why(node_factory, sources, tmp_path):
    node = node_factory()
    node.import_model("m0", str(sources["m0"]))
    data = tmp_path / "store" / "models" / "m0" / "data-00000.bin"
    raw = bytearray(data.read_bytes())
    raw[1000] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(CorruptCheckpointError, match="data-00000.bin"):
        infer(node, "m0")
    m = model_info(node, "m0")
    assert m["state"] == "failed" and "data-00000.bin" in m["error"]
    assert node.ps() == [] and node.status()["tiers"]["dram"]["used_bytes"] == 0  # nothing half-loaded stays
    pool = node.status()["pool"]
    assert pool["free_chunks"] == pool["capacity_chunks"]


def test_status_and_bad_requests(node_factory, sources):
    node = node_factory()
    node.import_model("m0", str(sources["m0"]))
    infer(node, "m0")
    s = node.status()
    assert s["uptime_s"] >= 0 and s["device"] == "cpu"
    tiers = s["tiers"]
    assert tiers["ssd"]["used_bytes"] == model_info(node, "m0")["size_bytes"]
    assert tiers["dram"]["used_bytes"] == 1 * MiB and tiers["dram"]["capacity_bytes"] == 16 * MiB
    assert tiers["device"]["used_bytes"] == 2 * MiB and tiers["device"]["capacity_bytes"] == 8 * MiB
    assert s["loader"]["loads"] >= 1 and s["loader"]["bytes_read"] > 0
    assert s["arena"]["used_bytes"] == 2 * MiB and [i["name"] for i in s["instances"]] == ["m0"]
    with pytest.raises(InvalidRequestError):
        node.infer({"model": "m0", "prompt": "x", "max_tokens": -1})
    with pytest.raises(InvalidRequestError):
        node.evict("m0", tier="gpu")
    with pytest.raises(InvalidRequestError):
        node.load("m0", keep_alive=float("nan"))
    events = list(node.infer({"model": "m0", "prompt": "x", "max_tokens": 3, "chat": False}))
    assert events[-1]["stats"]["tokens"] == 3


@pytest.mark.slow
def test_smollm2_answers_paris(node_factory, smollm2_checkpoint):
    node = node_factory(dram_bytes=1024 * MiB, chunk_size=16 * MiB, device_memory_bytes=1024 * MiB)
    node.import_model("smollm2", str(smollm2_checkpoint))
    text, stats = infer(node, "smollm2", "What is the capital of France?", max_tokens=20)
    assert "Paris" in text, text
    assert stats["load_tier"] == "ssd" and stats["finish_reason"] == "stop"
    node.evict("smollm2")
    text2, stats = infer(node, "smollm2", "What is the capital of France?", max_tokens=20)
    assert text2 == text and stats["load_tier"] == "dram"


def test_close_lets_the_running_request_finish_and_fails_the_queued_one(node_factory, sources):
    node = node_factory(queue_depth=2, max_batch=1)  # one at a time: the second request waits in the queue
    node.import_model("m0", str(sources["m0"]))
    running = node.infer(InferRequest("m0", prompt="x", sampling=SamplingParams(max_tokens=60)))
    first = next(running)
    queued = node.infer(InferRequest("m0", prompt="y", sampling=SamplingParams(max_tokens=2)))
    outcome = {}

    def wait_queued():
        try:
            outcome["queued"] = list(queued)
        except Exception as e:
            outcome["queued"] = e

    t = threading.Thread(target=wait_queued)
    t.start()
    deadline = time.time() + 5
    while node.ps()[0]["queued"] == 0 and time.time() < deadline:
        time.sleep(0.01)
    closer = threading.Thread(target=node.close)
    closer.start()
    rest = [first] + list(running)  # the running request streams to its end
    assert rest[-1]["type"] == "done" and rest[-1]["stats"]["tokens"] == 60
    closer.join(30)
    t.join(10)
    # the daemon stopped it: the same answer (and exit code) as a request that arrives now
    assert (getattr(outcome["queued"], "code", None), outcome["queued"].exit_code) == ("shutting_down", 75)
    with pytest.raises(ShuttingDownError):
        node.infer(InferRequest("m0", prompt="late"))


def test_a_model_requested_again_while_its_instance_stops_loads_anew(node_factory, sources):
    """Between "chosen for eviction" and "stopped" the model is evicting; a load that
    starts in between loads a fresh instance, and the old one's end does not undo it."""
    node = node_factory()
    node.import_model("m0", str(sources["m0"]))
    expected = infer(node, "m0")[0]
    node.evict("m0")
    node.load("m0")
    with node.device._lock:  # freeze the moment: chosen for eviction, still stopping
        slot = node.device._take("m0", EvictReason.IDLE)
    assert model_info(node, "m0")["state"] == "evicting" and node.ps() == []
    assert infer(node, "m0")[0] == expected  # loads again
    node.device._finish_eviction(slot, EvictReason.IDLE)  # the old instance finishes stopping
    m = model_info(node, "m0")
    assert (m["state"], m["tiers"]) == ("loaded", ["ssd", "dram", "device"])
    assert m["last_evicted"]["tier"] == "device" and m["last_evicted"]["reason"] == "idle"


# --- one source of truth, leases, bounded waits (issue 6 item 3) ----------------------------
def test_keep_alive_0_hands_a_fresh_instance_to_its_requester(node_factory, sources, monkeypatch):
    """With keep_alive 0 the idle timer may run the moment a load commits; the request
    that triggered the load already holds its lease then, so it is not evicted under it."""
    node = node_factory(keep_alive_s=0.0)
    node.import_model("m0", str(sources["m0"]))
    real_commit = node.device.commit

    def commit_then_the_timer_fires(*args, **kw):
        slot = real_commit(*args, **kw)
        node.device.evict_expired()
        return slot

    monkeypatch.setattr(node.device, "commit", commit_then_the_timer_fires)
    text, stats = infer(node, "m0")
    assert stats["load_tier"] == "ssd" and stats["tokens"] == 6
    assert node.ps() == [] and model_info(node, "m0")["state"] == "in_dram"  # gone once the request ended
    assert node.status()["loads"]["ok"] == 1


def _slow_loads(monkeypatch):
    """Holds every load after its device reservation until the returned event is set."""
    import sllmd.node as node_mod
    release, started = threading.Event(), threading.Event()
    real = node_mod.load_instance

    def held(*args, **kw):
        started.set()
        release.wait(30)
        return real(*args, **kw)

    monkeypatch.setattr(node_mod, "load_instance", held)
    return started, release


def test_waits_for_a_load_are_bounded_and_a_load_nobody_waits_for_is_cancelled(node_factory, sources, monkeypatch):
    from sllmd.errors import CancelledError, LoadTimeoutError
    node = node_factory(load_wait_s=0.5)
    node.import_model("m0", str(sources["m0"]))
    started, release = _slow_loads(monkeypatch)
    outcome = {}

    def first_token(key, **kw):
        try:
            outcome[key] = next(node.infer(InferRequest("m0", prompt="x"), **kw))
        except Exception as e:
            outcome[key] = e

    t = threading.Thread(target=first_token, args=("timed",))
    t.start()
    t.join(20)
    assert not t.is_alive(), "the wait for the load is not bounded"
    err = outcome["timed"]
    assert isinstance(err, LoadTimeoutError) and err.exit_code == 75 and "0.5 s" in str(err)
    assert started.is_set() and model_info(node, "m0")["state"] == "loading"
    release.set()
    deadline = time.time() + 20
    while node.status()["loads"]["cancelled"] == 0 and time.time() < deadline:
        time.sleep(0.05)
    s = node.status()
    assert s["loads"]["cancelled"] == 1 and s["loads"]["ok"] == 0 and s["loads"]["in_flight"] == 0
    assert node.ps() == [] and s["tiers"]["device"]["used_bytes"] == 0 and s["arena"]["used_bytes"] == 0
    assert model_info(node, "m0")["state"] == "in_dram"  # the bytes it read stay cached, the instance went

    started.clear()
    release.clear()
    node.loads.wait_s = 30.0
    gone = threading.Event()
    t = threading.Thread(target=first_token, args=("cancelled",), kwargs={"cancelled": gone})
    t.start()
    assert started.wait(10)
    gone.set()  # the client went away while its model loaded
    t.join(10)
    assert isinstance(outcome["cancelled"], CancelledError)
    release.set()
    while node.status()["loads"]["cancelled"] == 1 and time.time() < deadline + 20:
        time.sleep(0.05)
    assert node.status()["loads"]["cancelled"] == 2 and node.ps() == []
    assert infer(node, "m0")[1]["load_tier"] == "dram"  # and the next request loads normally


def test_concurrent_waiters_share_one_load_and_each_gets_a_lease(node_factory, sources, monkeypatch):
    node = node_factory(keep_alive_s=0.0)
    node.import_model("m0", str(sources["m0"]))
    expected = infer(node, "m0")[0]
    started, release = _slow_loads(monkeypatch)
    results, errors = [], []

    def client():
        try:
            results.append(infer(node, "m0"))
        except Exception as e:
            errors.append(e)

    threads = [threading.Thread(target=client) for _ in range(3)]
    for t in threads:
        t.start()
    assert started.wait(10)
    deadline = time.time() + 10
    while node.loads.pending("m0").waiters < 3 and time.time() < deadline:
        time.sleep(0.01)
    release.set()
    for t in threads:
        t.join(60)
    assert not errors and [r[0] for r in results] == [expected] * 3
    assert {r[1]["load_tier"] for r in results} == {"dram"} and node.status()["loads"]["ok"] == 2


# --- exit codes mean what they say (issue 7 item 6) -------------------------------------------
def test_a_model_larger_than_the_device_budget_is_too_large_not_busy(node_factory, sources):
    from sllmd.errors import TooLargeError
    node = node_factory(device_memory_bytes=1024)
    node.import_model("m0", str(sources["m0"]))
    with pytest.raises(TooLargeError) as err:
        infer(node, "m0")
    assert err.value.exit_code == 1 and str(err.value) == \
        "model 'm0' needs 2 MiB; the device budget on cpu is 1 KiB"
    m = model_info(node, "m0")
    assert m["state"] == "failed" and "needs 2 MiB" in m["error"]
    assert node.status()["loads"] == {"ok": 0, "failed": 1, "busy": 0, "cancelled": 0, "in_flight": 0}


def test_a_second_model_waits_bounded_for_device_room(node_factory, sources):
    node = node_factory(device_memory_bytes=2 * MiB, room_wait_s=30.0)  # room for one instance
    for name in ("m0", "m1"):
        node.import_model(name, str(sources[name]))
    stream = node.infer(InferRequest("m1", prompt="z", sampling=SamplingParams(max_tokens=50_000)))
    assert next(stream)["type"] == "token"  # m1 serves: the device is full of busy instances
    got = {}
    t = threading.Thread(target=lambda: got.setdefault("m0", infer(node, "m0")))
    t.start()
    time.sleep(0.5)
    assert t.is_alive() and model_info(node, "m0")["state"] == "loading"  # waiting for room, not failed
    stream.close()  # m1 goes idle: m0 gets its room
    t.join(30)
    stats = got["m0"][1]
    assert stats["room_wait_s"] >= 0.5 and stats["queue_s"] >= stats["room_wait_s"]
    assert [p["name"] for p in node.ps()] == ["m0"]

    node._room_wait_s = 0.3
    stream = node.infer(InferRequest("m0", prompt="z", sampling=SamplingParams(max_tokens=50_000)))
    assert next(stream)["type"] == "token"
    with pytest.raises(OutOfMemoryError, match="after waiting 0.3 s") as err:
        infer(node, "m1")
    assert err.value.exit_code == 75
    assert model_info(node, "m1")["state"] == "in_dram" and node.status()["loads"]["busy"] == 1
    stream.close()


# --- failures, evictions, sizes, version (issue 7 items 4, 5, 10; issue 6 item 12) -------------
def test_a_model_that_fails_to_load_keeps_no_dram_copy(node_factory, sources, tmp_path):
    import json
    node = node_factory()
    node.import_model("m0", str(sources["m0"]))
    node.close()
    config = tmp_path / "store" / "models" / "m0" / "model" / "config.json"
    cfg = json.loads(config.read_text())
    cfg["intermediate_size"] *= 2  # the weights no longer fit the model it describes
    config.write_text(json.dumps(cfg))
    node = node_factory()
    with pytest.raises(SllmError) as err:
        infer(node, "m0")
    m = model_info(node, "m0")
    assert m["state"] == "failed" and m["error"] == str(err.value) and m["tiers"] == ["ssd"]
    assert m["last_evicted"]["tier"] == "dram" and m["last_evicted"]["reason"] == "failed"
    s = node.status()
    assert s["tiers"]["dram"]["used_bytes"] == 0 and s["pool"]["free_chunks"] == s["pool"]["capacity_chunks"]
    assert s["loads"]["failed"] == 1 and s["loads"]["ok"] == 0


def test_idle_dram_copies_do_not_pin_ssd_copies_and_rm_leaves_no_ghost(node_factory, sources):
    probe = node_factory()
    one = probe.import_model("m0", str(sources["m0"]))["ssd_bytes"]
    probe.close()
    node = node_factory(store_dir=probe.config.store_dir.parent / "store2", ssd_capacity_bytes=2 * one + one // 2)
    node.import_model("m0", str(sources["m0"]))
    infer(node, "m0")
    node.evict("m0")  # now only on SSD and in DRAM
    node.import_model("m1", str(sources["m1"]))
    info = node.import_model("m2", str(sources["m2"]))  # the store must drop m0 to make room
    assert [e["name"] for e in info["evicted"]] == ["m0"]
    assert sorted(m["name"] for m in node.models()) == ["m1", "m2"] and "m0" not in node.dram
    assert node.status()["tiers"]["dram"]["used_bytes"] == 0
    infer(node, "m1")
    node.remove("m1", force=True)
    assert [m["name"] for m in node.models()] == ["m2"] and node.ps() == []
    assert "m1" not in node.dram and not node.device.stopping("m1")


def test_one_size_per_model_in_models_ps_and_status(node_factory, sources):
    node = node_factory()
    node.import_model("m0", str(sources["m0"]))
    first = node.load("m0")
    assert first["already_loaded"] is False and first["load_tier"] == "ssd"
    again = node.load("m0")
    assert again["already_loaded"] is True and again["load_tier"] == "device"
    m = model_info(node, "m0")
    [p] = node.ps()
    [i] = node.status()["instances"]
    sizes = {k: m[k] for k in ("ssd_bytes", "dram_bytes", "device_bytes", "size_bytes")}
    assert sizes == {k: p[k] for k in sizes} == {k: i[k] for k in sizes}
    assert sizes["ssd_bytes"] == m["size_bytes"] and sizes["dram_bytes"] == 1 * MiB
    assert sizes["device_bytes"] == 2 * MiB


def test_version_changes_with_every_state_change_and_only_then(node_factory, sources):
    node = node_factory()
    v = [node.version]

    def changed():
        now = node.version
        moved = now > v[-1]
        v.append(now)
        return moved

    node.models(), node.ps(), node.status()
    assert not changed()
    node.import_model("m0", str(sources["m0"]))
    assert changed()
    node.load("m0")
    assert changed()
    node.models(), node.ps(), node.status()
    assert not changed()
    infer(node, "m0")
    assert changed()
    node.pin("m0")
    assert changed()
    node.evict("m0")
    assert changed()
    node.evict("m0", tier="dram")
    assert changed()
    node.unpin("m0")
    node.remove("m0")
    assert changed() and node.status()["version"] == node.version
