"""The running batch's KV cache: one transformers DynamicCache whose rows are
requests, left-padded to a common length (DESIGN.md section 7).

A request is prefilled alone into its own cache (B = 1, chunked, exactly as a
request served alone), then `add`ed as a new row: the batch's keys/values and
the newcomer's are left-padded with zeros to the longer of the two and
concatenated along the batch dimension. A finished or cancelled request is
`remove`d at once (its row dropped; leading columns that are padding in every
remaining row are cut). `decode` feeds one token per row through the model with
an attention mask that hides each row's padding and position ids that are each
row's own length, so every row computes what it would alone.

Shapes: B rows, L = padded length (`width`), H kv heads, D head dim, V vocab.
Only full-attention DynamicLayers can be re-padded; `supported(model)` says
whether a model's cache is made of them (a sliding-window or quantized cache is
not: such a model is served one request at a time).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from .decode import _cache_kwarg_of, new_cache


def supported(model) -> bool:
    """True when the model's DynamicCache layers are plain full-attention layers."""
    try:
        cache = new_cache(model)
    except Exception:
        return False
    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)


def kv_bytes_per_token(model) -> int:
    """Bytes one token takes in the KV cache (keys and values, every layer), from the config."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    layers = int(getattr(cfg, "num_hidden_layers"))
    heads = int(getattr(cfg, "num_attention_heads"))
    kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
    itemsize = torch.empty((), dtype=model.dtype).element_size()
    return 2 * layers * kv_heads * head_dim * itemsize


def _left_pad(t: torch.Tensor, width: int) -> torch.Tensor:
    """[B, H, n, D] -> [B, H, width, D], zeros on the left."""
    n = t.shape[-2]
    return t if n == width else F.pad(t, (0, 0, width - n, 0))


class BatchKV:
    """The batch's cache and each row's real length (tokens in the cache)."""

    def __init__(self, model):
        self.model = model
        self.cache: DynamicCache | None = None
        self.lengths: list[int] = []

    @property
    def size(self) -> int:
        return len(self.lengths)

    @property
    def width(self) -> int:
        return max(self.lengths, default=0)

    def _layers(self) -> list[DynamicLayer]:
        return [layer for layer in self.cache.layers if layer.is_initialized and layer.keys is not None]

    def add(self, cache: DynamicCache, length: int) -> int:
        """Appends a request prefilled alone (its own B = 1 cache of `length` tokens) as the
        last row; returns its row index. The request's cache is taken over."""
        if self.cache is None or not self.lengths:
            self.cache, self.lengths = cache, [length]
            return 0
        width = max(self.width, length)
        for mine, theirs in zip(self.cache.layers, cache.layers):
            if not mine.is_initialized or mine.keys is None:
                continue
            mine.keys = torch.cat([_left_pad(mine.keys, width), _left_pad(theirs.keys, width)], dim=0)
            mine.values = torch.cat([_left_pad(mine.values, width), _left_pad(theirs.values, width)], dim=0)
        self.lengths.append(length)
        return len(self.lengths) - 1

    def remove(self, rows: list[int]) -> None:
        """Drops these rows; the others keep their order (row indices shift down)."""
        drop = set(rows)
        keep = [i for i in range(len(self.lengths)) if i not in drop]
        if not keep:
            self.cache, self.lengths = None, []
            return
        old_width = self.width
        self.lengths = [self.lengths[i] for i in keep]
        cut = old_width - self.width  # leading columns now padding in every row
        index = torch.tensor(keep, dtype=torch.long, device=self._layers()[0].keys.device)
        for layer in self._layers():
            layer.keys = layer.keys.index_select(0, index)[..., cut:, :]
            layer.values = layer.values.index_select(0, index)[..., cut:, :]

    def decode(self, tokens: list[int]) -> torch.Tensor:
        """One token per row in, next-token logits [B, V] out; every row grows by one."""
        if len(tokens) != len(self.lengths):
            raise ValueError(f"{len(tokens)} tokens for a batch of {len(self.lengths)}")
        device = self.model.device
        width = self.width
        x = torch.tensor([[t] for t in tokens], dtype=torch.long, device=device)  # [B, 1]
        kwargs: dict[str, Any] = {_cache_kwarg_of(type(self.model)): self.cache, "use_cache": True}
        if len(tokens) > 1 and min(self.lengths) < width:
            mask = torch.ones((len(tokens), width + 1), dtype=torch.long, device=device)  # [B, L + 1]
            for row, n in enumerate(self.lengths):
                mask[row, :width - n] = 0
            kwargs["attention_mask"] = mask
        kwargs["position_ids"] = torch.tensor([[n] for n in self.lengths], dtype=torch.long, device=device)
        out = self.model(input_ids=x, **kwargs)
        self.lengths = [n + 1 for n in self.lengths]
        return out.logits[:, -1]  # [B, V]
