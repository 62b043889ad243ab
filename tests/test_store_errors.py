"""Bad checkpoints fail loudly, name what is wrong, and leak nothing."""
import hashlib
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
from sllmd.pool import ChunkPool
from sllmd.tiers.pooled import PooledCheckpoint
from sllmd.store.format import BLOCK_SIZE, manifest_sha256


@pytest.fixture
def ckpt(tmp_path):
    path = tmp_path / "c"
    store.save_state_dict({"a": torch.randn(3 << 18), "b": torch.randn(1000)}, path)  # 3 MiB + a bit
    return path


def rewrite(ckpt, manifest=None, index=None):
    """Replaces the manifest and/or the index with consistent checksums: what a buggy
    writer (not a flipped byte) would produce, so the content checks are what refuses it."""
    if index is not None:
        (ckpt / "index.json").write_text(json.dumps(index))
    manifest = manifest if manifest is not None else json.loads((ckpt / "manifest.json").read_text())
    manifest["index_sha256"] = hashlib.sha256((ckpt / "index.json").read_bytes()).hexdigest()
    manifest["manifest_sha256"] = manifest_sha256(manifest)
    (ckpt / "manifest.json").write_text(json.dumps(manifest))


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
    rewrite(ckpt, index={"tensors": {"a": {"partition": 7}}})
    with pytest.raises(CorruptCheckpointError, match="malformed index.json"):
        store.load_state_dict(ckpt)
    (ckpt / "index.json").write_bytes(b"\x00\xff not json")
    rewrite(ckpt)
    with pytest.raises(CorruptCheckpointError, match="unreadable tensor index"):
        store.load_state_dict(ckpt)


def test_tensor_outside_its_partition(ckpt):
    index = json.loads((ckpt / "index.json").read_text())
    index["tensors"]["a"]["offset"] = 1 << 30
    rewrite(ckpt, index=index)
    with pytest.raises(CorruptCheckpointError, match="outside its partition"):
        store.load_state_dict(ckpt)


def _flip_byte(path, at):
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("field", ["shape", "stride", "storage_offset", "offset"])
def test_flipped_byte_in_the_index_is_refused(ckpt, field):
    """A bit flip in any digit of a view's geometry: the index checksum names the file."""
    text = (ckpt / "index.json").read_text()
    at = text.index(f'"{field}":', text.index('"b"')) + len(field) + 3
    while not text[at].isdigit():
        at += 1
    _flip_byte(ckpt / "index.json", at)
    for open_ in (store.open_checkpoint, store.load_state_dict):
        with pytest.raises(CorruptCheckpointError, match=r"index\.json: checksum mismatch"):
            open_(ckpt)


def test_flipped_byte_in_the_manifest_is_refused(ckpt):
    text = (ckpt / "manifest.json").read_text()
    _flip_byte(ckpt / "manifest.json", text.index('"nbytes":') + 9)  # 1 digit of the partition size
    with pytest.raises(CorruptCheckpointError, match=r"manifest\.json: checksum mismatch"):
        store.open_checkpoint(ckpt)


@pytest.mark.parametrize("change, message", [
    ({"shape": [1001]}, "reaches byte 4004 of its 4000"),
    ({"shape": [500], "stride": [3]}, "reaches byte"),
    ({"storage_offset": 1}, "reaches byte 4004 of its 4000"),
    ({"stride": [1, 1]}, "1 dimensions but 2 strides"),
    ({"shape": [-1]}, "must be an integer >= 0"),
    ({"shape": [1000.0]}, "must be an integer >= 0"),
    ({"shape": "1000"}, "must be a list of integers"),
    ({"offset": True}, "must be an integer"),
    ({"nbytes": 1 << 40}, "outside its partition"),
    ({"dtype": "float99"}, "float99"),
    ({"dtype": 7}, "dtype must be a string"),
    ({"shape": [1 << 62], "stride": [0]}, "impossible shape"),
])
def test_view_outside_its_bytes_is_refused(ckpt, change, message):
    """A view's extent (storage offset, shape, stride, element size) must lie within its bytes."""
    index = json.loads((ckpt / "index.json").read_text())
    index["tensors"]["b"].update(change)
    rewrite(ckpt, index=index)
    with pytest.raises(CorruptCheckpointError, match="index.json") as info:
        store.open_checkpoint(ckpt)
    assert message in str(info.value)


@pytest.mark.parametrize("change, message", [
    ({"block_size": 0}, "block_size must be an integer >= 1"),
    ({"block_size": 1000}, "not a multiple of 4096"),
    ({"block_size": "1MiB"}, "block_size must be an integer"),
    ({"partitions": {"0": {}}}, "partitions must be a list"),
    ({"partitions": ["data-00000.bin"]}, "partition 0 is a str"),
    ({"partitions": [{"file": "../x", "nbytes": 0}]}, "plain file name"),
    ({"checksum": "md5"}, "checksum 'md5'"),
    ({"format_version": 1}, "format_version must be [major, minor]"),
    ({"format_version": ["1", "1"]}, "format_version must be an integer"),
    ({"files": "config.json"}, "files must be a list"),
    ({"model": [1]}, "model must be an object"),
    ({"block_size": None}, "block_size must be an integer"),
])
def test_malformed_manifest_is_refused(ckpt, change, message):
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest.update(change)
    rewrite(ckpt, manifest=manifest)
    with pytest.raises(CorruptCheckpointError, match="manifest.json: malformed") as info:
        store.open_checkpoint(ckpt)
    assert message in str(info.value)


def test_missing_manifest_field_is_named(ckpt):
    manifest = json.loads((ckpt / "manifest.json").read_text())
    del manifest["partitions"]
    rewrite(ckpt, manifest=manifest)
    with pytest.raises(CorruptCheckpointError, match="missing field 'partitions'"):
        store.open_checkpoint(ckpt)


def test_current_minor_requires_its_checksums(ckpt):
    manifest = json.loads((ckpt / "manifest.json").read_text())
    del manifest["manifest_sha256"]
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CorruptCheckpointError, match="must carry manifest_sha256 and index_sha256"):
        store.open_checkpoint(ckpt)


def test_format_1_0_checkpoint_without_checksums_still_opens(ckpt):
    """What sllm wrote before the checksums (format 1.0): opened, its views still checked."""
    manifest = json.loads((ckpt / "manifest.json").read_text())
    for key in ("manifest_sha256", "index_sha256"):
        del manifest[key]
    manifest["format_version"] = [1, 0]
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    assert store.load_state_dict(ckpt)["b"].shape == (1000,)
    index = json.loads((ckpt / "index.json").read_text())
    index["tensors"]["b"]["shape"] = [1001]
    (ckpt / "index.json").write_text(json.dumps(index))
    with pytest.raises(CorruptCheckpointError, match="reaches byte"):
        store.open_checkpoint(ckpt)


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
    manifest["a_field_of_1_9"] = {"x": 1}  # covered by the manifest checksum too
    rewrite(ckpt, manifest=manifest)
    assert "a" in store.load_state_dict(ckpt)
    manifest["format_version"] = [2, 0]
    rewrite(ckpt, manifest=manifest)
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
