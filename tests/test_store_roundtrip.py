"""Bit-exact round trips through the checkpoint format and the loader."""
import pytest
import torch

from sllmd import store
from sllmd.pool import ChunkPool, HostArena, LoadOptions
from sllmd.tiers.pooled import PooledCheckpoint
from sllmd.store.format import FILE_ALIGN, TENSOR_ALIGN


def _as_bytes(t: torch.Tensor) -> bytes:
    """The bytes a tensor's elements occupy, in logical order (works for every dtype)."""
    flat = t.contiguous().reshape(-1)
    return bytes(torch.empty(0, dtype=torch.uint8).set_(flat.untyped_storage(), flat.storage_offset()
                                                        * flat.element_size(), (flat.numel() * flat.element_size(),))
                 .numpy()) if flat.numel() else b""


def assert_same(expected: dict, got: dict) -> None:
    assert set(got) == set(expected)
    for name, t in expected.items():
        g = got[name]
        assert (g.dtype, g.shape, g.stride(), g.device.type) == (t.dtype, t.shape, t.stride(), "cpu"), name
        assert _as_bytes(g) == _as_bytes(t), name


def _all_dtypes():
    seen = []
    for name in dir(torch):
        d = getattr(torch, name)
        if isinstance(d, torch.dtype) and d not in seen:
            seen.append(d)
    return seen


def _random_tensor(dtype, n=37):
    try:
        t = torch.empty(n, dtype=dtype)
        raw = torch.empty(0, dtype=torch.uint8).set_(t.untyped_storage())
    except (RuntimeError, TypeError, NotImplementedError) as e:
        pytest.skip(f"torch cannot create {dtype} tensors: {e}")
    raw.copy_(torch.randint(0, 256, raw.shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(1)))
    if dtype == torch.bool:
        raw.clamp_(0, 1)  # any other byte is not a valid bool
    return t


@pytest.mark.parametrize("dtype", _all_dtypes(), ids=str)
def test_every_dtype_round_trips(tmp_path, dtype):
    if dtype in (torch.qint8, torch.quint8, torch.qint32, torch.quint4x2, torch.quint2x4):
        with pytest.raises(store.writer.UnsupportedTensorError, match="quantized"):
            store.save_state_dict({"q": torch.quantize_per_tensor(torch.ones(3), 0.1, 0, dtype)}, tmp_path / "c")
        return
    sd = {"x": _random_tensor(dtype), "scalar": _random_tensor(dtype, 1).reshape(())}
    store.save_state_dict(sd, tmp_path / "c")
    assert_same(sd, store.load_state_dict(tmp_path / "c"))


def test_shapes_strides_and_sharing(tmp_path):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 48, generator=g)
    base = torch.randn(1000, generator=g)
    sd = {
        "w": w, "w_t": w.t(), "w_slice": w[3:9, ::3], "tied": w,
        "zero_d": torch.tensor(2.5), "empty": torch.empty(0, 7), "empty_view": w[5:5],
        "overlapping": base.as_strided((10, 10), (1, 1), 17),  # rows overlap in memory
        "as_int": base.view(torch.int32)[100:200],  # another dtype viewing the same bytes
        "expanded": torch.arange(5.0).expand(4, 5),  # stride 0
    }
    store.save_state_dict(sd, tmp_path / "c")
    got = store.load_state_dict(tmp_path / "c")
    assert_same(sd, got)
    assert got["w"].data_ptr() == got["tied"].data_ptr() == got["w_t"].data_ptr()
    got["w"][0, 0] = 123.0  # views share memory, as the originals did
    assert got["tied"][0, 0] == 123.0 and got["w_t"][0, 0] == 123.0
    ck = store.open_checkpoint(tmp_path / "c")
    assert ck.tensors["w"].offset == ck.tensors["tied"].offset
    # The partial slice of `base` is stored once, not once per view.
    assert ck.manifest.total_bytes < 2 * (64 * 48 * 4 + 1000 * 4) + 3 * FILE_ALIGN


def test_layout_rules(tmp_path):
    sd = {f"t{i}": torch.randn(i + 1) for i in range(50)}
    store.save_state_dict(sd, tmp_path / "c", partitions=3)
    ck = store.open_checkpoint(tmp_path / "c")
    assert len(ck.manifest.partitions) == 3
    for p in ck.manifest.partitions:
        assert p.nbytes % FILE_ALIGN == 0
        assert (tmp_path / "c" / p.file).stat().st_size == p.nbytes
    assert all(e.offset % TENSOR_ALIGN == 0 for e in ck.tensors.values())


@pytest.mark.parametrize("checksums", [True, False])
def test_large_many_and_partitioned(tmp_path, checksums):
    g = torch.Generator().manual_seed(3)
    sd = {"big": torch.randn(40 << 18, generator=g)}  # 40 MiB: spans several chunks and requests
    sd.update({f"small.{i}": torch.randn(i % 7 + 1, generator=g).to(torch.float16) for i in range(3000)})
    plan = {name: (0 if name == "big" else 1 + hash(name) % 2) for name in sd}
    store.save_state_dict(sd, tmp_path / "c", partitions=plan, checksums=checksums)
    ck = store.open_checkpoint(tmp_path / "c")
    assert len(ck.manifest.partitions) == 3 and bool(ck.manifest.checksum) == checksums
    assert_same(sd, store.load_state_dict(tmp_path / "c"))
    assert_same(sd, store.load_state_dict(tmp_path / "c", options=LoadOptions(readers=1, direct=False)))


def test_dram_tier_round_trip_and_release(tmp_path):
    sd = {"a": torch.randn(3 << 20), "b": torch.arange(1000, dtype=torch.int64)}
    store.save_state_dict(sd, tmp_path / "c", partitions=2)
    pool = ChunkPool(capacity_bytes=64 << 20, chunk_size=4 << 20)
    arena = HostArena(64 << 20)
    cached = PooledCheckpoint.read(store.open_checkpoint(tmp_path / "c"), pool)
    assert pool.stats()["used_chunks"] == cached.chunk_count == 4  # 12 MiB -> 3 chunks, + 1
    assert_same(sd, cached.load_state_dict())
    got = cached.load_state_dict(arena=arena)
    assert_same(sd, got)
    assert arena.used > 0
    del got
    assert arena.used == 0  # buffers go back to the arena with their last view
    cached.release()
    cached.release()  # idempotent
    assert pool.stats()["used_chunks"] == 0


def test_ssd_to_dram_and_device_in_one_pass(tmp_path):
    sd = {"a": torch.randn(5 << 20)}
    store.save_state_dict(sd, tmp_path / "c")
    ck = store.open_checkpoint(tmp_path / "c")
    pool = ChunkPool(capacity_bytes=64 << 20, chunk_size=2 << 20)
    from sllmd.pool import buffers
    bufs = [buffers.allocate(p.nbytes, torch.device("cpu")) for p in ck.manifest.partitions]
    cached = PooledCheckpoint.read(ck, pool, device_buffers=bufs)
    assert_same(sd, store.reader.tensor_views(ck, bufs))
    assert_same(sd, cached.load_state_dict())
    cached.release()


def test_tmpfs_falls_back_to_buffered_reads(tmp_path_factory):
    import os
    import tempfile
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm")
    with tempfile.TemporaryDirectory(dir="/dev/shm") as d:
        sd = {"a": torch.randn(1 << 20)}
        store.save_state_dict(sd, f"{d}/c")
        assert_same(sd, store.load_state_dict(f"{d}/c"))
