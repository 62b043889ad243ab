"""convert(): Hugging Face directories, .safetensors files, PyTorch checkpoints
and GGUF files into checkpoints, and the errors for sources that are not."""
from __future__ import annotations

import json
import math
import struct

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from sllmd.errors import ConversionError
from sllmd.store.convert import convert
from sllmd.store.format import open_checkpoint
from sllmd.store.model import load_model, load_tokenizer
from sllmd.store.reader import load_state_dict


def _prompt():
    return torch.randint(3, 256, (2, 9), generator=torch.Generator().manual_seed(5))


@torch.no_grad()
def _same_logits(a, b):
    x = _prompt()
    return torch.equal(a(x).logits, b(x).logits)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(-1).view(torch.uint8) if t.numel() else t.reshape(-1).to(torch.uint8)


# --- Hugging Face directories and safetensors files -----------------------------------
@pytest.mark.parametrize("kind", ["llama", "gpt2", "opt"])
def test_sharded_hf_directory(tiny_models, tmp_path, kind):
    model = tiny_models(kind)
    model.save_pretrained(tmp_path / "hf", max_shard_size="100KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    convert(tmp_path / "hf", tmp_path / "ckpt")
    ckpt = open_checkpoint(tmp_path / "ckpt")
    assert {"config.json", "generation_config.json"} <= set(ckpt.manifest.files)
    assert not any(f.endswith(".index.json") for f in ckpt.manifest.files)
    info = ckpt.manifest.model
    assert info["architecture"] == type(model).__name__ and info["model_type"] == kind
    assert info["dtype"] == "float32" and info["source"]["format"] == "safetensors"
    assert len(info["source"]["files"]) > 1
    assert info["parameters"] == sum(p.numel() for p in model.parameters())
    loaded = load_model(tmp_path / "ckpt")
    assert _same_logits(loaded, model)


def test_single_safetensors_file_carries_the_config_beside_it(tiny_models, tmp_path):
    model = tiny_models("llama")
    model.save_pretrained(tmp_path / "hf")
    convert(tmp_path / "hf" / "model.safetensors", tmp_path / "ckpt")
    assert "config.json" in open_checkpoint(tmp_path / "ckpt").manifest.files
    assert _same_logits(load_model(tmp_path / "ckpt"), model)


ALL_DTYPES = [torch.bool, torch.uint8, torch.int8, torch.int16, torch.uint16, torch.int32, torch.uint32, torch.int64,
              torch.uint64, torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.float8_e4m3fn,
              torch.float8_e5m2]


def _odd_tensors(seed=0):
    """One tensor of every dtype, filled with random bytes, plus an empty one and a scalar."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i, dtype in enumerate(ALL_DTYPES):
        if dtype == torch.bool:
            t = torch.rand(11, generator=g) > 0.5
        else:
            shape = (3, 5 + i) if i % 2 else (7 * (i + 1),)
            n = math.prod(shape) * dtype.itemsize
            t = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g).view(dtype).reshape(shape)
        out[str(dtype).removeprefix("torch.")] = t
    out["empty"] = torch.empty(0, 4)
    out["scalar"] = torch.tensor(3.5)
    return out


def test_safetensors_files_without_config_keep_every_dtype_and_byte(tmp_path):
    a, b = _odd_tensors(0), {f"second.{k}": v for k, v in _odd_tensors(1).items()}
    save_file(a, tmp_path / "a.safetensors")
    save_file(b, tmp_path / "b.safetensors")
    convert([tmp_path / "a.safetensors", tmp_path / "b.safetensors"], tmp_path / "ckpt")
    ckpt = open_checkpoint(tmp_path / "ckpt")
    assert ckpt.manifest.files == [] and ckpt.manifest.model["architecture"] is None
    got = load_state_dict(tmp_path / "ckpt")
    want = {**load_file(tmp_path / "a.safetensors"), **load_file(tmp_path / "b.safetensors")}
    assert got.keys() == want.keys()
    for name, t in want.items():
        assert got[name].dtype == t.dtype and got[name].shape == t.shape, name
        assert torch.equal(_bits(got[name]), _bits(t)), name
    for e in ckpt.tensors.values():
        assert e.offset % 256 == 0


def test_dtype_casts_floating_weights_only(tmp_path):
    tensors = {"w": torch.randn(4, 4), "h": torch.randn(3).half(), "ids": torch.arange(5),
               "mask": torch.tensor([True, False]), "f8": torch.randn(4).to(torch.float8_e4m3fn)}
    save_file(tensors, tmp_path / "x.safetensors")
    convert(tmp_path / "x.safetensors", tmp_path / "ckpt", dtype="bf16")
    got = load_state_dict(tmp_path / "ckpt")
    assert got["w"].dtype == got["h"].dtype == torch.bfloat16
    assert torch.equal(got["w"], tensors["w"].bfloat16()) and torch.equal(got["h"], tensors["h"].bfloat16())
    assert torch.equal(got["ids"], tensors["ids"]) and torch.equal(got["mask"], tensors["mask"])
    assert got["f8"].dtype == torch.float8_e4m3fn
    assert open_checkpoint(tmp_path / "ckpt").manifest.model["dtype"] == "bfloat16"


def test_pytorch_checkpoint_keeps_shared_storage_once(tiny_models, tmp_path):
    model = tiny_models("gpt2")
    (tmp_path / "pt").mkdir()
    torch.save(model.state_dict(), tmp_path / "pt" / "pytorch_model.bin")
    model.config.save_pretrained(tmp_path / "pt")
    convert(tmp_path / "pt", tmp_path / "ckpt")
    ckpt = open_checkpoint(tmp_path / "ckpt")
    head, wte = ckpt.tensors["lm_head.weight"], ckpt.tensors["transformer.wte.weight"]
    assert (head.partition, head.offset) == (wte.partition, wte.offset)
    assert ckpt.manifest.model["source"]["format"] == "pytorch"
    loaded = load_model(tmp_path / "ckpt")
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    assert _same_logits(loaded, model)


def test_progress_reports_every_byte(tiny_models, tmp_path):
    tiny_models("opt").save_pretrained(tmp_path / "hf")
    calls = []
    convert(tmp_path / "hf", tmp_path / "ckpt", progress=lambda done, total: calls.append((done, total)))
    total = open_checkpoint(tmp_path / "ckpt").manifest.total_bytes
    assert calls and calls[-1] == (total, total)
    assert all(t == total for _, t in calls) and [d for d, _ in calls] == sorted(d for d, _ in calls)


def test_overwrite(tiny_models, tmp_path):
    tiny_models("llama").save_pretrained(tmp_path / "a")
    tiny_models("llama", seed=7).save_pretrained(tmp_path / "b")
    convert(tmp_path / "a", tmp_path / "ckpt")
    with pytest.raises(ConversionError, match="exists"):
        convert(tmp_path / "b", tmp_path / "ckpt")
    convert(tmp_path / "b", tmp_path / "ckpt", overwrite=True)
    assert _same_logits(load_model(tmp_path / "ckpt"), tiny_models("llama", seed=7))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "ckpt"]  # no temporary leftovers


# --- GGUF -------------------------------------------------------------------------
def _llama_cpp_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp stores q/k rows with each head's rotary halves interleaved; transformers undoes it."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
               "model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}


def write_tiny_gguf(model, path, quant=None):
    """A llama.cpp-style GGUF file of a tiny Llama (byte-level BPE vocabulary of 256 tokens)."""
    import gguf
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    c = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny llama")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    spell = bytes_to_unicode()
    tokens = [spell[b] for b in range(256)]
    tokens[255] = spell[ord(" ")] + "t"  # one merge, so the BPE model has something to merge
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([1] * 256)
    w.add_token_merges([spell[ord(" ")] + " t"])
    w.add_bos_token_id(c.bos_token_id)
    w.add_eos_token_id(c.eos_token_id)
    for name, t in model.state_dict().items():
        a = t.float().numpy()
        if name.startswith("model.layers."):
            _, _, i, *mod, _ = name.split(".")
            mod = ".".join(mod)
            if mod == "self_attn.q_proj":
                a = _llama_cpp_rows(a, c.num_attention_heads)
            elif mod == "self_attn.k_proj":
                a = _llama_cpp_rows(a, c.num_key_value_heads)
            gname = f"blk.{i}.{_GGUF_NAMES[mod]}.weight"
        else:
            gname = _GGUF_NAMES[name.removesuffix(".weight")] + ".weight"
        a = np.ascontiguousarray(a)
        if quant is not None and a.ndim == 2:
            w.add_tensor(gname, gguf.quants.quantize(a, quant), raw_dtype=quant)
        else:
            w.add_tensor(gname, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def tiny_gguf(tiny_models, tmp_path_factory):
    model = tiny_models("llama")
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf"
    write_tiny_gguf(model, path)
    return model, path


def test_gguf_float32_is_exact_and_carries_its_tokenizer(tiny_gguf, tmp_path):
    model, path = tiny_gguf
    convert(path, tmp_path / "ckpt", dtype="float32")
    ckpt = open_checkpoint(tmp_path / "ckpt")
    assert ckpt.manifest.model["source"] == {"format": "gguf", "files": ["tiny-llama.gguf"]}
    assert {"config.json", "tokenizer.json"} <= set(ckpt.manifest.files)
    config = json.loads((tmp_path / "ckpt" / "model" / "config.json").read_text())
    assert "quantization_config" not in config
    loaded = load_model(tmp_path / "ckpt")
    assert _same_logits(loaded, model)
    tok = load_tokenizer(tmp_path / "ckpt")
    assert tok("a test")["input_ids"] == [ord("a"), 255, ord("e"), ord("s"), ord("t")]


def test_gguf_defaults_to_bfloat16(tiny_gguf, tmp_path):
    model, path = tiny_gguf
    convert(path, tmp_path / "ckpt")
    sd = load_state_dict(tmp_path / "ckpt")
    assert open_checkpoint(tmp_path / "ckpt").manifest.model["dtype"] == "bfloat16"
    assert torch.equal(sd["model.layers.1.mlp.up_proj.weight"], model.model.layers[1].mlp.up_proj.weight.bfloat16())


def test_gguf_conversion_reports_each_tensor_before_writing(tiny_gguf, tmp_path):
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    _, path = tiny_gguf
    bar, reader = gguf_utils.tqdm, gguf_utils.load_gguf_checkpoint
    seen = []
    convert(path, tmp_path / "ckpt", on_phase=lambda phase, done=0, total=0, unit="": seen.append(
        (phase, done, total, unit)), progress=lambda done, total: seen.append(("bytes", done, total, "bytes")))
    phases = [s[0] for s in seen]
    counted = [s for s in seen if s[0] == "dequantizing"]
    assert counted[-1][1] == counted[-1][2] > 0 and all(s[3] == "tensors" for s in counted)
    assert [done for _, done, _, _ in counted] == sorted(done for _, done, _, _ in counted)
    assert phases.index("reading the GGUF metadata") < phases.index("reading the GGUF tensors") \
        < phases.index("dequantizing") < len(phases) - 1 - phases[::-1].index("building the model") \
        < phases.index("reading the tokenizer") < phases.index("bytes")
    assert gguf_utils.tqdm is bar and gguf_utils.load_gguf_checkpoint is reader  # the hooks are gone again


def test_quantized_gguf_is_dequantized(tiny_models, tmp_path):
    import gguf

    model = tiny_models("llama")
    write_tiny_gguf(model, tmp_path / "q8.gguf", quant=gguf.GGMLQuantizationType.Q8_0)
    convert(tmp_path / "q8.gguf", tmp_path / "ckpt", dtype=torch.float32)
    loaded = load_model(tmp_path / "ckpt")
    w, ref = loaded.model.layers[0].self_attn.q_proj.weight, model.model.layers[0].self_attn.q_proj.weight
    assert not torch.equal(w, ref)  # it was quantized...
    torch.testing.assert_close(w, ref, atol=ref.abs().max().item() / 100, rtol=0)  # ...to 8 bits


@pytest.mark.slow
def test_smollm2_gguf_conversion_matches_transformers(smollm2_checkpoint, smollm2_hf_dir):
    ckpt = open_checkpoint(smollm2_checkpoint)
    info = ckpt.manifest.model
    assert info["architecture"] == "LlamaForCausalLM" and info["dtype"] == "bfloat16"
    assert info["parameters"] == 134_515_008 and info["tied_weights"] == ["lm_head.weight"]
    assert {"config.json", "generation_config.json", "tokenizer.json", "chat_template.jinja"} <= set(ckpt.manifest.files)
    ours = load_state_dict(smollm2_checkpoint)
    theirs = load_file(smollm2_hf_dir / "model.safetensors")
    assert set(theirs) <= set(ours) and set(ours) - set(theirs) <= {"lm_head.weight"}
    for name, t in theirs.items():
        assert torch.equal(ours[name], t), name


@pytest.mark.slow
def test_smollm2_hf_directory_converts_to_the_same_tensors(smollm2_checkpoint, smollm2_hf_dir, tmp_path):
    convert(smollm2_hf_dir, tmp_path / "ckpt")
    ckpt = open_checkpoint(tmp_path / "ckpt")
    assert ckpt.manifest.model["architecture"] == "LlamaForCausalLM"
    assert {"config.json", "tokenizer.json", "chat_template.jinja"} <= set(ckpt.manifest.files)
    from_hf, from_gguf = load_state_dict(tmp_path / "ckpt"), load_state_dict(smollm2_checkpoint)
    assert set(from_hf) == set(from_gguf) - {"lm_head.weight"}  # save_pretrained drops the tied head
    assert all(torch.equal(t, from_gguf[name]) for name, t in from_hf.items())


# --- errors -------------------------------------------------------------------------
def _valid_safetensors(path):
    save_file({"a": torch.arange(64, dtype=torch.float32), "b": torch.ones(8, 8)}, path)
    return path.read_bytes()


def _header(raw: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _with_header(header: dict, data: bytes) -> bytes:
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + data


def _corrupt(kind: str, raw: bytes) -> bytes:
    header, data = _header(raw)
    if kind == "truncated":
        return raw[:-100]
    if kind == "trailing bytes":
        return raw + b"\0" * 64
    if kind == "header length":
        return struct.pack("<Q", 1 << 40) + raw[8:]
    if kind == "header json":
        return raw[:8] + b"{" + b"x" * (len(raw) - 9)
    if kind == "shape mismatch":
        header["a"]["shape"] = [65]
    elif kind == "overlap":
        header["b"]["data_offsets"] = [0, 256]
    elif kind == "unknown dtype":
        header["a"]["dtype"] = "Q4"
    elif kind == "not an object":
        return _with_header([1, 2], data)  # type: ignore[arg-type]
    return _with_header(header, data)


@pytest.mark.parametrize("kind,message", [
    ("truncated", "truncated"), ("trailing bytes", "after the last tensor"), ("header length", "header length"),
    ("header json", "header"), ("shape mismatch", "needs"), ("overlap", "overlaps"), ("unknown dtype", "Q4"),
    ("not an object", "JSON object")])
def test_corrupt_safetensors_files_are_refused(tmp_path, kind, message):
    path = tmp_path / "m.safetensors"
    path.write_bytes(_corrupt(kind, _valid_safetensors(path)))
    with pytest.raises(ConversionError, match=message) as e:
        convert(path, tmp_path / "ckpt")
    assert "m.safetensors" in str(e.value)
    assert not (tmp_path / "ckpt").exists()


def test_bad_sources_are_refused(tiny_models, tmp_path):
    with pytest.raises(ConversionError, match="no such file"):
        convert(tmp_path / "nowhere", tmp_path / "ckpt")
    (tmp_path / "notes.txt").write_text("hello, not a model\n")
    with pytest.raises(ConversionError, match="unknown format"):
        convert(tmp_path / "notes.txt", tmp_path / "ckpt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConversionError, match="no model weights"):
        convert(tmp_path / "empty", tmp_path / "ckpt")
    with pytest.raises(ConversionError, match="no source"):
        convert([], tmp_path / "ckpt")
    (tmp_path / "fake.gguf").write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 100)
    with pytest.raises(ConversionError, match="fake.gguf"):
        convert(tmp_path / "fake.gguf", tmp_path / "ckpt")
    (tmp_path / "bad.bin").write_bytes(b"PK\x03\x04" + b"\0" * 200)
    with pytest.raises(ConversionError, match="bad.bin"):
        convert(tmp_path / "bad.bin", tmp_path / "ckpt")
    save_file({"x": torch.ones(2)}, tmp_path / "x.safetensors")
    with pytest.raises(ConversionError, match="mix formats"):
        convert([tmp_path / "x.safetensors", tmp_path / "fake.gguf"], tmp_path / "ckpt")
    with pytest.raises(ConversionError, match="dtype"):
        convert(tmp_path / "x.safetensors", tmp_path / "ckpt", dtype="int4")
    assert not (tmp_path / "ckpt").exists()


def test_inconsistent_shards_are_refused(tiny_models, tmp_path):
    tiny_models("llama").save_pretrained(tmp_path / "hf", max_shard_size="100KB")
    index = tmp_path / "hf" / "model.safetensors.index.json"
    original = index.read_text()
    doc = json.loads(original)
    doc["weight_map"]["model.extra.weight"] = "model-00009-of-00009.safetensors"
    index.write_text(json.dumps(doc))
    with pytest.raises(ConversionError, match="missing"):
        convert(tmp_path / "hf", tmp_path / "ckpt")
    doc = json.loads(original)
    doc["weight_map"]["model.extra.weight"] = next(iter(doc["weight_map"].values()))
    index.write_text(json.dumps(doc))
    with pytest.raises(ConversionError, match="do not match their index"):
        convert(tmp_path / "hf", tmp_path / "ckpt")
    index.write_text("{not json")
    with pytest.raises(ConversionError, match="malformed shard index"):
        convert(tmp_path / "hf", tmp_path / "ckpt")


def test_destination_may_not_hold_the_source(tiny_models, tmp_path):
    tiny_models("gpt2").save_pretrained(tmp_path / "hf")
    with pytest.raises(ConversionError, match="holds the source"):
        convert(tmp_path / "hf" / "model.safetensors", tmp_path / "hf", overwrite=True)
    assert (tmp_path / "hf" / "model.safetensors").is_file()
