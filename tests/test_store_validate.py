"""Import-time validation: a checkpoint is servable, or refused in one clear line."""
from __future__ import annotations

import json

import pytest

from conftest import TINY_KINDS, make_tiny_model, tiny_config
from sllmd import store
from sllmd.errors import UnservableModelError
from sllmd.store.validate import check_servable
from test_inference import tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _saved(tmp_path, tok, kind="llama", tokenizer=True, **overrides):
    model = make_tiny_model(kind, vocab_size=len(tok), **overrides)
    return store.save_model(model, tmp_path / f"{kind}-{len(list(tmp_path.iterdir()))}",
                            tokenizer=tok if tokenizer else None)


def _with_config(path, config) -> None:
    """Replaces the checkpoint's config.json (what a user's mismatched download looks like)."""
    (path / "model" / "config.json").write_text(config if isinstance(config, str) else config.to_json_string())


def _refusal(path, **kw) -> str:
    with pytest.raises(UnservableModelError) as info:
        check_servable(path, name="m", **kw)
    text = str(info.value)
    assert "\n" not in text and str(path) not in text and len(text) < 400, text
    assert text.startswith("cannot import 'm': ")
    return text


@pytest.mark.parametrize("kind", TINY_KINDS)
def test_a_whole_model_passes(tmp_path, tok, kind):
    check_servable(_saved(tmp_path, tok, kind))  # tied weights (gpt2, opt) are not "missing"


def test_smollm2_passes(smollm2_checkpoint):
    check_servable(smollm2_checkpoint)


def test_config_without_model_type(tmp_path, tok):
    path = _saved(tmp_path, tok)
    config = json.loads((path / "model" / "config.json").read_text())
    del config["model_type"]
    _with_config(path, json.dumps(config))
    assert "config.json has no model_type" in _refusal(path)


def test_config_that_is_not_json(tmp_path, tok):
    path = _saved(tmp_path, tok)
    _with_config(path, '{"model_type": "llama",')
    assert "config.json is not valid JSON" in _refusal(path)


def test_config_of_an_unknown_architecture(tmp_path, tok):
    path = _saved(tmp_path, tok)
    _with_config(path, json.dumps({"model_type": "no-such-model"}))
    assert "a no-such-model model cannot be built from its config.json" in _refusal(path)


def test_wrong_hidden_size(tmp_path, tok):
    path = _saved(tmp_path, tok)
    _with_config(path, tiny_config("llama", vocab_size=len(tok), hidden_size=32))
    text = _refusal(path)
    assert "weights do not fit its config.json" in text and "[300, 64]" in text and "[300, 32]" in text


def test_wrong_intermediate_size(tmp_path, tok):
    path = _saved(tmp_path, tok)
    _with_config(path, tiny_config("llama", vocab_size=len(tok), intermediate_size=256))
    text = _refusal(path)
    assert "mlp" in text and "[64, 128]" in text and "[64, 256]" in text


def test_more_layers_in_the_weights_than_in_the_config(tmp_path, tok):
    path = _saved(tmp_path, tok, num_hidden_layers=3)
    _with_config(path, tiny_config("llama", vocab_size=len(tok)))
    text = _refusal(path)
    assert "model.layers.2." in text and "is not in the LlamaForCausalLM" in text
    assert "the weights have 3 layers, config.json says num_hidden_layers=2" in text


def test_more_layers_in_the_config_than_in_the_weights(tmp_path, tok):
    path = _saved(tmp_path, tok)
    _with_config(path, tiny_config("llama", vocab_size=len(tok), num_hidden_layers=4))
    text = _refusal(path)
    assert "model.layers.2." in text and "which the checkpoint lacks" in text


def test_tensors_only_checkpoint(tmp_path):
    import torch
    path = store.save_state_dict({"w": torch.zeros(4)}, tmp_path / "blob")
    assert "no config.json" in _refusal(path)


def test_no_tokenizer_is_refused_unless_asked(tmp_path, tok):
    path = _saved(tmp_path, tok, tokenizer=False)
    assert "no tokenizer" in _refusal(path) and "--no-tokenizer" in _refusal(path)
    check_servable(path, tokenizer=False)


def test_broken_tokenizer_is_refused(tmp_path, tok):
    path = _saved(tmp_path, tok)
    (path / "model" / "tokenizer.json").write_text("{not json")
    assert "tokenizer cannot be loaded" in _refusal(path)
