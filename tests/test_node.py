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
from sllmd.errors import CorruptCheckpointError, OutOfMemoryError
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
    node = node_factory(device_memory_bytes=2 * MiB)  # room for one instance
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
    node = node_factory(queue_depth=2)
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
