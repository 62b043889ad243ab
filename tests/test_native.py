"""The native core's building blocks: CRC-32C, the chunk pool, host memory."""
import os
import random

import pytest

from sllmd import _native
from sllmd.pool import ChunkPool, HostArena
from sllmd.errors import PoolExhaustedError


def _crc32c_reference(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def test_crc32c_known_vectors():
    assert _native.crc32c(b"123456789") == 0xE3069283  # RFC 3720 check value
    assert _native.crc32c(b"") == 0
    assert _native.crc32c(bytes(32)) == 0x8A9136AA  # RFC 3720 B.4: 32 bytes of zeros


@pytest.mark.parametrize("length", [1, 7, 8, 9, 255, 8191, 24575, 24576, 24577, 3 * 24576 + 13])
def test_crc32c_matches_reference_at_lane_boundaries(length):
    data = random.Random(length).randbytes(length)
    assert _native.crc32c(data) == _crc32c_reference(data)


def test_crc32c_continues_across_pieces():
    data = os.urandom(200_000)
    crc = 0
    for start in range(0, len(data), 12_345):
        crc = _native.crc32c(data[start:start + 12_345], crc)
    assert crc == _native.crc32c(data)


def test_pool_allocates_all_or_nothing_and_counts():
    pool = ChunkPool(capacity_bytes=4 << 20, chunk_size=1 << 20)
    first = pool.allocate(3)
    assert len(set(first)) == 3
    with pytest.raises(PoolExhaustedError, match="1 free chunks"):
        pool.allocate(2)
    assert pool.stats()["used_chunks"] == 3  # the failed request took nothing
    pool.release(first)
    s = pool.stats()
    assert (s["used_chunks"], s["allocations"], s["releases"], s["high_water_chunks"]) == (0, 3, 3, 3)


def test_pool_refuses_double_release():
    pool = ChunkPool(capacity_bytes=2 << 20, chunk_size=1 << 20)
    ids = pool.allocate(1)
    pool.release(ids)
    with pytest.raises(ValueError, match="not allocated"):
        pool.release(ids)


def test_pool_chunks_are_aligned_and_prefault_keeps_contents():
    pool = ChunkPool(capacity_bytes=8 << 20, chunk_size=2 << 20)
    ids = pool.allocate(4)
    assert all(pool.address(i) % 4096 == 0 for i in ids)
    import ctypes
    ctypes.memset(pool.address(ids[0]), 0x5A, 4096)
    pool.prefault()
    pool.native.wait_prefault()
    assert ctypes.string_at(pool.address(ids[0]), 4096) == b"\x5a" * 4096
    pool.release(ids)


def test_host_arena_gives_back_and_coalesces():
    arena = HostArena(8 << 20, prefault=False)
    a = _native.HostBuffer(arena.native, 3 << 20)  # rounds to 4 MiB
    b = _native.HostBuffer(arena.native, 4 << 20)
    assert arena.used == 8 << 20
    with pytest.raises(ValueError, match="no free range"):
        _native.HostBuffer(arena.native, 1)
    del a, b
    assert arena.used == 0 and arena.native.largest_free == 8 << 20
    c = _native.HostBuffer(arena.native, 8 << 20)  # only possible if the two ranges merged
    assert c.nbytes == 8 << 20
