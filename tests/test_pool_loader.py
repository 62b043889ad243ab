"""The native load pipeline: O_DIRECT reads, per-file fallback, counters under
concurrent loads, the staging ring, and errors from any C++ thread."""
import ctypes
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

from sllmd import _native, store
from sllmd.errors import LoadError
from sllmd.pool import ChunkPool, LoadOptions, buffers, counters, pipeline
from sllmd.tiers.pooled import PooledCheckpoint

REPO = Path(__file__).resolve().parent.parent
MiB = 1 << 20


def _direct_io_works(directory: Path) -> bool:
    probe = directory / "probe"
    probe.write_bytes(b"\0" * 4096)
    buf = buffers.allocate(4096, torch.device("cpu"))
    try:
        fd = os.open(probe, os.O_RDONLY | os.O_DIRECT)
    except OSError:
        return False
    try:
        return os.preadv(fd, [memoryview(buf.numpy())], 0) == 4096
    except OSError:
        return False
    finally:
        os.close(fd)
        probe.unlink()


@pytest.fixture
def disk_dir():
    """A directory on the repository's filesystem (/tmp may be tmpfs); skipped where it refuses O_DIRECT."""
    (REPO / ".cache").mkdir(exist_ok=True)
    d = Path(tempfile.mkdtemp(prefix="test-direct-", dir=REPO / ".cache"))
    try:
        if not _direct_io_works(d):
            pytest.skip(f"the filesystem of {d} refuses O_DIRECT reads")
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _write(path: Path, nbytes: int, seed: int) -> bytes:
    data = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    raw = data.numpy().tobytes()
    path.write_bytes(raw)
    return raw


def _evict(path: Path) -> None:
    """Drops the file's pages from the page cache (no root needed: its own clean pages)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _job_to_buffer(path: Path, nbytes: int, crc: bool = True):
    buf = buffers.allocate(nbytes, torch.device("cpu"))
    crcs = _native.block_crcs(_host_copy(path), nbytes, MiB) if crc else []
    return pipeline.file_job(os.fspath(path), nbytes, MiB, crcs, dest=buf.data_ptr()), buf


def _host_copy(path: Path) -> int:
    data = path.read_bytes()
    keep = ctypes.create_string_buffer(data, len(data))
    _host_copy.keep.append(keep)
    return ctypes.addressof(keep)


_host_copy.keep = []


def _bytes(buf: torch.Tensor) -> bytes:
    return buf.numpy().tobytes()


def _delta(before: dict, after: dict) -> dict:
    return {k: after[k] - before[k] for k in before if isinstance(before[k], int)}


# --- O_DIRECT -------------------------------------------------------------------------------------
def test_evicted_file_is_read_with_o_direct_and_a_cached_one_from_the_page_cache(disk_dir):
    path = disk_dir / "data.bin"
    raw = _write(path, 8 * MiB, seed=1)
    job, buf = _job_to_buffer(path, len(raw))
    _evict(path)
    before = counters()
    stats = pipeline.run([job], options=LoadOptions(readers=2, io_size=MiB))
    d = _delta(before, counters())
    assert _bytes(buf) == raw
    assert stats["bytes_direct"] > 0 and stats["used_direct"]
    assert stats["bytes_direct"] + stats["bytes_cached"] == len(raw)
    assert d["bytes_direct"] == stats["bytes_direct"] and d["bytes_read"] == len(raw)

    path.read_bytes()  # now every page is cached: the next load copies from the page cache
    job, buf = _job_to_buffer(path, len(raw))
    stats = pipeline.run([job], options=LoadOptions(readers=2, io_size=MiB))
    assert _bytes(buf) == raw
    assert (stats["bytes_direct"], stats["bytes_cached"]) == (0, len(raw))


def test_a_refusing_file_falls_back_alone_and_the_others_stay_direct(disk_dir):
    a, b = disk_dir / "a.bin", disk_dir / "b.bin"
    raw_a, raw_b = _write(a, 4 * MiB, seed=2), _write(b, 4 * MiB, seed=3)
    (ja, ba), (jb, bb) = _job_to_buffer(a, len(raw_a)), _job_to_buffer(b, len(raw_b))
    _evict(a)
    _evict(b)
    # Job 0's filesystem "refuses" O_DIRECT (EINVAL on an aligned request, as tmpfs did before Linux 6.6).
    stats = pipeline.run([ja, jb], options=LoadOptions(readers=1, io_size=MiB, debug_refuse_direct_job=0))
    assert _bytes(ba) == raw_a and _bytes(bb) == raw_b
    assert stats["files_direct_refused"] == 1
    assert stats["bytes_cached"] >= len(raw_a)  # every byte of a, buffered
    assert stats["bytes_direct"] > 0  # b kept reading direct after a's refusal


def test_an_unaligned_tail_is_read_buffered_without_turning_direct_off(disk_dir):
    a, b = disk_dir / "short.bin", disk_dir / "long.bin"
    raw_a = _write(a, 2 * MiB + 5000, seed=4)  # its last unit: 4096 bytes direct, then 904 buffered
    raw_b = _write(b, 5 * MiB, seed=5)
    (ja, ba), (jb, bb) = _job_to_buffer(a, len(raw_a)), _job_to_buffer(b, len(raw_b))
    _evict(a)
    _evict(b)
    # One reader, files interleaved: a's tail (unit 2) comes before b's units 3 and 4.
    stats = pipeline.run([ja, jb], options=LoadOptions(readers=1, io_size=MiB))
    assert _bytes(ba) == raw_a and _bytes(bb) == raw_b
    assert stats["bytes_cached"] == 904
    assert stats["bytes_direct"] == len(raw_a) + len(raw_b) - 904
    assert stats["files_direct_refused"] == 0


# --- counters -------------------------------------------------------------------------------------
def test_counters_under_two_concurrent_loads(disk_dir):
    """The union of two overlapping loads' time is less than their sum, and the bytes add up exactly."""
    a, b = disk_dir / "a.bin", disk_dir / "b.bin"
    raw_a, raw_b = _write(a, 4 * MiB, seed=6), _write(b, 3 * MiB, seed=7)
    pool = ChunkPool(capacity_bytes=MiB, chunk_size=MiB)
    ring = pool.allocate(1)
    jb, bb = _job_to_buffer(b, len(raw_b))
    before = counters()
    # Load A holds a one-chunk staging ring: after its first unit it waits for us
    # to recycle the chunk, so load B runs from start to end inside A's interval.
    task_a = _native.LoadTask([pipeline.file_job(os.fspath(a), len(raw_a), MiB, [])], pool.native,
                              LoadOptions(readers=2).native(notify=True), ring)
    first = task_a.next_completed(30.0)
    assert first is not None and first[0] == 0
    stats_b = pipeline.run([jb], options=LoadOptions(readers=2, io_size=MiB))
    got_a = bytearray(len(raw_a))
    item = first
    while item is not None and item[0] >= 0:
        off = item[1] * MiB
        n = min(MiB, len(raw_a) - off)
        got_a[off:off + n] = ctypes.string_at(pool.address(item[2]), n)
        task_a.recycle(item[2])
        item = task_a.next_completed(30.0)
    assert task_a.wait()
    stats_a = task_a.stats()
    d = _delta(before, counters())

    assert bytes(got_a) == raw_a and _bytes(bb) == raw_b
    assert d["loads"] == 2
    assert d["bytes_read"] == len(raw_a) + len(raw_b) == d["bytes_direct"] + d["bytes_cached"]
    assert d["ns_load_sum"] == stats_a["ns_wall"] + stats_b["ns_wall"]
    assert max(stats_a["ns_wall"], stats_b["ns_wall"]) <= d["ns_load_wall"] < d["ns_load_sum"]
    assert 0 < d["ns_read"] <= d["ns_load_wall"]
    bw = counters()["bandwidth_bytes_per_s"]
    assert bw["read"] and bw["load"]
    pool.release(ring)


def test_dram_hits_and_copies_are_counted(tmp_path):
    sd = {"w": torch.randn(1000, 1000), "b": torch.arange(77)}
    store.save_state_dict(sd, tmp_path / "c")
    ckpt = store.open_checkpoint(tmp_path / "c")
    pool = ChunkPool(capacity_bytes=16 * MiB, chunk_size=MiB)
    cached = PooledCheckpoint.read(ckpt, pool)
    before = counters()
    got = cached.load_state_dict()
    d = _delta(before, counters())
    assert torch.equal(got["w"], sd["w"]) and torch.equal(got["b"], sd["b"])
    assert d["dram_hits"] == 1 and d["bytes_dram"] == ckpt.manifest.total_bytes
    assert d["bytes_read"] == 0 and d["loads"] == 0  # no disk
    assert d["bytes_copied"] == ckpt.manifest.total_bytes and d["ns_copy"] > 0
    cached.release()


# --- the staging ring -----------------------------------------------------------------------------
def test_a_staging_ring_smaller_than_the_file_streams_it_through(tmp_path):
    path = tmp_path / "big.bin"
    raw = _write(path, 10 * MiB + 4096, seed=8)
    crcs = _native.block_crcs(_host_copy(path), len(raw), MiB)
    pool = ChunkPool(capacity_bytes=3 * MiB, chunk_size=MiB)
    ring = pool.allocate(2)
    out = buffers.allocate(len(raw), torch.device("cpu"))
    job = pipeline.file_job(os.fspath(path), len(raw), MiB, crcs)
    stats = pipeline.run_to_cuda([job], pool, [out], LoadOptions(readers=4), ring=ring)
    assert _bytes(out) == raw
    assert stats["bytes_verified"] == len(raw)
    assert pool.stats()["allocations"] == 2  # the ring was all the host memory the load used
    pool.release(ring)


def test_a_ring_chunk_of_another_pool_is_refused(tmp_path):
    pool = ChunkPool(capacity_bytes=2 * MiB, chunk_size=MiB)
    job = pipeline.file_job(os.fspath(tmp_path / "x"), 0, MiB, [])
    with pytest.raises(IndexError):
        _native.LoadTask([job], pool.native, LoadOptions().native(notify=True), [7])


# --- errors ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("foreign", [False, True], ids=["std-exception", "foreign-exception"])
@pytest.mark.parametrize("stage", ["reader", "copier", "prefaulter", "runner"])
def test_an_exception_in_any_loader_thread_becomes_a_load_error(tmp_path, stage, foreign):
    path = tmp_path / "data.bin"
    raw = _write(path, 4 * MiB, seed=9)
    pool = ChunkPool(capacity_bytes=4 * MiB, chunk_size=MiB)
    chunks = pool.allocate(4)
    dest = buffers.allocate(len(raw), torch.device("cpu"))
    # chunks + dest: reader, copy stage and prefaulter all run
    job = pipeline.file_job(os.fspath(path), len(raw), MiB, [], dest=dest.data_ptr(), chunks=chunks)
    failures = counters()["failures"]
    with pytest.raises(LoadError, match=f"the loader's {stage} thread failed"):
        pipeline.run([job], pool, LoadOptions(readers=2, debug_throw=stage, debug_throw_foreign=foreign))
    assert counters()["failures"] == failures + 1
    # the process, the pool and the pipeline carry on
    pipeline.run([job], pool, LoadOptions(readers=2))
    assert _bytes(dest) == raw
    pool.release(chunks)


def test_a_bad_chunk_id_in_a_dram_copy_is_an_error_not_a_crash():
    pool = ChunkPool(capacity_bytes=4 * MiB, chunk_size=MiB)
    dest = buffers.allocate(2 * MiB, torch.device("cpu"))
    with pytest.raises(IndexError):
        pool.native.copy_out([0, 99], 2 * MiB, dest.data_ptr(), 2)


def test_pool_close_is_idempotent_and_pinning_needs_cuda():
    pool = ChunkPool(capacity_bytes=4 * MiB, chunk_size=MiB)
    pool.prefault()
    if not torch.cuda.is_available():
        assert pool.pin() is False and not pool.pinned
    pool.close()
    pool.close()
    assert pool.pin() is False  # closed: never pinned again
    ids = pool.allocate(2)  # the memory itself stays usable until the pool goes away
    pool.release(ids)


# --- the device budget on CUDA ----------------------------------------------------------------------
def test_the_cuda_budget_counts_the_kv_cache_and_activations(tmp_path):
    from conftest import make_tiny_model
    from sllmd.tiers import footprint
    from sllmd.tiers.loader import device_bytes
    model = make_tiny_model("llama", seed=0, max_position_embeddings=4096)
    store.save_model(model, tmp_path / "m")
    ckpt = store.open_checkpoint(tmp_path / "m")
    weights = sum(p.nbytes for p in ckpt.manifest.partitions)
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * 4096 * model.dtype.itemsize
    extra = device_bytes(ckpt, "cuda:0", None) - weights
    assert extra == footprint.runtime_bytes_of(ckpt) and extra > kv  # KV plus a prefill chunk's activations
    assert device_bytes(ckpt, "cpu", None) == weights  # on a CPU host that memory is the heap's, not the arena's
    assert footprint.runtime_bytes({"vocab_size": 10}, 2) == 0  # no shape: nothing known to reserve


def test_staged_loads_take_a_bounded_ring_and_always_give_it_back(tmp_path):
    path = tmp_path / "data.bin"
    raw = _write(path, 40 * MiB, seed=10)
    crcs = _native.block_crcs(_host_copy(path), len(raw), MiB)
    staging = pipeline.staging_pool()
    out = buffers.allocate(len(raw), torch.device("cpu"))
    job = pipeline.file_job(os.fspath(path), len(raw), MiB, crcs)
    allocs = staging.stats()["allocations"]
    pipeline.run_to_cuda_staged([job], [out])
    assert _bytes(out) == raw
    assert staging.stats()["allocations"] - allocs == 3  # a 40 MiB file needs no more than 3 chunks of 16 MiB
    assert staging.stats()["used_chunks"] == 0
    with pytest.raises(LoadError, match="reader thread failed"):  # a failed load gives its ring back too
        pipeline.run_to_cuda_staged([job], [out], LoadOptions(debug_throw="reader"))
    assert staging.stats()["used_chunks"] == 0
    held = staging.allocate(pipeline.STAGING_CHUNKS - 1)  # concurrent loads hold the shared ring
    try:
        out2 = buffers.allocate(len(raw), torch.device("cpu"))
        allocs = staging.stats()["allocations"]
        pipeline.run_to_cuda_staged([job], [out2])  # one free chunk is too few: a private ring of the same size
        assert _bytes(out2) == raw
        assert staging.stats()["allocations"] == allocs
        assert staging.stats()["used_chunks"] == pipeline.STAGING_CHUNKS - 1
    finally:
        staging.release(held)


def test_the_pool_package_does_not_import_the_store_or_the_tiers():
    """sllmd.store builds on sllmd.pool; the reverse import made a cycle (now sllmd.tiers.pooled)."""
    import ast
    import sllmd.pool
    for path in Path(sllmd.pool.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                target = "." * node.level + (node.module or "")
                assert not target.lstrip(".").startswith(("store", "tiers")) and \
                    not target.startswith(("sllmd.store", "sllmd.tiers")), f"{path.name} imports {target}"
