"""Bad checkpoints fail loudly, name what is wrong, and leak nothing."""
import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from sllmd import store
from sllmd.errors import (CheckpointError, CorruptCheckpointError, NotACheckpointError,
                          TruncatedCheckpointError, UnsupportedTensorError, UnsupportedVersionError)
from sllmd.pool import ChunkPool, PooledCheckpoint
from sllmd.store.format import BLOCK_SIZE


@pytest.fixture
def ckpt(tmp_path):
    path = tmp_path / "c"
    store.save_state_dict({"a": torch.randn(3 << 18), "b": torch.randn(1000)}, path)  # 3 MiB + a bit
    return path


def _load_both_ways(path):
    """Loads directly and through the DRAM tier; returns the pool to inspect afterwards."""
    pool = ChunkPool(capacity_bytes=32 << 20, chunk_size=1 << 20)
    errors = []
    for attempt in (lambda: store.load_state_dict(path),
                    lambda: PooledCheckpoint.read(store.open_checkpoint(path), pool)):
        with pytest.raises(CheckpointError) as info:
            attempt()
        errors.append(info.value)
    assert pool.stats()["used_chunks"] == 0, "a failed load leaked chunks"
    return errors


def test_flipped_byte_names_file_and_offset(ckpt):
    data = ckpt / "data-00000.bin"
    offset = BLOCK_SIZE * 2 + 12345
    with open(data, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x01]))
    for err in _load_both_ways(ckpt):
        assert isinstance(err, CorruptCheckpointError)
        assert "data-00000.bin" in str(err) and "checksum mismatch in block 2" in str(err)
        assert f"bytes {2 * BLOCK_SIZE}-{3 * BLOCK_SIZE}" in str(err)
    # With verification off the same bytes load (the caller asked for it).
    assert store.load_state_dict(ckpt, verify=False)["b"].shape == (1000,)


def test_truncated_data_file(ckpt):
    data = ckpt / "data-00000.bin"
    os.truncate(data, data.stat().st_size - 4096)
    for err in _load_both_ways(ckpt):
        assert isinstance(err, TruncatedCheckpointError)
        assert "data-00000.bin" in str(err) and "truncated" in str(err)


def test_missing_data_file(ckpt):
    (ckpt / "data-00000.bin").unlink()
    for err in _load_both_ways(ckpt):
        assert "data-00000.bin" in str(err) and "cannot open" in str(err)


def test_missing_index(ckpt):
    (ckpt / "index.json").unlink()
    with pytest.raises(CorruptCheckpointError, match="index.json is missing"):
        store.load_state_dict(ckpt)


def test_garbage_index(ckpt):
    (ckpt / "index.json").write_text('{"tensors": {"a": {"partition": 7}}}')
    with pytest.raises(CorruptCheckpointError, match="malformed index.json"):
        store.load_state_dict(ckpt)
    (ckpt / "index.json").write_bytes(b"\x00\xff not json")
    with pytest.raises(CorruptCheckpointError, match="unreadable tensor index"):
        store.load_state_dict(ckpt)


def test_tensor_outside_its_partition(ckpt):
    index = json.loads((ckpt / "index.json").read_text())
    index["tensors"]["a"]["offset"] = 1 << 30
    (ckpt / "index.json").write_text(json.dumps(index))
    with pytest.raises(CorruptCheckpointError, match="outside its partition"):
        store.load_state_dict(ckpt)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(NotACheckpointError, match="no manifest.json"):
        store.load_state_dict(tmp_path)
    (tmp_path / "manifest.json").write_text('{"magic": "something else"}')
    with pytest.raises(NotACheckpointError, match="lacks the magic"):
        store.load_state_dict(tmp_path)
    with pytest.raises(NotACheckpointError, match="not a directory"):
        store.load_state_dict(tmp_path / "manifest.json")


def test_newer_major_version_is_refused_newer_minor_is_read(ckpt):
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["format_version"] = [1, 9]
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    assert "a" in store.load_state_dict(ckpt)
    manifest["format_version"] = [2, 0]
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UnsupportedVersionError, match="version 2.0 is not supported"):
        store.load_state_dict(ckpt)


def test_save_refuses_what_it_cannot_store(tmp_path):
    with pytest.raises(UnsupportedTensorError, match="meta"):
        store.save_state_dict({"m": torch.empty(3, device="meta")}, tmp_path / "m")
    with pytest.raises(UnsupportedTensorError, match="not a tensor"):
        store.save_state_dict({"x": [1, 2]}, tmp_path / "x")
    assert not any(tmp_path.iterdir()), "a failed save left files behind"


def test_save_does_not_clobber_unless_asked(ckpt):
    with pytest.raises(CheckpointError, match="already exists"):
        store.save_state_dict({"z": torch.zeros(1)}, ckpt)
    assert "a" in store.load_state_dict(ckpt)
    store.save_state_dict({"z": torch.zeros(1)}, ckpt, overwrite=True)
    assert set(store.load_state_dict(ckpt)) == {"z"}


def test_kill_during_save_leaves_no_checkpoint(tmp_path):
    target = tmp_path / "c"
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time, torch
        from sllmd import store
        def progress(done, total):
            print("writing", flush=True)
            time.sleep(0.05)
        sd = {{f"t{{i}}": torch.randn(1 << 18) for i in range(64)}}
        store.save_state_dict(sd, {str(target)!r}, progress=progress)
        print("finished", flush=True)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "writing"
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait(30)
    assert not target.exists()
    leftovers = list(tmp_path.iterdir())
    assert all(p.name.startswith(".c.tmp-") for p in leftovers)
    for p in leftovers:
        with pytest.raises(NotACheckpointError):
            store.open_checkpoint(p)
