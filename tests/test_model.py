"""save_model / load_model: tiny Llama, GPT-2 and OPT round trips, tied weights,
buffers, and the real SmolLM2 against transformers' own loading."""
from __future__ import annotations

import json

import pytest
import torch

from sllmd.errors import CheckpointError, CorruptCheckpointError, LoadError
from sllmd.store.format import open_checkpoint
from sllmd.store.model import build_empty_model, load_model, load_tokenizer, save_model
from sllmd.store.writer import save_state_dict


def _tensors_on(model, device_type):
    return [n for n, t in (*model.named_parameters(remove_duplicate=False),
                           *model.named_buffers(remove_duplicate=False)) if t.device.type == device_type]


def _prompt(seed=1, length=10):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 256, (2, length), generator=g)


@torch.no_grad()
def test_round_trip_gives_identical_logits_and_generation(tiny_model, tmp_path):
    save_model(tiny_model, tmp_path / "ckpt")
    loaded = load_model(tmp_path / "ckpt")
    assert type(loaded) is type(tiny_model)
    assert not loaded.training
    assert _tensors_on(loaded, "meta") == []
    x = _prompt()
    assert torch.equal(loaded(x).logits, tiny_model(x).logits)
    kwargs = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False)
    out = loaded.generate(x, **kwargs)
    assert out.shape == (2, 22)
    assert torch.equal(out, tiny_model.generate(x, **kwargs))
    assert loaded.generation_config.eos_token_id == tiny_model.generation_config.eos_token_id


def test_every_weight_and_persistent_buffer_round_trips(tiny_model, tmp_path):
    save_model(tiny_model, tmp_path / "ckpt")
    loaded = load_model(tmp_path / "ckpt")
    want, got = tiny_model.state_dict(), loaded.state_dict()
    assert want.keys() == got.keys()
    for name in want:
        assert got[name].dtype == want[name].dtype and torch.equal(got[name], want[name]), name


@pytest.mark.parametrize("kind,pair", [("gpt2", ("lm_head.weight", "transformer.wte.weight")),
                                       ("opt", ("lm_head.weight", "model.decoder.embed_tokens.weight"))])
def test_tied_weights_are_stored_once_and_tied_after_load(tiny_models, tmp_path, kind, pair):
    model = tiny_models(kind)
    save_model(model, tmp_path / "ckpt")
    ckpt = open_checkpoint(tmp_path / "ckpt")
    a, b = (ckpt.tensors[n] for n in pair)
    assert (a.partition, a.offset) == (b.partition, b.offset)
    unique = {id(p): p for p in model.parameters()}.values()
    assert ckpt.manifest.total_bytes < sum(p.numel() * p.element_size() for p in unique) + 256 * 64 + 4096
    loaded = load_model(tmp_path / "ckpt")
    head, emb = (loaded.get_parameter(n) for n in pair)
    assert head is emb
    assert head.data_ptr() == emb.data_ptr()
    with torch.no_grad():  # tied for real: a change to one is a change to the other
        emb[0, 0] += 1
    assert torch.equal(head, emb)


def test_rotary_buffers_match_a_fresh_model(tiny_models, tmp_path):
    model = tiny_models("llama")
    save_model(model, tmp_path / "ckpt")
    assert not any("inv_freq" in n for n in open_checkpoint(tmp_path / "ckpt").tensors)
    loaded = load_model(tmp_path / "ckpt")
    fresh = tiny_models("llama", seed=123)
    for name in ("model.rotary_emb.inv_freq", "model.rotary_emb.original_inv_freq"):
        got, want = loaded.get_buffer(name), fresh.get_buffer(name)
        assert got.device.type == "cpu" and got.dtype == want.dtype
        assert torch.equal(got, want)


def test_manifest_describes_the_model(tiny_models, tmp_path):
    model = tiny_models("gpt2")
    save_model(model, tmp_path / "ckpt")
    m = open_checkpoint(tmp_path / "ckpt").manifest
    assert m.model["architecture"] == "GPT2LMHeadModel"
    assert m.model["model_type"] == "gpt2"
    assert m.model["dtype"] == "float32"
    assert m.model["parameters"] == sum(p.numel() for p in model.parameters())  # the tied weight once
    assert m.model["tied_weights"] == ["lm_head.weight"]
    assert {"config.json", "generation_config.json"} <= set(m.files)
    config = json.loads((tmp_path / "ckpt" / "model" / "config.json").read_text())
    assert config["n_embd"] == 64 and config["model_type"] == "gpt2"


def test_load_with_dtype_casts_weights_but_not_rotary_tables(tiny_models, tmp_path):
    model = tiny_models("llama")
    save_model(model, tmp_path / "ckpt")
    loaded = load_model(tmp_path / "ckpt", dtype="bf16")
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert loaded.model.rotary_emb.inv_freq.dtype == torch.float32
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight.to(torch.bfloat16))
    with torch.no_grad():
        x = _prompt()
        torch.testing.assert_close(loaded(x).logits.float(), model(x).logits, atol=0.1, rtol=0.05)


def test_save_model_extra_files_and_manifest_fields(tiny_models, tmp_path):
    save_model(tiny_models("opt"), tmp_path / "ckpt", files={"NOTES.txt": b"hello"}, model={"owner": "tests"},
               partitions=2)
    ckpt = open_checkpoint(tmp_path / "ckpt")
    assert "NOTES.txt" in ckpt.manifest.files and ckpt.manifest.model["owner"] == "tests"
    assert ckpt.manifest.model["architecture"] == "OPTForCausalLM"
    assert len(ckpt.manifest.partitions) == 2
    assert (tmp_path / "ckpt" / "model" / "NOTES.txt").read_bytes() == b"hello"
    with torch.no_grad():
        x = _prompt()
        assert torch.equal(load_model(tmp_path / "ckpt")(x).logits, tiny_models("opt")(x).logits)


def test_tensors_only_checkpoint_is_refused_with_a_clear_error(tiny_models, tmp_path):
    save_state_dict(tiny_models("llama").state_dict(), tmp_path / "ckpt")
    with pytest.raises(LoadError, match="config.json"):
        load_model(tmp_path / "ckpt")


def test_missing_and_unexpected_weights_are_errors(tiny_models, tmp_path):
    model = tiny_models("llama")
    save_model(model, tmp_path / "ok")
    config = tmp_path / "ok" / "model" / "config.json"
    sd = dict(model.state_dict())
    del sd["model.layers.1.mlp.up_proj.weight"]
    save_state_dict(sd, tmp_path / "missing", files={"config.json": config})
    with pytest.raises(LoadError, match="up_proj"):
        load_model(tmp_path / "missing")
    sd = dict(model.state_dict(), **{"model.layers.7.extra.weight": torch.ones(3)})
    save_state_dict(sd, tmp_path / "extra", files={"config.json": config})
    with pytest.raises(LoadError, match="extra"):
        load_model(tmp_path / "extra")


def test_untied_head_missing_is_an_error_but_tied_one_is_not(tiny_models, tmp_path):
    gpt2 = tiny_models("gpt2")
    sd = {k: v for k, v in gpt2.state_dict().items() if k != "lm_head.weight"}
    save_model(gpt2, tmp_path / "full")
    save_state_dict(sd, tmp_path / "tied", files={"config.json": tmp_path / "full" / "model" / "config.json"})
    loaded = load_model(tmp_path / "tied")  # HF checkpoints omit tied heads
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    llama = tiny_models("llama")  # tie_word_embeddings=False: the head is a weight of its own
    save_model(llama, tmp_path / "llama")
    sd = {k: v for k, v in llama.state_dict().items() if k != "lm_head.weight"}
    save_state_dict(sd, tmp_path / "nohead", files={"config.json": tmp_path / "llama" / "model" / "config.json"})
    with pytest.raises(LoadError, match="lm_head"):
        load_model(tmp_path / "nohead")


def test_checkpoints_without_the_base_model_prefix_load(tiny_models, tmp_path):
    """Old hub GPT-2 checkpoints name "h.0.attn..." where the LM-head model has "transformer.h.0.attn..."."""
    model = tiny_models("gpt2")
    save_model(model, tmp_path / "full")
    sd = {k.removeprefix("transformer."): v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    sd["h.0.attn.bias"] = torch.ones(1, 1, 8, 8, dtype=torch.bool)  # an old causal-mask buffer: ignorable
    save_state_dict(sd, tmp_path / "bare", files={"config.json": tmp_path / "full" / "model" / "config.json"})
    loaded = load_model(tmp_path / "bare")
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    with torch.no_grad():
        x = _prompt()
        assert torch.equal(loaded(x).logits, model(x).logits)


def test_corruption_fails_the_load_unless_unverified(tiny_models, tmp_path):
    model = tiny_models("llama")
    save_model(model, tmp_path / "ckpt")
    data = tmp_path / "ckpt" / "data-00000.bin"
    raw = bytearray(data.read_bytes())
    raw[1000] ^= 0xFF
    data.write_bytes(raw)
    with pytest.raises(CorruptCheckpointError, match="data-00000.bin"):
        load_model(tmp_path / "ckpt")
    loaded = load_model(tmp_path / "ckpt", verify=False)
    assert not torch.equal(loaded.model.embed_tokens.weight, model.model.embed_tokens.weight)


def test_save_model_refuses_models_without_data(tiny_models, tmp_path):
    model = tiny_models("gpt2")
    save_model(model, tmp_path / "ckpt")
    empty = build_empty_model(tmp_path / "ckpt")
    assert _tensors_on(empty, "meta")
    with pytest.raises(CheckpointError, match="meta"):
        save_model(empty, tmp_path / "again")
    with pytest.raises(CheckpointError, match="exists"):
        save_model(model, tmp_path / "ckpt")


def test_bad_dtype_is_refused(tiny_models, tmp_path):
    save_model(tiny_models("llama"), tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match="dtype"):
        load_model(tmp_path / "ckpt", dtype="int8")


@pytest.mark.gpu
def test_load_onto_cuda_matches_cpu(tiny_models, tmp_path):
    model = tiny_models("gpt2")
    save_model(model, tmp_path / "ckpt")
    loaded = load_model(tmp_path / "ckpt", device="cuda:0")
    assert _tensors_on(loaded, "cpu") == [] and _tensors_on(loaded, "meta") == []
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    with torch.no_grad():
        x = _prompt()
        torch.testing.assert_close(loaded(x.cuda()).logits.cpu(), model(x).logits, atol=1e-4, rtol=1e-4)


# --- the real model -------------------------------------------------------------
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def smollm2(smollm2_checkpoint):
    return load_model(smollm2_checkpoint), load_tokenizer(smollm2_checkpoint)


@pytest.mark.slow
def test_smollm2_loads_fully_and_tied(smollm2):
    model, _ = smollm2
    assert type(model).__name__ == "LlamaForCausalLM"
    assert _tensors_on(model, "meta") == []
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.dtype == torch.bfloat16


@pytest.mark.slow
@torch.no_grad()
def test_smollm2_matches_transformers_loading_the_same_weights(smollm2, smollm2_hf_dir):
    from transformers import AutoModelForCausalLM

    ours, tok = smollm2
    theirs = AutoModelForCausalLM.from_pretrained(smollm2_hf_dir, dtype=torch.bfloat16).eval()
    ids = tok.apply_chat_template([{"role": "user", "content": "Name three colours."}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    assert torch.equal(ours(ids).logits, theirs(ids).logits)
    kwargs = dict(max_new_tokens=16, do_sample=False)
    assert torch.equal(ours.generate(ids, **kwargs), theirs.generate(ids, **kwargs))


@pytest.mark.slow
@torch.no_grad()
def test_smollm2_answers_with_its_chat_template(smollm2):
    model, tok = smollm2
    ids = tok.apply_chat_template(QUESTION, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=24, do_sample=False)
    answer = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer
