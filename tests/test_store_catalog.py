"""The SSD store's catalog survives bad files: a broken checkpoint is one failed model,
a bad catalog.json value is ignored; and a model name follows one rule everywhere."""
from __future__ import annotations

import json

import pytest
import torch

from sllmd import names, store
from sllmd.errors import BadMessageError, InvalidNameError
from sllmd.protocol import messages
from sllmd.tiers.ssd import SsdStore, check_name
from test_store_errors import rewrite


def _store_with(tmp_path, *model_names):
    root = tmp_path / "store"
    for i, name in enumerate(model_names):
        store.save_state_dict({"w": torch.arange(1000, dtype=torch.float32) + i}, root / "models" / name)
    return root


def _opened(root) -> SsdStore:
    s = SsdStore(root)
    s.open()
    return s


BAD_MANIFESTS = {
    "block_size_0": lambda m: m.update(block_size=0),
    "partitions_not_a_list": lambda m: m.update(partitions="data-00000.bin"),
    "nbytes_a_string": lambda m: m["partitions"][0].update(nbytes="4096"),
    "no_partitions_key": lambda m: m.pop("partitions"),
}


@pytest.mark.parametrize("breakage", sorted(BAD_MANIFESTS))
def test_malformed_manifest_is_one_failed_model(tmp_path, breakage):
    root = _store_with(tmp_path, "bad", "good")
    manifest = json.loads((root / "models/bad/manifest.json").read_text())
    BAD_MANIFESTS[breakage](manifest)
    rewrite(root / "models/bad", manifest=manifest)
    s = _opened(root)
    try:
        by_name = {e.name: e for e in s.entries()}
        assert by_name["good"].error is None
        assert "manifest.json: malformed" in by_name["bad"].error
    finally:
        s.close()


def test_manifest_that_is_not_json_is_one_failed_model(tmp_path):
    root = _store_with(tmp_path, "bad", "good")
    (root / "models/bad/manifest.json").write_bytes(b'{"magic": "sllm-checkpoint", \xff')
    s = _opened(root)
    try:
        by_name = {e.name: e for e in s.entries()}
        assert by_name["good"].error is None and "unreadable manifest" in by_name["bad"].error
    finally:
        s.close()


def test_flipped_index_byte_is_one_failed_model(tmp_path):
    root = _store_with(tmp_path, "bad", "good")
    index = root / "models/bad/index.json"
    data = bytearray(index.read_bytes())
    data[data.index(b'"shape":[') + 9] ^= 0x01
    index.write_bytes(bytes(data))
    s = _opened(root)
    try:
        by_name = {e.name: e for e in s.entries()}
        assert by_name["good"].error is None and "index.json: checksum mismatch" in by_name["bad"].error
    finally:
        s.close()


def test_catalog_values_of_the_wrong_type_are_ignored(tmp_path):
    root = _store_with(tmp_path, "a", "b")
    s = _opened(root)
    s.set_pinned("b", True)
    s.touch("b", now=1234.0)
    s.close()
    catalog = json.loads((root / "catalog.json").read_text())
    catalog["models"]["a"].update(last_used="yesterday", imported_at=[1], pinned="no", source=7)
    (root / "catalog.json").write_text(json.dumps(catalog))
    s = _opened(root)
    try:
        a, b = s.entries()
        assert a.error is None and a.pinned is False and a.source is None
        assert isinstance(a.last_used, float) and a.last_used > 0  # the directory's time instead
        assert (b.pinned, b.last_used) == (True, 1234.0)  # the other model's catalog entry stands
    finally:
        s.close()
    assert json.loads((root / "catalog.json").read_text())["models"]["a"]["last_used"] == a.last_used


@pytest.mark.parametrize("catalog", ['{"models": []}', '[1, 2]', '{"models": {"a": 5}}', 'not json'])
def test_catalog_of_the_wrong_shape_starts_afresh(tmp_path, catalog):
    root = _store_with(tmp_path, "a")
    (root / "catalog.json").write_text(catalog)
    s = _opened(root)
    try:
        [a] = s.entries()
        assert a.error is None and a.pinned is False
    finally:
        s.close()


def test_a_directory_with_an_invalid_name_is_skipped(tmp_path):
    root = _store_with(tmp_path, "good", "bad\n")
    s = _opened(root)
    try:
        assert [e.name for e in s.entries()] == ["good"]
    finally:
        s.close()


@pytest.mark.parametrize("name", ["model\n", "", ".x", "a/b", "a..b", "-x", "x" * 129, "a b", "é", 5, None])
def test_one_name_rule_for_the_store_and_the_wire(name):
    assert not names.is_valid(name)
    with pytest.raises(InvalidNameError):
        check_name(name)
    with pytest.raises(BadMessageError):
        messages.Import(id=1, name=name, source="/x")


@pytest.mark.parametrize("name", ["m", "SmolLM2:135m", "a.b_c+d-e", "x" * 128, "9"])
def test_valid_names_pass_both(name):
    assert check_name(name) == name
    assert messages.Load(id=1, name=name).name == name
