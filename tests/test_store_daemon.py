"""A real sllmd on a store holding broken checkpoints and a bad catalog.json: it starts,
lists each broken model as `failed` with its reason, and serves the good one."""
from __future__ import annotations

import json
import shutil

import pytest

from daemon_helpers import DaemonProcess, remove_tree, short_tempdir, sllmctl
from sllmd import store
from test_inference import model_for, tiny_tokenizer
from test_store_errors import rewrite


def _break(path, how: str) -> None:
    manifest = json.loads((path / "manifest.json").read_text())
    if how == "block_size_0":
        manifest["block_size"] = 0
        rewrite(path, manifest=manifest)
    elif how == "manifest_not_json":
        (path / "manifest.json").write_text('{"magic": "sllm-checkpoint", "format_version": [1,')
    elif how == "partitions_wrong_type":
        manifest["partitions"] = {"0": manifest["partitions"][0]}
        rewrite(path, manifest=manifest)
    elif how == "index_byte_flipped":
        data = bytearray((path / "index.json").read_bytes())
        data[data.index(b'"shape":[') + 9] ^= 0x01
        (path / "index.json").write_bytes(bytes(data))
    elif how == "index_missing_key":
        index = json.loads((path / "index.json").read_text())
        del next(iter(index["tensors"].values()))["stride"]
        rewrite(path, index=index)


BROKEN = {"block_size_0": "block_size must be an integer >= 1",
          "manifest_not_json": "unreadable manifest",
          "partitions_wrong_type": "partitions must be a list",
          "index_byte_flipped": "index.json: checksum mismatch",
          "index_missing_key": "missing field 'stride'"}


@pytest.fixture(scope="module")
def broken_store():
    root = short_tempdir()
    models = root / "store" / "models"
    tok = tiny_tokenizer()
    store.save_model(model_for(tok), models / "good", tokenizer=tok)
    for how in BROKEN:
        shutil.copytree(models / "good", models / how)
        _break(models / how, how)
    catalog = {"version": 1, "models": {
        "good": {"pinned": "yes", "last_used": "yesterday", "imported_at": None, "source": 3},
        "block_size_0": {"last_used": [], "pinned": True}}}
    (root / "store" / "catalog.json").write_text(json.dumps(catalog))
    daemon = DaemonProcess(root).start()
    yield daemon
    daemon.close()
    remove_tree(root)


def test_daemon_starts_and_lists_broken_models_as_failed(broken_store):
    run = sllmctl("models", "--json", socket_path=broken_store.socket)
    assert run.returncode == 0, run.stderr
    by_name = {m["name"]: m for m in json.loads(run.stdout)}
    assert set(by_name) == {"good", *BROKEN}
    assert by_name["good"]["state"] == "on_ssd" and by_name["good"]["error"] is None
    assert by_name["good"]["pinned"] is False  # "yes" is not a bool: ignored, not truthy
    for how, reason in BROKEN.items():
        assert by_name[how]["state"] == "failed", how
        assert reason in by_name[how]["error"], (how, by_name[how]["error"])
    assert by_name["block_size_0"]["pinned"] is True


def test_the_good_model_is_served_and_a_broken_one_refused_in_one_line(broken_store):
    good = sllmctl("infer", "good", "hello", "--max-tokens", "3", socket_path=broken_store.socket)
    assert good.returncode == 0, good.stderr + broken_store.log()
    bad = sllmctl("infer", "block_size_0", "hello", "--max-tokens", "3", socket_path=broken_store.socket)
    assert bad.returncode == 1
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and "block_size" in lines[0], bad.stderr
    assert broken_store.proc.poll() is None  # still running
