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


# --- imports: only a model that can be served ---------------------------------------------
@pytest.fixture(scope="module")
def mismatched(tmp_path_factory):
    """Checkpoints a user might try to import, each broken in one way."""
    from conftest import tiny_config
    root = tmp_path_factory.mktemp("imports")
    tok = tiny_tokenizer()
    out = {}

    def saved(name, tokenizer=tok, config=None, **overrides):
        path = store.save_model(model_for(tok, **overrides), root / name, tokenizer=tokenizer)
        if config is not None:
            (path / "model" / "config.json").write_text(config)
        out[name] = path

    saved("no_model_type", config=json.dumps({k: v for k, v in tiny_config("llama", vocab_size=len(tok))
                                              .to_dict().items() if k != "model_type"}))
    saved("wrong_hidden", config=tiny_config("llama", vocab_size=len(tok), hidden_size=32).to_json_string())
    saved("wrong_intermediate", config=tiny_config("llama", vocab_size=len(tok),
                                                   intermediate_size=96).to_json_string())
    saved("extra_layers", num_hidden_layers=3, config=tiny_config("llama", vocab_size=len(tok)).to_json_string())
    saved("no_tokenizer", tokenizer=None)
    return out


REFUSALS = {"no_model_type": "config.json has no model_type",
            "wrong_hidden": "has shape [300, 64] but the LlamaForCausalLM that config.json describes needs [300, 32]",
            "wrong_intermediate": "mlp.down_proj.weight has shape [64, 128] but the LlamaForCausalLM that config.json describes needs [64, 96]",
            "extra_layers": "the weights have 3 layers, config.json says num_hidden_layers=2",
            "no_tokenizer": "no tokenizer"}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_import_refuses_what_cannot_be_served_in_one_line(broken_store, mismatched, case):
    run = sllmctl("import", f"try-{case}", str(mismatched[case]), socket_path=broken_store.socket)
    assert run.returncode == 1, run.stderr
    errors = [ln for ln in run.stderr.splitlines() if "importing" not in ln]
    assert len(errors) == 1 and REFUSALS[case] in errors[0], run.stderr
    assert f"cannot import 'try-{case}'" in errors[0] and str(broken_store.store) not in errors[0]
    models = json.loads(sllmctl("models", "--json", socket_path=broken_store.socket).stdout)
    assert f"try-{case}" not in {m["name"] for m in models}
    assert list((broken_store.store / "staging").iterdir()) == []


def test_no_tokenizer_import_is_accepted_when_asked(broken_store, mismatched):
    run = sllmctl("import", "tokenless", str(mismatched["no_tokenizer"]), "--no-tokenizer",
                  socket_path=broken_store.socket)
    assert run.returncode == 0, run.stderr
    models = json.loads(sllmctl("models", "--json", socket_path=broken_store.socket).stdout)
    assert {m["name"]: m["state"] for m in models}["tokenless"] == "on_ssd"
    infer = sllmctl("infer", "tokenless", "hello", socket_path=broken_store.socket)
    assert infer.returncode == 1 and "has no tokenizer" in infer.stderr, infer.stderr
    assert len(infer.stderr.strip().splitlines()) == 1 and str(broken_store.store) not in infer.stderr
    # --no-tokenizer waives only the tokenizer: mismatched weights are still refused
    run = sllmctl("import", "still-bad", str(mismatched["wrong_hidden"]), "--no-tokenizer",
                  socket_path=broken_store.socket)
    assert run.returncode == 1 and "do not fit its config.json" in run.stderr


def test_a_corrupt_source_checkpoint_is_refused_naming_the_users_file(broken_store, mismatched, tmp_path):
    source = tmp_path / "flipped"
    shutil.copytree(mismatched["wrong_hidden"].parent / "no_tokenizer", source)
    _break(source, "index_byte_flipped")
    run = sllmctl("import", "flipped", str(source), "--no-tokenizer", socket_path=broken_store.socket)
    assert run.returncode == 1
    assert f"{source}/index.json: checksum mismatch" in run.stderr and str(broken_store.store) not in run.stderr
