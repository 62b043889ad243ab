"""scripts/demo.py's bookkeeping: a checkpoint the daemon converted is kept for the next run."""
from __future__ import annotations

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def load_demo():
    spec = importlib.util.spec_from_file_location("sllm_demo", REPO / "scripts" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_converted_checkpoint_is_kept_and_the_next_run_imports_it(tmp_path):
    demo = load_demo()
    converted = tmp_path / "store" / "models" / "smol"
    (converted / "model").mkdir(parents=True)
    (converted / "manifest.json").write_text("{}")
    (converted / "data-00000.bin").write_bytes(b"\0" * 4096)
    cached = tmp_path / "cache" / "smollm2-x"

    assert demo.model_source(cached)[1] is True                # nothing cached: the GGUF, converted on import
    assert demo.keep_converted(converted, cached)
    assert sorted(p.name for p in cached.iterdir()) == ["data-00000.bin", "manifest.json", "model"]
    assert demo.model_source(cached) == (cached, False)         # the second run: no conversion
    assert demo.model_source(cached, from_gguf=True)[1] is True
    assert not demo.keep_converted(converted, cached)            # already kept: left alone
    assert [p.name for p in cached.parent.iterdir()] == ["smollm2-x"]   # no temporaries left


def test_the_demo_uses_the_tests_cache_entry():
    from conftest import CACHE, smollm2_checkpoint_name
    assert load_demo().cache_entry() == CACHE / smollm2_checkpoint_name()
