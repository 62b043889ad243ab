"""A synthetic LLM-shaped checkpoint, written once in three formats with the
same tensors: ours (sllmd.store), a .safetensors file and a torch.save .pt.

The shapes follow a Llama-style decoder: bf16 embeddings, attention with
grouped KV heads and fp32 biases, a gated MLP, fp32 norms, an untied lm_head.
The hidden size and layer count are chosen to land near the requested size,
so a 2 GiB checkpoint has a few hundred tensors from 4 KiB to ~130 MB.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from common import CheckpointFiles

log = logging.getLogger(__name__)

VOCAB = 32000
SPEC_FILE = "spec.json"  # written last: its presence marks a complete set


@dataclass(frozen=True)
class SynthSpec:
    hidden: int
    layers: int
    intermediate: int
    kv_dim: int
    vocab: int = VOCAB
    seed: int = 0

    def shapes(self) -> list[tuple[str, tuple[int, ...], str]]:
        h, i, kv = self.hidden, self.intermediate, self.kv_dim
        out = [("model.embed_tokens.weight", (self.vocab, h), "bfloat16")]
        for n in range(self.layers):
            p = f"model.layers.{n}."
            out += [
                (p + "input_layernorm.weight", (h,), "float32"),
                (p + "self_attn.q_proj.weight", (h, h), "bfloat16"),
                (p + "self_attn.q_proj.bias", (h,), "float32"),
                (p + "self_attn.k_proj.weight", (kv, h), "bfloat16"),
                (p + "self_attn.k_proj.bias", (kv,), "float32"),
                (p + "self_attn.v_proj.weight", (kv, h), "bfloat16"),
                (p + "self_attn.v_proj.bias", (kv,), "float32"),
                (p + "self_attn.o_proj.weight", (h, h), "bfloat16"),
                (p + "post_attention_layernorm.weight", (h,), "float32"),
                (p + "mlp.gate_proj.weight", (i, h), "bfloat16"),
                (p + "mlp.up_proj.weight", (i, h), "bfloat16"),
                (p + "mlp.down_proj.weight", (h, i), "bfloat16"),
            ]
        out += [("model.norm.weight", (h,), "float32"), ("lm_head.weight", (self.vocab, h), "bfloat16")]
        return out

    def nbytes(self) -> int:
        size = {"bfloat16": 2, "float32": 4}
        total = 0
        for _, shape, dt in self.shapes():
            n = size[dt]
            for d in shape:
                n *= d
            total += n
        return total


def spec_for(target_bytes: int, seed: int = 0) -> SynthSpec:
    """The Llama-like shape whose size is closest to target_bytes (hidden a multiple of 256)."""
    best = None
    for hidden in range(256, 16384 + 1, 256):
        inter = (hidden * 8 // 3 + 255) // 256 * 256
        kv = max(128, hidden // 8)
        base = SynthSpec(hidden, 0, inter, kv, seed=seed)
        per_layer = SynthSpec(hidden, 1, inter, kv, seed=seed).nbytes() - base.nbytes()
        layers = round((target_bytes - base.nbytes()) / per_layer)
        if layers < 4 or layers > 96:
            continue
        spec = SynthSpec(hidden, layers, inter, kv, seed=seed)
        # Prefer ~20-40 layers (a few hundred tensors), then the closest size.
        key = (0 if 20 <= layers <= 40 else 1, abs(spec.nbytes() - target_bytes))
        if best is None or key < best[0]:
            best = (key, spec)
    if best is None:
        raise ValueError(f"no LLM-like shape for {target_bytes} bytes")
    return best[1]


def make_state_dict(spec: SynthSpec) -> dict:
    """Random tensors of the spec's shapes (normal(0, 0.02) weights, ones for norms)."""
    import torch
    g = torch.Generator().manual_seed(spec.seed)
    sd = {}
    for name, shape, dt in spec.shapes():
        dtype = getattr(torch, dt)
        if name.endswith("norm.weight"):
            t = torch.ones(shape, dtype=dtype)
        else:
            t = torch.empty(shape, dtype=torch.float32).normal_(0.0, 0.02, generator=g).to(dtype)
        sd[name] = t
    return sd


@dataclass(frozen=True)
class SynthFiles(CheckpointFiles):
    spec: SynthSpec

    @property
    def pt(self) -> Path:
        return self.root / "model.pt"

    @property
    def payload_bytes(self) -> int:
        return self.spec.nbytes()


def ensure_synthetic(workdir: Path, size_bytes: int, seed: int = 0, progress=print) -> SynthFiles:
    """Returns the synthetic checkpoint set for this size, writing it if absent."""
    spec = spec_for(size_bytes, seed)
    root = Path(workdir) / f"synth-h{spec.hidden}-l{spec.layers}-s{seed}"
    files = SynthFiles(root, spec)
    marker = root / SPEC_FILE
    if marker.exists() and json.loads(marker.read_text()) == asdict(spec):
        return files
    import torch
    from safetensors.torch import save_file

    from sllmd.store import save_state_dict
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    t0 = time.perf_counter()
    progress(f"generating a synthetic checkpoint: {len(spec.shapes())} tensors, {spec.nbytes() / 2**30:.2f} GiB "
             f"(hidden {spec.hidden}, {spec.layers} layers) in {root}")
    sd = make_state_dict(spec)
    save_state_dict(sd, files.sllm)
    progress(f"  ours written ({time.perf_counter() - t0:.1f} s)")
    save_file(sd, files.safetensors)
    progress(f"  safetensors written ({time.perf_counter() - t0:.1f} s)")
    torch.save(sd, files.pt)
    progress(f"  torch .pt written ({time.perf_counter() - t0:.1f} s)")
    for p in (files.safetensors, files.pt):
        with open(p, "rb") as f:
            os.fsync(f.fileno())
    marker.write_text(json.dumps(asdict(spec)))
    return files


def tensor_count(spec: SynthSpec) -> int:
    return len(spec.shapes())
