"""Reading .gguf files through transformers, dequantized into a dense model.

transformers can keep GGUF weights packed (GgufLinear modules with matmul
kernels); a checkpoint needs plain tensors, so dequantization is asked for
explicitly and checked afterwards. The quantizer and its config are cleared
before saving (DESIGN.md section 8), so the saved config describes the dense
model that the checkpoint holds.
"""
from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import Callable

import torch

from ...errors import ConversionError
from ..model import MODEL_CONSTRUCTION_LOCK

log = logging.getLogger(__name__)


def _dequantizing_config():
    try:
        from transformers import GgufConfig
    except ImportError:  # older transformers always dequantize GGUF weights
        return None
    return GgufConfig(dequantize=True)


@contextlib.contextmanager
def _tensor_reports(on_phase: Callable[..., None] | None):
    """Reports what transformers' GGUF loader is doing -- reading metadata, reading tensors, each
    tensor it dequantizes -- by wrapping its reader and its progress bar (module globals: the
    caller holds MODEL_CONSTRUCTION_LOCK). Without those hooks (another transformers version)
    the coarser phases are still reported."""
    try:
        from transformers import modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:
        gguf_utils = None
    bar, reader = getattr(gguf_utils, "tqdm", None), getattr(gguf_utils, "load_gguf_checkpoint", None)
    if on_phase is None or bar is None or reader is None:
        yield
        return

    def reporting_bar(iterable=None, *args, **kwargs):
        items = list(iterable) if iterable is not None else []
        last = 0.0
        for i, item in enumerate(items):
            now = time.monotonic()
            if now - last >= 0.1:
                last = now
                on_phase("dequantizing", i, len(items), "tensors")
            yield item
        on_phase("dequantizing", len(items), len(items), "tensors")

    def reporting_reader(*args, **kwargs):
        tensors = kwargs.get("return_tensors", args[1] if len(args) > 1 else False)
        on_phase("reading the GGUF tensors" if tensors else "reading the GGUF metadata")
        out = reader(*args, **kwargs)
        on_phase("building the model")
        return out

    gguf_utils.tqdm, gguf_utils.load_gguf_checkpoint = reporting_bar, reporting_reader
    try:
        yield
    finally:
        gguf_utils.tqdm, gguf_utils.load_gguf_checkpoint = bar, reader


def load_gguf(path: str | Path, dtype: torch.dtype, on_phase: Callable[..., None] | None = None):
    """Returns (model, tokenizer or None) for a .gguf file; weights dense in `dtype`.
    on_phase(phase, done, total, unit) hears what it is doing (per tensor while dequantizing)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    kwargs = {"gguf_file": path.name, "dtype": dtype}
    qconfig = _dequantizing_config()
    if qconfig is not None:
        kwargs["quantization_config"] = qconfig
    try:
        with MODEL_CONSTRUCTION_LOCK, _tensor_reports(on_phase):
            model = AutoModelForCausalLM.from_pretrained(path.parent, **kwargs)
    except Exception as e:  # a file transformers cannot read fails in many ways; all mean "cannot convert"
        raise ConversionError(f"{path}: transformers cannot load this GGUF file: {type(e).__name__}: {e}") from e
    clear_quantization(model)
    packed = [name for name, m in model.named_modules() if type(m).__name__.lower().startswith("gguf")]
    if packed:
        raise ConversionError(f"{path}: weights stayed quantized after loading ({packed[:3]}); "
                              f"this transformers version cannot dequantize this file")
    if on_phase is not None:
        on_phase("reading the tokenizer")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # the Rust tokenizers library panics (a BaseException) on odd vocabularies
        log.warning("%s: no tokenizer could be read from the GGUF file (%s); converting the weights only", path, e)
        tokenizer = None
    return model, tokenizer


def clear_quantization(model) -> None:
    """Forgets that a model came from a quantized file: its weights are dense now."""
    model.hf_quantizer = None
    if hasattr(model, "is_quantized"):
        try:
            model.is_quantized = False
        except AttributeError:  # a read-only property in some versions
            pass
    for config in {id(c): c for c in (model.config, getattr(model.config, "get_text_config", lambda: None)())
                   if c is not None}.values():
        if hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")
