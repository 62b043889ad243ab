"""CUDA end to end: a node and a daemon on cuda:0 (serverless infer from each tier,
straight from SSD through the staging ring, two concurrent cold loads, evicting
frees GPU memory, the pool pinned at start and unpinned at close). Tiny models:
a few minutes on one GPU."""
from __future__ import annotations

import gc
import json
import threading

import pytest
import torch

from conftest import make_tiny_model
from sllmd import store
from sllmd.node import Node
from sllmd.pool import counters, pipeline
from test_inference import tiny_tokenizer
from test_node import infer, make_config

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

MiB = 1 << 20


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    tok = tiny_tokenizer()
    root = tmp_path_factory.mktemp("gpu-sources")
    return {f"m{i}": store.save_model(make_tiny_model("llama", seed=i, vocab_size=len(tok),
                                                      max_position_embeddings=2048),
                                      root / f"m{i}", tokenizer=tok)
            for i in range(2)}


@pytest.fixture
def cuda_node(tmp_path):
    nodes = []

    def make(**kw):
        base = dict(device="cuda:0", device_memory_bytes=256 * MiB, dram_bytes=16 * MiB, chunk_size=MiB,
                    compute_dtype="fp32")  # as stored: the byte counts below are the checkpoint's
        base.update(kw)
        n = Node(make_config(tmp_path, **base))
        n.start()
        nodes.append(n)
        return n

    yield make
    for n in nodes:
        n.close()


def _on_cuda(node, name) -> bool:
    inst = node.device.get(name).instance
    return all(p.device.type == "cuda" for p in inst.model.parameters())


def test_cuda_serverless_infer_from_each_tier_and_the_pool_unpinned_at_close(cuda_node, sources):
    node = cuda_node()
    assert node.pool.pin()  # pinned in the background at start; this waits for it
    node.import_model("m0", str(sources["m0"]))
    c0 = counters()
    cold, stats = infer(node, "m0")
    assert stats["load_tier"] == "ssd" and _on_cuda(node, "m0")
    weights = store.open_checkpoint(node.ssd.get("m0").path).manifest.total_bytes
    assert node.ps()[0]["size_bytes"] > weights  # the budget holds its KV cache and activations too
    node.evict("m0")
    from_dram, stats = infer(node, "m0")
    assert stats["load_tier"] == "dram" and _on_cuda(node, "m0") and from_dram == cold
    warm, stats = infer(node, "m0")
    assert stats["load_tier"] == "device" and warm == cold
    c1 = counters()
    assert c1["dram_hits"] - c0["dram_hits"] == 1
    assert c1["bytes_h2d"] - c0["bytes_h2d"] >= 2 * weights and c1["ns_h2d"] > c0["ns_h2d"]
    node.close()
    assert not node.pool.pinned


def test_cuda_straight_from_ssd_streams_through_the_bounded_staging_ring(cuda_node, sources):
    node = cuda_node(dram_bytes=0)  # no DRAM tier: disk -> staging ring -> device
    node.import_model("m1", str(sources["m1"]))
    text, stats = infer(node, "m1")
    assert stats["load_tier"] == "ssd" and _on_cuda(node, "m1") and text
    staging = pipeline.staging_pool()
    assert staging.pinned
    assert staging.capacity_bytes == pipeline.STAGING_CHUNKS * staging.chunk_size  # bounded, whatever the model
    assert staging.stats()["used_chunks"] == 0  # the ring went back


def test_two_concurrent_cold_loads_on_cuda(cuda_node, sources):
    node = cuda_node()
    for name in ("m0", "m1"):
        node.import_model(name, str(sources[name]))
    results, errors = {}, []

    def run(name):
        try:
            results[name] = infer(node, name)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=run, args=(n,)) for n in ("m0", "m1")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors
    for name in ("m0", "m1"):
        text, stats = results[name]
        assert stats["load_tier"] == "ssd" and _on_cuda(node, name)
        again, stats = infer(node, name)
        assert stats["load_tier"] == "device" and again == text


def test_evicting_frees_gpu_memory(cuda_node, sources):
    node = cuda_node(dram_bytes=0)
    for name in ("m0", "m1"):
        node.import_model(name, str(sources[name]))
    node.load("m1")  # first load in this process: CUDA context, kernels, warm-up all settled
    node.evict("m1")
    gc.collect()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated(0)
    node.load("m0")
    weights = store.open_checkpoint(node.ssd.get("m0").path).manifest.total_bytes
    assert torch.cuda.memory_allocated(0) >= before + weights
    node.evict("m0")
    gc.collect()
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated(0) <= before + MiB


def test_daemon_on_cuda_serves_from_each_tier(sources):
    from daemon_helpers import DaemonProcess, remove_tree, short_tempdir, sllmctl
    root = short_tempdir()
    try:
        with DaemonProcess(root, "--device", "cuda:0", dram="64MiB", device_memory="1GiB") as d:
            assert sllmctl("import", "m0", str(sources["m0"]), socket_path=d.socket).returncode == 0
            outputs = []
            for step in ("cold", "from dram"):
                run = sllmctl("infer", "m0", "héllo", "--raw", "--max-tokens", "6", socket_path=d.socket)
                assert run.returncode == 0, run.stderr
                outputs.append(run.stdout)
                if step == "cold":
                    assert sllmctl("evict", "m0", socket_path=d.socket).returncode == 0
            assert outputs[0] == outputs[1]
            status = json.loads(sllmctl("status", "--json", socket_path=d.socket).stdout)
            loader = status["loader"]
            assert status["device"] == "cuda:0"
            assert loader["dram_hits"] >= 1 and loader["bytes_h2d"] > 0 and loader["ns_h2d"] > 0
    finally:
        remove_tree(root)


def test_the_warm_up_forward_runs_on_the_nodes_device(cuda_node, monkeypatch, caplog):
    """The one-time forward at start (context, kernels) runs on cuda:0, not on the CPU."""
    import logging
    import sllmd.tiers.prepare as prepare
    devices = []
    real = prepare._warm_up
    monkeypatch.setattr(prepare, "_warm_up", lambda device="cpu": (devices.append(device), real(device)))
    caplog.set_level(logging.DEBUG, logger="sllmd.tiers.prepare")
    node = cuda_node()
    node._prepared.join(120)
    assert devices == ["cuda:0"]
    assert "warm-up forward done" in caplog.text and "warm-up failed" not in caplog.text
