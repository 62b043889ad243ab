"""The tiers on real checkpoints: the SSD store (atomic imports, catalog rebuilt
from disk, pins, LRU capacity, kill -9 during import), the DRAM tier on the
chunk pool (LRU, refcounts, no leaked chunks), the device tier (pressure and
idle eviction, never a serving instance) and loading from each tier."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, make_tiny_model
from sllmd import store
from sllmd.errors import LoadCancelledError, OutOfMemoryError, TooLargeError
from sllmd.inference import InferRequest, SamplingParams
from sllmd.inference.engine import Instance
from sllmd.pool import ChunkPool, HostArena
from sllmd.store.format import open_checkpoint
from sllmd.tiers.device import DeviceTier
from sllmd.tiers.dram import DramTier
from sllmd.errors import (InvalidNameError, ModelExistsError, ModelInUseError, ModelNotFoundError,
                                StoreFullError, StoreLockedError)
from sllmd.tiers.loader import load_instance
from sllmd.tiers.ssd import SsdStore
from sllmd.tiers.states import EvictReason
from test_inference import tiny_tokenizer

MiB = 1 << 20


def blob_checkpoint(path: Path, nbytes: int, seed: int = 0) -> Path:
    """A tensors-only checkpoint of about nbytes (random bytes, so a wrong copy shows)."""
    g = torch.Generator().manual_seed(seed)
    return store.save_state_dict({"w": torch.randint(0, 255, (nbytes,), dtype=torch.uint8, generator=g)}, path)


@pytest.fixture
def evictions():
    return []


@pytest.fixture
def ssd(tmp_path, evictions):
    s = SsdStore(tmp_path / "store", on_evict=lambda n, r: evictions.append((n, r)))
    s.open()
    yield s
    s.close()


# --- SSD ------------------------------------------------------------------------------------
def test_import_copies_our_format_and_the_catalog_survives_a_restart(tmp_path, ssd):
    src = blob_checkpoint(tmp_path / "src", 100_000)
    e = ssd.import_model("blob:v1", src)
    assert e.path == ssd.models_dir / "blob:v1" and e.error is None and e.nbytes > 100_000
    assert open_checkpoint(e.path).tensors["w"].nbytes == 100_000
    assert (e.path / "data-00000.bin").read_bytes() == (src / "data-00000.bin").read_bytes()
    ssd.set_pinned("blob:v1", True)
    ssd.touch("blob:v1", now=1234.5)
    ssd.close()
    again = SsdStore(ssd.root)
    again.open()
    try:
        [e2] = again.entries()
        assert (e2.name, e2.pinned, e2.last_used, e2.nbytes) == ("blob:v1", True, 1234.5, e.nbytes)
    finally:
        again.close()


@pytest.mark.parametrize("name", ["", ".hidden", "a/b", "../x", "a..b", "-x", "x" * 129, "a b"])
def test_bad_names_are_refused(tmp_path, ssd, name):
    with pytest.raises(InvalidNameError):
        ssd.import_model(name, blob_checkpoint(tmp_path / "src", 10))
    assert ssd.entries() == [] and list(ssd.staging_dir.iterdir()) == []


def test_duplicate_and_missing(tmp_path, ssd):
    src = blob_checkpoint(tmp_path / "src", 10)
    ssd.import_model("a", src)
    with pytest.raises(ModelExistsError):
        ssd.import_model("a", src)
    with pytest.raises(ModelNotFoundError):
        ssd.get("nope")
    with pytest.raises(Exception, match="no such file"):
        ssd.import_model("b", tmp_path / "missing")


def test_import_converts_a_safetensors_model_directory(tmp_path, ssd):
    tok = tiny_tokenizer()
    model = make_tiny_model("llama", vocab_size=len(tok))
    model.save_pretrained(tmp_path / "hf")
    tok.save_pretrained(tmp_path / "hf")
    e = ssd.import_model("hf-tiny", tmp_path / "hf")
    ckpt = open_checkpoint(e.path)
    assert set(ckpt.tensors) == set(model.state_dict())
    assert (e.path / "model" / "config.json").is_file()


def test_a_second_daemon_cannot_open_the_same_store(ssd):
    with pytest.raises(StoreLockedError):
        SsdStore(ssd.root).open()


def test_leftovers_are_cleaned_and_broken_models_are_flagged(tmp_path):
    root = tmp_path / "store"
    s = SsdStore(root)
    s.open()
    s.import_model("good", blob_checkpoint(tmp_path / "src", 10))
    s.close()
    (root / "staging" / "import-deadbeef" / "checkpoint").mkdir(parents=True)  # an import killed mid-way
    (root / "models" / ".x.tmp-1-abc").mkdir()  # a writer's temporary
    (root / "models" / "broken").mkdir()  # not a checkpoint (no manifest)
    (root / "catalog.json").write_text("{not json")  # a torn catalog loses pins, not models
    s = SsdStore(root)
    s.open()
    try:
        assert list((root / "staging").iterdir()) == [] and not (root / "models" / ".x.tmp-1-abc").exists()
        by_name = {e.name: e for e in s.entries()}
        assert set(by_name) == {"good", "broken"}
        assert by_name["good"].error is None and "not a checkpoint" in by_name["broken"].error
        json.loads((root / "catalog.json").read_text())  # rewritten whole
    finally:
        s.close()


def test_capacity_evicts_lru_unpinned_idle_models(tmp_path, evictions):
    size = 300_000
    srcs = [blob_checkpoint(tmp_path / f"src{i}", size, seed=i) for i in range(5)]
    probe = SsdStore(tmp_path / "probe")
    probe.open()
    one = probe.import_model("x", srcs[0]).nbytes
    probe.close()
    s = SsdStore(tmp_path / "store", capacity_bytes=3 * one, on_evict=lambda n, r: evictions.append((n, r)))
    s.open()
    try:
        for i, name in enumerate(["a", "b", "c"]):
            s.import_model(name, srcs[i])
            s.touch(name, now=float(i))
        s.set_pinned("a", True)  # the oldest, but pinned
        s.acquire("b")  # being read: not evictable either
        s.import_model("d", srcs[3])
        assert evictions == [("c", EvictReason.LRU)]
        assert {e.name for e in s.entries()} == {"a", "b", "d"} and s.used_bytes <= 3 * one
        s.set_pinned("d", True)
        with pytest.raises(StoreFullError, match="pinned or in use"):  # a and d pinned, b in use
            s.import_model("e", srcs[4])
        assert {e.name for e in s.entries()} == {"a", "b", "d"}
        assert list(s.staging_dir.iterdir()) == []  # the refused import left nothing behind
        s.release("b")
        s.import_model("e", srcs[4])
        assert evictions[-1] == ("b", EvictReason.LRU) and len(evictions) == 2
        with pytest.raises(StoreFullError, match="at most"):
            s.import_model("huge", blob_checkpoint(tmp_path / "huge", 4 * one))
    finally:
        s.close()


def test_remove_is_refused_while_in_use(tmp_path, ssd, evictions):
    ssd.import_model("a", blob_checkpoint(tmp_path / "src", 10))
    ssd.acquire("a")
    with pytest.raises(ModelInUseError):
        ssd.remove("a")
    ssd.release("a")
    ssd.is_busy = lambda name: True  # e.g. the node has it in DRAM
    with pytest.raises(ModelInUseError):
        ssd.remove("a")
    ssd.is_busy = lambda name: False
    ssd.remove("a")
    assert not (ssd.models_dir / "a").exists() and evictions == [("a", EvictReason.MANUAL)]


KILLER = textwrap.dedent("""
    import os, signal, sys
    from sllmd.tiers.ssd import SsdStore
    s = SsdStore(sys.argv[1]); s.open()
    def progress(done, total):
        if done > total // 2:
            os.kill(os.getpid(), signal.SIGKILL)
    s.import_model("victim", sys.argv[2], progress=progress)
""")


def test_kill_9_during_import_leaves_a_consistent_store(tmp_path):
    root = tmp_path / "store"
    s = SsdStore(root)
    s.open()
    s.import_model("keep", blob_checkpoint(tmp_path / "keep", 1000))
    s.close()
    src = blob_checkpoint(tmp_path / "big", 48 * MiB)
    proc = subprocess.run([sys.executable, "-c", KILLER, str(root), str(src)], cwd=REPO, capture_output=True,
                          timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert any((root / "staging").iterdir())  # it died half-way through
    s = SsdStore(root)
    s.open()
    try:
        assert [e.name for e in s.entries()] == ["keep"] and s.entries()[0].error is None
        assert list((root / "staging").iterdir()) == [] and sorted(os.listdir(root / "models")) == ["keep"]
        s.import_model("victim", src)  # and the name is free again
    finally:
        s.close()


# --- DRAM -----------------------------------------------------------------------------------
def test_dram_tier_lru_refcounts_and_no_leaks(tmp_path, evictions):
    pool = ChunkPool(4 * MiB, chunk_size=1 * MiB)
    dram = DramTier(pool, on_evict=lambda n, r: evictions.append((n, r)))
    ckpts = {n: open_checkpoint(blob_checkpoint(tmp_path / n, 1 * MiB + 10, seed=i))
             for i, n in enumerate("abc")}  # two chunks each
    a = dram.admit("a", ckpts["a"])
    dram.release("a")
    b = dram.admit("b", ckpts["b"])  # held: b stays referenced
    assert dram.names() == ["a", "b"] and pool.stats()["free_chunks"] == 0
    assert dram.admit("c", ckpts["c"]) is not None  # evicts a (LRU, idle), not the referenced b
    assert evictions == [("a", EvictReason.LRU)] and a.released and not b.released
    assert dram.names() == ["b", "c"]
    dram.release("c")
    huge = open_checkpoint(blob_checkpoint(tmp_path / "huge", 5 * MiB))
    assert dram.admit("huge", huge) is None and dram.names() == ["b", "c"]  # never fits: nothing evicted
    with pytest.raises(ModelInUseError):
        dram.evict("b")
    dram.release("b")
    assert dram.evict("b") and not dram.evict("b")
    cached = dram.acquire("c")
    sd = cached.load_state_dict("cpu")
    assert torch.equal(sd["w"], store.load_state_dict(ckpts["c"].path)["w"])
    dram.release("c")
    dram.clear()
    s = pool.stats()
    assert s["free_chunks"] == s["capacity_chunks"] and s["allocations"] == s["releases"]


def test_dram_admission_evicts_only_when_it_then_admits(tmp_path, evictions, monkeypatch):
    """c evicts the idle a to make room; d arrives while c's bytes are still being read:
    the room is c's already, so d is refused without evicting anything, and c is cached."""
    from sllmd.tiers import dram as dram_mod
    pool = ChunkPool(4 * MiB, chunk_size=1 * MiB)
    dram = DramTier(pool, on_evict=lambda n, r: evictions.append((n, r)))
    ckpts = {n: open_checkpoint(blob_checkpoint(tmp_path / n, 1 * MiB + 10, seed=i)) for i, n in enumerate("abcd")}
    dram.admit("a", ckpts["a"])
    dram.release("a")
    dram.admit("b", ckpts["b"])  # b stays referenced
    reading, resume = threading.Event(), threading.Event()
    real_read = dram_mod.PooledCheckpoint.read.__func__

    def paused_read(cls, ckpt, pool, **kw):
        if ckpt is ckpts["c"]:
            reading.set()
            resume.wait(10)
        return real_read(cls, ckpt, pool, **kw)

    monkeypatch.setattr(dram_mod.PooledCheckpoint, "read", classmethod(paused_read))
    result = {}
    t = threading.Thread(target=lambda: result.setdefault("c", dram.admit("c", ckpts["c"])))
    t.start()
    assert reading.wait(10)
    assert dram.admit("d", ckpts["d"]) is None  # no room: a's chunks are c's now, b is in use
    resume.set()
    t.join(10)
    assert result["c"] is not None and dram.names() == ["b", "c"]
    assert evictions == [("a", EvictReason.LRU)]
    dram.release("b")
    dram.release("c")
    dram.clear()
    s = pool.stats()
    assert s["free_chunks"] == s["capacity_chunks"]


def test_dram_admit_fills_device_buffers_in_the_same_pass(tmp_path):
    from sllmd.pool import buffers
    pool = ChunkPool(8 * MiB, chunk_size=1 * MiB)
    dram = DramTier(pool)
    ckpt = open_checkpoint(blob_checkpoint(tmp_path / "x", 3 * MiB + 77))
    bufs = [buffers.allocate(p.nbytes, torch.device("cpu")) for p in ckpt.manifest.partitions]
    assert dram.admit("x", ckpt, device_buffers=bufs) is not None
    assert bytes(bufs[0].numpy()) == (ckpt.path / "data-00000.bin").read_bytes()
    dram.release("x")
    dram.clear()


# --- device ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _instance(tok, name):
    return Instance(name, make_tiny_model("llama", vocab_size=len(tok)), tok, device="cpu", nbytes=100)


def _fill(dev, tok, names, now):
    for i, n in enumerate(names):
        dev.reserve(n, 100)
        dev.commit(n, _instance(tok, n), keep_alive_s=-1, load_tier="ssd", load_s=0.0)
        dev.keep_alive(n, -1)
        dev.get(n).last_used = now + i


def test_device_pressure_evicts_lru_idle_never_serving(tok, evictions):
    dev = DeviceTier("cpu", 300, on_evict=lambda n, r: evictions.append((n, r)))
    try:
        _fill(dev, tok, ["a", "b", "c"], now=0.0)
        inst_a = dev.lease("a")  # a serves (and becomes the most recently used)
        dev.get("a").last_used = -1.0  # even as the least recently used, it is not evicted
        assert dev.reserve("d", 100) == ["b"]
        assert evictions == [("b", EvictReason.PRESSURE)] and "b" not in dev
        with pytest.raises(TooLargeError, match="needs 1000 B; the device budget on cpu is 300 B") as err:
            dev.reserve("e", 1000)  # larger than the whole budget: permanent
        assert err.value.exit_code == 1
        dev.abort("d")
        dev.lease("c")
        dev.reserve("f", 100)  # the free 100 bytes that d gave back
        with pytest.raises(OutOfMemoryError, match="serving"):
            dev.reserve("g", 100)  # a and c serve, f is loading: nothing can go
        assert inst_a.model is not None
        dev.abort("f")
        with pytest.raises(ModelInUseError):
            dev.evict("a")
        dev.unlease("a", keep_alive_s=-1)
        assert dev.evict("a") and inst_a.model is None and not inst_a._thread.is_alive()
    finally:
        dev.close_all()


def test_device_reserve_waits_bounded_for_room(tok, evictions):
    dev = DeviceTier("cpu", 100, on_evict=lambda n, r: evictions.append((n, r)))
    try:
        _fill(dev, tok, ["a"], now=0.0)
        dev.lease("a")  # a serves
        with pytest.raises(OutOfMemoryError, match="after waiting 0.2 s"):
            dev.reserve("b", 100, wait_s=0.2)
        with pytest.raises(LoadCancelledError):
            dev.reserve("b", 100, wait_s=30, cancelled=lambda: True)
        got = []
        waiter = threading.Thread(target=lambda: got.append(dev.reserve("b", 100, wait_s=30)))
        waiter.start()
        time.sleep(0.3)
        assert waiter.is_alive() and "b" not in dev  # still waiting: a serves
        dev.unlease("a", keep_alive_s=-1)  # a goes idle: b gets its room by evicting it
        waiter.join(10)
        assert got == [["a"]] and "b" in dev and evictions == [("a", EvictReason.PRESSURE)]
    finally:
        dev.close_all()


def test_device_keep_alive_expiry(tok, evictions):
    clock = [1000.0]
    dev = DeviceTier("cpu", 1000, on_evict=lambda n, r: evictions.append((n, r)), clock=lambda: clock[0])
    try:
        _fill(dev, tok, ["short", "forever", "zero"], now=clock[0])
        dev.keep_alive("short", 5.0)
        dev.keep_alive("zero", 0.0)
        assert dev.evict_expired(now=1000.0) == ["zero"]  # 0: unloaded as soon as idle
        inst = dev.lease("short")
        assert dev.evict_expired(now=2000.0) == []  # serving: never, however late
        h = inst.submit(InferRequest("short", prompt="x", sampling=SamplingParams(max_tokens=2)))
        list(h)
        clock[0] = 2000.0
        dev.unlease("short", keep_alive_s=5.0)  # the finished request sets the deadline
        assert dev.get("short").expires_at == 2005.0 and dev.next_deadline() == 2005.0
        assert dev.evict_expired(now=2004.9) == []
        assert dev.evict_expired(now=2005.0) == ["short"]
        assert dev.evict_expired(now=1e12) == [] and "forever" in dev
        assert evictions == [("zero", EvictReason.IDLE), ("short", EvictReason.IDLE)]
    finally:
        dev.close_all()


# --- loading from each tier -------------------------------------------------------------------
def test_load_instance_from_ssd_then_dram_gives_the_same_model(tmp_path, tok):
    model = make_tiny_model("gpt2", vocab_size=len(tok))  # tied weights
    path = store.save_model(model, tmp_path / "ckpt", tokenizer=tok)
    ckpt = open_checkpoint(path)
    pool = ChunkPool(8 * MiB, chunk_size=1 * MiB)
    dram = DramTier(pool)
    arena = HostArena(16 * MiB, prefault=False)
    x = torch.tensor([tok.encode("héllo wörld")])
    with torch.inference_mode():
        expected = model(x).logits
    for want in ("ssd", "dram"):
        loaded = load_instance("m", ckpt, "cpu", dram=dram, arena=arena)
        assert loaded.tier == want and arena.used > 0
        with torch.inference_mode():
            assert torch.equal(loaded.model(x).logits, expected)
        assert loaded.model.lm_head.weight.data_ptr() == loaded.model.transformer.wte.weight.data_ptr()
        assert loaded.tokenizer.encode("héllo") == tok.encode("héllo")
        del loaded
        import gc
        gc.collect()
        assert arena.used == 0  # the instance's buffers went back to the arena
    assert "m" in dram
    dram.evict("m")
    loaded = load_instance("m", ckpt, "cpu", dram=None, arena=None)  # no DRAM tier at all: straight from SSD
    assert loaded.tier == "ssd"
    dram.clear()


def test_preparer_builds_skeletons_and_tokenizers_ahead(tmp_path, tok):
    from sllmd.tiers.prepare import Preparer
    path = store.save_model(make_tiny_model("llama", vocab_size=len(tok)), tmp_path / "ckpt", tokenizer=tok)
    prep = Preparer(lambda: False)
    prep.prepare([("m", path), ("broken", tmp_path / "missing")])
    prep.join(60)
    skeleton = prep.take_skeleton("m").result(timeout=1)
    assert all(p.device.type == "meta" for p in skeleton.parameters())
    assert prep.take_skeleton("m") is None  # handed out once
    assert prep.tokenizer("m").encode("héllo") == tok.encode("héllo")
    with pytest.raises(Exception):
        prep.take_skeleton("broken").result(timeout=1)
    loaded = load_instance("m", open_checkpoint(path), "cpu", skeleton=skeleton, tokenizer=prep.tokenizer("m"))
    assert loaded.model is skeleton and loaded.timings["build_s"] < 0.05
    assert not any(p.device.type == "meta" for p in loaded.model.parameters())
    prep.forget("m")
    assert prep.tokenizer("m") is None


# --- background prefault ----------------------------------------------------------------------
def test_background_prefault_keeps_contents_and_stops_when_asked():
    from sllmd.pool import pipeline
    from sllmd.tiers.prefault import BackgroundPrefault
    pool = ChunkPool(64 * MiB, chunk_size=1 * MiB)
    [chunk] = pool.allocate(1)
    view = pipeline.chunk_tensor(pool, chunk)
    view[:4096] = torch.arange(4096) % 251  # a chunk in use while the pool faults in
    before = view[:4096].clone()
    done = BackgroundPrefault(pool.native.base_address, pool.native.mapped_bytes).start()
    done._thread.join(60)
    assert done.stats() == {"total_bytes": pool.native.mapped_bytes, "done_bytes": pool.native.mapped_bytes,
                            "running": False, "error": None}
    assert torch.equal(view[:4096], before)

    slow = BackgroundPrefault(pool.native.base_address, pool.native.mapped_bytes, slice_bytes=1 * MiB,
                              pause_s=10.0).start()
    while slow.done_bytes == 0 and slow.running:
        time.sleep(0.01)
    slow.stop(timeout=5.0)  # wakes from its pause at once: it never holds up a node's close
    assert not slow.running and 0 < slow.done_bytes < pool.native.mapped_bytes
    pool.release([chunk])


def test_a_node_faults_its_pool_in_the_background_and_close_stops_it(tmp_path):
    from sllmd.config import Config
    from sllmd.node import Node
    node = Node(Config(socket=str(tmp_path / "s"), store_dir=tmp_path / "store", dram_bytes=64 * MiB,
                       chunk_size=1 * MiB, device_memory_bytes=64 * MiB, prefault=True))
    node.start()
    try:
        s = node.status()
        assert s["pool"]["prefault"]["total_bytes"] == s["pool"]["capacity_bytes"]  # under way, in the background
    finally:
        node.close()
    assert not node._prefault.running  # close stopped it
