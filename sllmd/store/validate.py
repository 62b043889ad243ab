"""Whether a checkpoint makes a model sllmd can serve, checked at import time.

An import that would only fail at its first request is refused at once, with one
line that names what is wrong and no path inside the store: config.json must name
a model_type and build on `meta`; every tensor must be one the model has, with the
model's shape (ties and non-persistent buffers allowed for); and a tokenizer must
come with it unless the import says --no-tokenizer.
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from ..errors import UnservableModelError
from .format import Checkpoint, open_checkpoint

log = logging.getLogger(__name__)

_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks)\.(\d+)\.")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json", "merges.txt")


class _Refused(Exception):
    """Why the checkpoint cannot be served (one line, no path)."""


def check_servable(path: str | Path, *, tokenizer: bool = True, name: str | None = None) -> None:
    """Raises UnservableModelError in one line ("cannot import 'name': ..." when a name is
    given) unless the checkpoint at `path` makes a model that can be served."""
    ckpt = open_checkpoint(path)
    try:
        config = _read_config(ckpt)
        model = _build_on_meta(ckpt, config)
        _check_tensors(ckpt, model)
        if tokenizer:
            _check_tokenizer(ckpt)
    except _Refused as e:
        raise UnservableModelError(f"cannot import {name!r}: {e}" if name else f"{path} cannot be served: {e}") \
            from None


def _short(e: BaseException, ckpt: Checkpoint) -> str:
    """An exception's first line, without the (temporary) checkpoint path in it."""
    text = str(e).replace(f"{ckpt.path}/", "").replace(str(ckpt.path), "the checkpoint")
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), type(e).__name__)
    return line if len(line) <= 240 else line[:237] + "..."


def _read_config(ckpt: Checkpoint) -> dict:
    file = ckpt.exec_dir() / "config.json"
    if not file.is_file():
        raise _Refused("it has no config.json: it holds tensors only, and sllmd serves transformers "
                       "models (add the model's config.json)")
    try:
        config = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _Refused(f"its config.json is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise _Refused("its config.json is not a JSON object")
    if not isinstance(config.get("model_type"), str) or not config["model_type"]:
        raise _Refused("its config.json has no model_type, so transformers cannot tell which "
                       "architecture it is")
    return config


def _build_on_meta(ckpt: Checkpoint, config: dict):
    from .model import build_empty_model

    try:
        return build_empty_model(ckpt.path, architecture=ckpt.manifest.model.get("architecture"))
    except Exception as e:  # transformers raises many kinds; all mean "cannot build"
        raise _Refused(f"a {config['model_type']} model cannot be built from its config.json: "
                       f"{_short(e, ckpt)}") from None


def _layers(names) -> int | None:
    found = [int(m.group(1)) for n in names if (m := _LAYER.search(n))]
    return max(found) + 1 if found else None


def _more(items: list) -> str:
    return f" and {len(items) - 1} more" if len(items) > 1 else ""


def _check_tensors(ckpt: Checkpoint, model) -> None:
    from .model import key_mismatch, match_prefix

    arch = type(model).__name__
    expected = {k: tuple(t.shape) for k, t in model.state_dict().items()}
    present = match_prefix(model, {name: tuple(e.shape) for name, e in ckpt.tensors.items()})
    extra, missing = key_mismatch(model, set(expected) - set(present), set(present) - set(expected))
    wrong = [k for k in sorted(set(present) & set(expected)) if present[k] != expected[k]]
    layers = getattr(model.config, "num_hidden_layers", None)
    have = _layers(present)
    hint = (f" (the weights have {have} layers, config.json says num_hidden_layers={layers})"
            if have is not None and layers is not None and have != layers else "")
    if wrong:
        k = wrong[0]
        raise _Refused(
            f"its weights do not fit its config.json: {k} has shape {list(present[k])} but the {arch} that "
            f"config.json describes needs {list(expected[k])}{_more(wrong)}{hint}")
    if extra:
        raise _Refused(f"its weights do not fit its config.json: {extra[0]}{_more(extra)} is not in the "
                       f"{arch} that config.json describes{hint}")
    if missing:
        raise _Refused(f"its weights do not fit its config.json: the {arch} that config.json describes "
                       f"needs {missing[0]}{_more(missing)}, which the checkpoint lacks{hint}")


def _check_tokenizer(ckpt: Checkpoint) -> None:
    from .model import load_tokenizer

    exec_dir = ckpt.exec_dir()
    if not any((exec_dir / f).is_file() for f in _TOKENIZER_FILES):
        raise _Refused("it has no tokenizer (no tokenizer.json, tokenizer.model or vocab.json); add "
                       "the tokenizer's files, or import with --no-tokenizer")
    try:
        load_tokenizer(ckpt.path)
    except Exception as e:
        raise _Refused(f"its tokenizer cannot be loaded: {_short(e, ckpt)}") from None
