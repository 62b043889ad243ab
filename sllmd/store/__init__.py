"""The loading-optimized checkpoint format (DESIGN.md section 2).

    save_state_dict(state_dict, path)          load_state_dict(path, device="cpu")
    save_model(model, path, tokenizer=None)    load_model(path, device="cpu")
    convert(source, path)                      open_checkpoint(path)

transformers is imported inside the model-level functions on first use, so
plain tensor loading stays light.
"""
from .convert import convert
from .format import Checkpoint, open_checkpoint
from .model import load_model, save_model
from .reader import load_state_dict
from .writer import save_state_dict

__all__ = ["Checkpoint", "convert", "load_model", "load_state_dict", "open_checkpoint", "save_model",
           "save_state_dict"]
