"""sllmctl convert / inspect."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from sllmctl.__main__ import main
from sllmd.store.format import open_checkpoint
from sllmd.store.model import load_model


@pytest.fixture
def hf_dir(tiny_models, tmp_path):
    tiny_models("gpt2").save_pretrained(tmp_path / "hf")
    return tmp_path / "hf"


def test_convert_then_inspect_json(hf_dir, tmp_path, capsys):
    assert main(["convert", str(hf_dir), str(tmp_path / "ckpt")]) == 0
    out, err = capsys.readouterr()
    summary = out.strip().splitlines()[-1]
    assert summary.startswith("converted GPT2LMHeadModel, float32: ") and " s -> " in summary
    assert "KiB" in summary or "MiB" in summary
    assert "writing:" in err and "100%" in err  # progress on stderr

    assert main(["inspect", str(tmp_path / "ckpt"), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    ckpt = open_checkpoint(tmp_path / "ckpt")
    assert d["magic"] == "sllm-checkpoint" and d["format_version"] == "1.1"
    assert d["model"]["architecture"] == "GPT2LMHeadModel" and d["model"]["source"]["format"] == "safetensors"
    assert d["checksum"] == {"scheme": "crc32c", "block_size": 1 << 20}
    assert "config.json" in d["files"]
    assert d["partitions"] == [{"index": 0, "file": "data-00000.bin", "nbytes": ckpt.manifest.total_bytes,
                                "device": None, "blocks": len(ckpt.manifest.partitions[0].crcs)}]
    assert d["tensors"].keys() == ckpt.tensors.keys()
    wte = d["tensors"]["transformer.wte.weight"]
    assert wte["dtype"] == "float32" and wte["shape"] == [256, 64] and wte["nbytes"] == 256 * 64 * 4
    model = load_model(tmp_path / "ckpt")
    totals = d["totals"]
    assert totals["tensors"] == len(ckpt.tensors) and totals["partitions"] == 1
    assert totals["file_bytes"] == ckpt.manifest.total_bytes
    assert totals["elements"] == sum(p.numel() for p in model.parameters())  # the tied head counts once
    assert totals["stored_bytes"] <= totals["file_bytes"]


def test_inspect_table_shows_sharing_and_totals(tiny_models, tmp_path, capsys):
    from sllmd.store.model import save_model
    save_model(tiny_models("opt"), tmp_path / "ckpt")
    assert main(["inspect", str(tmp_path / "ckpt")]) == 0
    out = capsys.readouterr().out
    assert "OPTForCausalLM (opt), float32" in out
    assert "crc32c per 1.0 MiB block" in out
    assert "data-00000.bin" in out
    head = next(line for line in out.splitlines() if line.strip().startswith("lm_head.weight"))
    assert "= model.decoder.embed_tokens.weight" in head and "256x64" in head
    assert "(1 sharing storage)" in out
    assert out.splitlines()[-1].startswith("total ")


def test_convert_several_safetensors_with_dtype(tmp_path, capsys):
    save_file({"a": torch.randn(4, 4)}, tmp_path / "a.safetensors")
    save_file({"b": torch.arange(3)}, tmp_path / "b.safetensors")
    rc = main(["convert", str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"), str(tmp_path / "ckpt"),
               "--dtype", "bf16"])
    assert rc == 0
    assert capsys.readouterr().out.startswith("converted tensors, bfloat16: 2 tensors")
    ckpt = open_checkpoint(tmp_path / "ckpt")
    assert ckpt.tensors["a"].dtype == "bfloat16" and ckpt.tensors["b"].dtype == "int64"


def test_errors_exit_nonzero_with_a_message(hf_dir, tmp_path, capsys):
    assert main(["convert", str(tmp_path / "missing"), str(tmp_path / "ckpt")]) == 1
    assert "no such file" in capsys.readouterr().err
    assert main(["convert", str(hf_dir), str(tmp_path / "ckpt")]) == 0
    capsys.readouterr()
    assert main(["convert", str(hf_dir), str(tmp_path / "ckpt")]) == 1
    assert "already exists (use --overwrite to replace it)" in capsys.readouterr().err
    assert main(["convert", str(hf_dir), str(tmp_path / "ckpt"), "--overwrite"]) == 0
    assert main(["inspect", str(hf_dir)]) == 1
    assert "not a checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # usage errors exit 2
        main(["convert", str(hf_dir)])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        main(["convert", str(hf_dir), str(tmp_path / "x"), "--dtype", "int8"])
    assert e.value.code == 2


def test_module_entry_point(hf_dir, tmp_path):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    run = subprocess.run([sys.executable, "-m", "sllmctl", "convert", str(hf_dir), str(tmp_path / "ckpt")],
                         capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("converted GPT2LMHeadModel")
    run = subprocess.run([sys.executable, "-m", "sllmctl", "inspect", "--json", str(tmp_path / "ckpt")],
                         capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["totals"]["partitions"] == 1
