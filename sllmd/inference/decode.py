"""The decode loop's small pure pieces, gpt-fast style: build the prompt,
prefill, decode one token, sample, and decide when to stop.

Shapes: B = 1 (one request at a time per instance), T = prompt length,
V = vocabulary size. Callers run these under torch.inference_mode().

Long prompts are prefilled in chunks of PREFILL_CHUNK_TOKENS (each chunk one
`prefill` call appending to the KV cache), so a cancelled request stops
between chunks instead of after the whole prompt.
"""
from __future__ import annotations

import functools
import inspect
from typing import Any, Iterable

import torch
from transformers import DynamicCache

from sllmd.errors import InvalidRequestError

from .request import InferRequest, SamplingParams

# Tokens per prefill forward: a cancel waits at most one chunk. Measured with
# bench/compute_dtype.py --chunks (SmolLM2, bf16, 2 EPYC cores, a 1,024-token prompt):
# one pass 1.12 s; chunks of 512: 1.35 s, slowest chunk 0.78 s; of 256: 1.43 s, 0.43 s;
# of 128: 1.67 s, 0.27 s. Prompts up to one chunk (chat turns) pay nothing.
PREFILL_CHUNK_TOKENS = 512


def build_prompt_ids(tokenizer, request: InferRequest) -> list[int]:
    """Token ids of the prompt: the chat template applied to the messages (or to
    the prompt as one user message), or the raw prompt when raw=True or the
    tokenizer has no chat template."""
    messages = request.messages
    if messages is None and not request.raw and getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": request.prompt}]
    if messages is not None:
        if not getattr(tokenizer, "chat_template", None):
            # No template: the conversation as plain text, the way a base model reads it.
            text = "\n".join(f"{m['role']}: {m['content']}" for m in messages) + "\nassistant:"
            return list(tokenizer.encode(text, add_special_tokens=True))
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return list(tokenizer.encode(text, add_special_tokens=False))  # the template wrote any BOS itself
    return list(tokenizer.encode(request.prompt, add_special_tokens=True))


def stop_token_ids(model, tokenizer) -> frozenset[int]:
    """End-of-sequence ids: the generation config's (an int or a list), else the tokenizer's."""
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        eos = getattr(source, "eos_token_id", None) if source is not None else None
        if eos is not None:
            ids.update([eos] if isinstance(eos, int) else eos)
            break
    if not ids and getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(int(i) for i in ids)


def check_prompt_fits(n_prompt: int, limit: int | None, model_name: str) -> None:
    """InvalidRequestError unless the prompt leaves room for one output token.
    (prompt + max_tokens may exceed the context: generation then stops at the
    context with finish_reason "length".)"""
    if n_prompt == 0:
        raise InvalidRequestError("the prompt is empty (no tokens)")
    if limit is not None and n_prompt >= limit:
        raise InvalidRequestError(f"the prompt is {n_prompt:,} tokens; {model_name}'s context is {limit:,} "
                                  f"(at most {limit - 1:,} prompt tokens leave room for an answer)")


def prefill_spans(start: int, end: int, chunk_tokens: int = PREFILL_CHUNK_TOKENS) -> list[tuple[int, int]]:
    """[start, end) cut into consecutive (lo, hi) chunks of at most chunk_tokens."""
    if chunk_tokens < 1:
        raise ValueError("chunk_tokens must be >= 1")
    return [(lo, min(lo + chunk_tokens, end)) for lo in range(start, end, chunk_tokens)]


def context_limit(model) -> int | None:
    """The longest sequence the model's positions allow, when its config says."""
    cfg = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(cfg, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


@functools.lru_cache(maxsize=64)
def _cache_kwarg_of(cls: type) -> str:
    params = inspect.signature(cls.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def new_cache(model) -> DynamicCache:
    return DynamicCache(config=model.config)


def _forward(model, input_ids: torch.Tensor, cache: DynamicCache, keep_last: bool) -> torch.Tensor:
    kwargs: dict[str, Any] = {_cache_kwarg_of(type(model)): cache, "use_cache": True}
    if keep_last:
        kwargs["logits_to_keep"] = 1
    out = model(input_ids=input_ids, **kwargs)
    return out.logits[0, -1]  # [V]


def prefill(model, token_ids: list[int], cache: DynamicCache) -> torch.Tensor:
    """Runs tokens (the prompt, a chunk of it, or a migrated request's whole token
    list) through the model after those already in `cache`, appending to it;
    returns the next-token logits [V]."""
    device = model.device
    x = torch.tensor([token_ids], dtype=torch.long, device=device)  # [1, T]
    return _forward(model, x, cache, keep_last=True)


def decode_one_token(model, token_id: int, cache: DynamicCache) -> torch.Tensor:
    """One step with the KV cache: the last token in, the next-token logits [V] out."""
    x = torch.tensor([[token_id]], dtype=torch.long, device=model.device)  # [1, 1]
    return _forward(model, x, cache, keep_last=False)


def new_generator(params: SamplingParams, rng_state: bytes | None = None) -> torch.Generator:
    """The request's random stream: a CPU generator, so seeded output is the same
    on every device and its state can travel with a migrated request."""
    gen = torch.Generator(device="cpu")
    if rng_state is not None:
        gen.set_state(torch.frombuffer(bytearray(rng_state), dtype=torch.uint8))
    elif params.seed is not None:
        gen.manual_seed(params.seed)
    else:
        gen.seed()
    return gen


def generator_state(gen: torch.Generator) -> bytes:
    return bytes(gen.get_state().numpy().tobytes())


def sample(logits: torch.Tensor, params: SamplingParams, gen: torch.Generator) -> int:
    """Greedy (argmax) when temperature <= 0; else temperature-scaled softmax,
    top-p truncation, and one draw from `gen`."""
    if params.greedy:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float().cpu() / params.temperature, dim=-1)  # [V]
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # mass of the tokens ranked above each
        sorted_probs = torch.where(before < params.top_p, sorted_probs, torch.zeros_like(sorted_probs))
        choice = torch.multinomial(sorted_probs, 1, generator=gen)
        return int(order[choice])
    return int(torch.multinomial(probs, 1, generator=gen))


def finish_reason(token_id: int, n_output: int, n_total: int, eos: Iterable[int], max_tokens: int,
                  limit: int | None) -> str | None:
    """Why generation ends after `token_id`, or None to go on. `n_output`
    counts `token_id`; `n_total` is prompt plus output."""
    if token_id in eos:
        return "stop"
    if n_output >= max_tokens or (limit is not None and n_total >= limit):
        return "length"
    return None
