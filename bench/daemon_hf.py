"""The transformers baseline of bench/daemon_bench.py, in a fresh interpreter:
time to first token for SmolLM2 from a Hugging Face safetensors directory.

    python bench/daemon_hf.py '{"dir": "...", "question": "...", "cond": "warm", "settle_s": 2.5}'

Outside the timed region: interpreter start-up; importing torch, transformers,
AutoModelForCausalLM, AutoTokenizer and the Llama modeling module (so the
baseline pays no import inside the timed region); a tiny torch op; then the
cache condition (warm: the directory's files read until fully resident, before
and after the pause; cold: sync + drop the page cache) and a pause of settle_s.

Timed region: AutoModelForCausalLM.from_pretrained(dir, dtype=bfloat16) on the
CPU; AutoTokenizer.from_pretrained(dir); the chat template applied and the
prompt tokenized; one forward pass over the prompt; argmax; the token decoded
to text. The last line of stdout is the result (bench/common.py protocol).
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("TQDM_DISABLE", "1")

import common  # noqa: E402


def main(spec: dict) -> dict:
    import torch
    import transformers
    import transformers.models.llama.modeling_llama  # noqa: F401  (imported outside the timed region)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    transformers.logging.set_verbosity_error()
    torch.empty(16).clone()
    d = Path(spec["dir"])
    files = sorted(p for p in d.iterdir() if p.is_file())
    if spec["cond"] == "cold":
        common.drop_caches()
    else:
        common.make_resident(files)
    time.sleep(spec.get("settle_s", 2.5))
    if spec["cond"] != "cold":
        common.make_resident(files)   # again: this VM's DAMON pageout may take idle page cache during the pause
    resident = sum(common.resident_bytes(f)[0] for f in files)

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.bfloat16)
    t1 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(d)
    ids = tok.apply_chat_template([{"role": "user", "content": spec["question"]}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    t2 = time.perf_counter()
    with torch.inference_mode():
        logits = model(**ids, logits_to_keep=1).logits[0, -1]
    token = int(torch.argmax(logits))
    text = tok.decode([token])
    t3 = time.perf_counter()
    return {"ttft_s": t3 - t0, "from_pretrained_s": t1 - t0, "tokenizer_s": t2 - t1, "first_token_s": t3 - t2,
            "prompt_tokens": int(ids["input_ids"].shape[1]), "token": text, "resident_bytes": resident,
            "file_bytes": sum(f.stat().st_size for f in files), "torch_threads": torch.get_num_threads()}


if __name__ == "__main__":
    common.emit_result(main(json.loads(sys.argv[1])))
