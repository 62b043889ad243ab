"""The loading-optimized checkpoint format (DESIGN.md section 2).

    save_state_dict(state_dict, path)          load_state_dict(path, device="cpu")
    save_model(model, path, tokenizer=None)    load_model(path, device="cpu")
    convert(source, path)                      open_checkpoint(path)

The model-level functions import transformers on first use, so plain tensor
loading stays light.
"""
from .format import Checkpoint, open_checkpoint
from .reader import load_state_dict
from .writer import save_state_dict

__all__ = ["Checkpoint", "convert", "load_model", "load_state_dict", "open_checkpoint", "save_model",
           "save_state_dict"]


def save_model(model, path, tokenizer=None, **kwargs):
    """Saves a transformers model (+ tokenizer and execution files) as a checkpoint."""
    from .model import save_model as _save_model
    return _save_model(model, path, tokenizer=tokenizer, **kwargs)


def load_model(path, device="cpu", **kwargs):
    """Builds the model on `meta` and binds the checkpoint's tensors on `device`: ready to generate."""
    from .model import load_model as _load_model
    return _load_model(path, device=device, **kwargs)


def convert(source, path, **kwargs):
    """Converts a HF model directory, .safetensors file(s) or a .gguf file into a checkpoint."""
    from .convert import convert as _convert
    return _convert(source, path, **kwargs)
