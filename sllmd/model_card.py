"""What `show` tells about a checkpoint: architecture, parameters, context length, dtype, chat
template, read from its manifest and execution files (no tensor data, no torch).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .store.format import EXEC_DIR, read_manifest

CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")
SHAPE_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "vocab_size")


def _json_file(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def chat_template(exec_dir: Path) -> str | None:
    """The chat template as transformers finds it: chat_template.jinja, else tokenizer_config.json's."""
    try:
        return (exec_dir / "chat_template.jinja").read_text()
    except (OSError, UnicodeDecodeError):
        pass
    template = _json_file(exec_dir / "tokenizer_config.json").get("chat_template")
    if isinstance(template, list):   # named templates: the default one
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"),
                        None)
    return template if isinstance(template, str) else None


def model_card(path: str | Path) -> dict[str, Any]:
    """The model's description from checkpoint `path` (raises the store's errors for a bad manifest)."""
    path = Path(path)
    manifest = read_manifest(path)
    exec_dir = path / EXEC_DIR
    config = _json_file(exec_dir / "config.json") if "config.json" in manifest.files else {}
    text_config = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    context = next((text_config[k] for k in CONTEXT_KEYS if isinstance(text_config.get(k), int)), None)
    model = manifest.model
    return {
        "architecture": model.get("architecture") or next(iter(config.get("architectures") or []), None),
        "model_type": model.get("model_type") or config.get("model_type"),
        "parameters": model.get("parameters"),
        "dtype": model.get("dtype") or config.get("dtype") or config.get("torch_dtype"),
        "context_length": context,
        "shape": {k: text_config[k] for k in SHAPE_KEYS if k in text_config},
        "converted_from": model.get("source"),
        "format_version": ".".join(map(str, manifest.version)),
        "files": list(manifest.files),
        "has_tokenizer": any(f.startswith("tokenizer") for f in manifest.files),
        "chat_template": chat_template(exec_dir),
        "path": str(path),
    }
