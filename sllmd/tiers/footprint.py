"""What a model instance needs on a CUDA device beyond its weights.

The weights are one buffer per partition; running a request also takes the KV
cache (which grows with the sequence up to the model's context) and the
activations of a prefill chunk. Both are reserved in the device budget when
the instance loads, so serving never runs the device out of memory that the
budget said was free. On a CPU host this memory comes from the process heap,
not the device arena, and is not counted here.
"""
from __future__ import annotations

import json
import logging
from typing import Any

import torch

from ..inference.decode import PREFILL_CHUNK_TOKENS
from ..store.format import Checkpoint
from ..store.model import as_dtype

log = logging.getLogger(__name__)

_KEYS = {  # what each number is called across the architectures' configs
    "layers": ("num_hidden_layers", "n_layer", "num_layers"),
    "heads": ("num_attention_heads", "n_head"),
    "kv_heads": ("num_key_value_heads", "multi_query_group_num"),
    "hidden": ("hidden_size", "n_embd", "d_model"),
    "intermediate": ("intermediate_size", "ffn_dim", "n_inner"),
    "context": ("max_position_embeddings", "n_positions", "max_sequence_length"),
    "vocab": ("vocab_size",),
}


def _get(config: dict, what: str) -> int | None:
    for key in _KEYS[what]:
        value = config.get(key)
        if isinstance(value, int) and value > 0:
            return value
    return None


def runtime_bytes(config: dict[str, Any], dtype_bytes: int, *, sequences: int = 1,
                  prefill_tokens: int = PREFILL_CHUNK_TOKENS) -> int:
    """KV cache of `sequences` full-context sequences plus one prefill chunk's
    activations (fp32, attention scores included), from a Hugging Face config;
    0 when the config lacks the shape of the model."""
    layers, heads, hidden = _get(config, "layers"), _get(config, "heads"), _get(config, "hidden")
    context = _get(config, "context")
    if not (layers and heads and hidden and context):
        return 0
    kv_heads = _get(config, "kv_heads") or heads
    head_dim = config.get("head_dim") if isinstance(config.get("head_dim"), int) else hidden // heads
    intermediate = _get(config, "intermediate") or 4 * hidden
    vocab = _get(config, "vocab") or 0
    kv = 2 * layers * kv_heads * head_dim * context * dtype_bytes * sequences
    chunk = min(prefill_tokens, context)
    activations = 4 * (chunk * (4 * hidden + 2 * intermediate) + chunk * context * heads + vocab) * sequences
    return kv + activations


def runtime_bytes_of(ckpt: Checkpoint, *, sequences: int = 1, dtype: torch.dtype | None = None) -> int:
    """runtime_bytes for a checkpoint's model, in `dtype` (default: as stored)."""
    try:
        config = json.loads((ckpt.exec_dir() / "config.json").read_text())
        dtype = dtype or as_dtype(ckpt.manifest.model.get("dtype") or config.get("torch_dtype") or "float32")
    except Exception as e:  # no usable config: the weights alone are what we know
        log.debug("no runtime estimate for %s: %s", ckpt.path, e)
        return 0
    return runtime_bytes(config, torch.empty((), dtype=dtype).element_size(), sequences=sequences)
