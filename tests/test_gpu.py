"""CUDA paths: pinned chunks, asynchronous copies on several streams."""
import pytest
import torch

from sllmd import store
from sllmd.pool import ChunkPool
from sllmd.tiers.pooled import PooledCheckpoint

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _state_dict():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3000, 2000, generator=g)  # 24 MB: more than one chunk
    return {"w": w, "tied": w, "w_t": w.t(), "h": torch.randn(77, generator=g).half(), "s": torch.tensor(1)}


def _check(sd, got, device):
    for k, t in sd.items():
        assert got[k].device == torch.device(device)
        assert got[k].stride() == t.stride() and torch.equal(got[k].cpu(), t), k
    assert got["w"].data_ptr() == got["tied"].data_ptr()


def test_load_to_cuda(tmp_path):
    sd = _state_dict()
    store.save_state_dict(sd, tmp_path / "c", partitions=2)
    _check(sd, store.load_state_dict(tmp_path / "c", device="cuda:0"), "cuda:0")


def test_dram_tier_to_cuda(tmp_path):
    sd = _state_dict()
    store.save_state_dict(sd, tmp_path / "c")
    pool = ChunkPool(capacity_bytes=128 << 20)
    cached = PooledCheckpoint.read(store.open_checkpoint(tmp_path / "c"), pool)
    _check(sd, cached.load_state_dict("cuda:0"), "cuda:0")
    cached.release()
    assert pool.stats()["used_chunks"] == 0


def test_corrupt_checkpoint_to_cuda_fails_cleanly(tmp_path):
    sd = _state_dict()
    store.save_state_dict(sd, tmp_path / "c")
    with open(tmp_path / "c" / "data-00000.bin", "r+b") as f:
        f.seek(5 << 20)
        f.write(b"\xff\xfe")
    with pytest.raises(store.writer.CheckpointError, match="checksum mismatch"):
        store.load_state_dict(tmp_path / "c", device="cuda:0")


def test_ssd_to_dram_and_cuda_in_one_pass(tmp_path):
    from sllmd.pool import buffers
    from sllmd.store.reader import tensor_views
    sd = _state_dict()
    store.save_state_dict(sd, tmp_path / "c")
    ck = store.open_checkpoint(tmp_path / "c")
    pool = ChunkPool(capacity_bytes=128 << 20)
    bufs = [buffers.allocate(p.nbytes, torch.device("cuda:0")) for p in ck.manifest.partitions]
    cached = PooledCheckpoint.read(ck, pool, device_buffers=bufs)
    _check(sd, tensor_views(ck, bufs), "cuda:0")
    cached.release()
    assert pool.stats()["used_chunks"] == 0


def test_load_to_cuda_larger_than_the_staging_ring(tmp_path):
    from sllmd.pool import pipeline
    g = torch.Generator().manual_seed(1)
    sd = {"big": torch.randn(64 << 20, generator=g)}  # 256 MiB: more than the ring's 12 x 16 MiB
    store.save_state_dict(sd, tmp_path / "c")
    got = store.load_state_dict(tmp_path / "c", device="cuda:0")
    assert got["big"].device.type == "cuda" and torch.equal(got["big"].cpu(), sd["big"])
    staging = pipeline.staging_pool()
    assert staging.capacity_bytes == pipeline.STAGING_CHUNKS * staging.chunk_size
    assert staging.stats()["used_chunks"] == 0


def test_successive_pools_pin_and_unpin():
    from sllmd.pool import pipeline
    for _ in range(3):  # a pool left registered would make the next mapping's registration fail
        pool = ChunkPool(capacity_bytes=64 << 20)
        pool.pin_in_background().join()
        assert pool.pinned and pipeline.chunk_tensor(pool, 0).is_pinned()
        pool.close()
        assert not pool.pinned and not pipeline.chunk_tensor(pool, 0).is_pinned()
        del pool
