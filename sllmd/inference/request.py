"""An inference request and the whole state of a running one.

A running request is its token list plus its sampling state (DESIGN.md
sections 5 and 7): `RequestState` holds the prompt and output token ids, the
sampling parameters, the random generator's state after the last draw, and how
much text the client has already been sent. A destination that gets a
`RequestState` rebuilds the KV cache by prefilling all its tokens and carries
on, with the same random stream and without resending text.
"""
from __future__ import annotations

import math
import uuid
from dataclasses import dataclass, field
from typing import Any

from sllmd.errors import InvalidRequestError

MAX_TOKENS_LIMIT = 1 << 20
MAX_STOP_STRINGS = 64


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise InvalidRequestError(message)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # <= 0: greedy
    top_p: float = 1.0  # nucleus: keep the smallest set of tokens whose probability reaches top_p
    seed: int | None = None  # None with temperature > 0: a fresh random seed
    max_tokens: int = 256
    stop: tuple[str, ...] = ()  # stop strings: generation ends before the first occurrence

    def validate(self) -> "SamplingParams":
        _check(_is_number(self.temperature) and self.temperature >= 0, "temperature must be a number >= 0")
        _check(_is_number(self.top_p) and 0 < self.top_p <= 1, "top_p must be a number in (0, 1]")
        _check(self.seed is None or (_is_int(self.seed) and 0 <= self.seed < 2**64),
               "seed must be an integer in [0, 2**64)")
        _check(_is_int(self.max_tokens) and 1 <= self.max_tokens <= MAX_TOKENS_LIMIT,
               f"max_tokens must be an integer in [1, {MAX_TOKENS_LIMIT}]")
        _check(isinstance(self.stop, tuple) and len(self.stop) <= MAX_STOP_STRINGS
               and all(isinstance(s, str) and s for s in self.stop),
               f"stop must be a list of at most {MAX_STOP_STRINGS} non-empty strings")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0


@dataclass
class InferRequest:
    model: str
    prompt: str | None = None  # a user message (or raw text with raw=True)
    messages: list[dict[str, str]] | None = None  # a chat: [{"role": ..., "content": ...}, ...]
    raw: bool = False  # feed `prompt` as is, without the chat template
    sampling: SamplingParams = field(default_factory=SamplingParams)
    keep_alive: float | None = None  # seconds (negative = forever, 0 = unload after); None = daemon default
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)

    def validate(self) -> "InferRequest":
        _check(isinstance(self.model, str) and self.model != "", "model must be a non-empty string")
        _check((self.prompt is None) != (self.messages is None), "give exactly one of prompt and messages")
        if self.prompt is not None:
            _check(isinstance(self.prompt, str), "prompt must be a string")
        else:
            _check(isinstance(self.messages, list) and len(self.messages) > 0, "messages must be a non-empty list")
            for m in self.messages:
                _check(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str),
                       "each message must be a map with string role and content")
            _check(not self.raw, "raw applies to prompt, not messages")
        _check(isinstance(self.raw, bool), "raw must be a boolean")
        _check(self.keep_alive is None or (_is_number(self.keep_alive) or self.keep_alive in (math.inf, -math.inf)),
               "keep_alive must be a number of seconds")
        _check(isinstance(self.request_id, str) and 0 < len(self.request_id) <= 128,
               "request_id must be a short string")
        self.sampling.validate()
        return self

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "InferRequest":
        """Builds and validates a request from a decoded wire map (unknown keys are refused)."""
        _check(isinstance(d, dict), "a request must be a map")
        known = {"model", "prompt", "messages", "raw", "chat", "max_tokens", "temperature", "top_p", "seed", "stop",
                 "keep_alive", "request_id"}
        unknown = set(d) - known
        _check(not unknown, f"unknown request fields: {sorted(map(str, unknown))}")
        stop = d.get("stop") or ()
        if isinstance(stop, str):
            stop = (stop,)
        _check(isinstance(stop, (list, tuple)), "stop must be a string or a list of strings")

        def get(key: str, default: Any) -> Any:  # a missing key and None both mean the default
            value = d.get(key)
            return default if value is None else value

        chat = get("chat", True)
        _check(isinstance(chat, bool), "chat must be a boolean")
        sampling = SamplingParams(
            temperature=get("temperature", 0.0), top_p=get("top_p", 1.0), seed=d.get("seed"),
            max_tokens=get("max_tokens", SamplingParams.max_tokens), stop=tuple(stop))
        req = cls(model=d.get("model"), prompt=d.get("prompt"), messages=d.get("messages"),
                  raw=get("raw", not chat), sampling=sampling, keep_alive=d.get("keep_alive"),
                  **({"request_id": d["request_id"]} if d.get("request_id") is not None else {}))
        return req.validate()

    def to_dict(self) -> dict[str, Any]:
        s = self.sampling
        return {"model": self.model, "prompt": self.prompt, "messages": self.messages, "raw": self.raw,
                "max_tokens": s.max_tokens, "temperature": s.temperature, "top_p": s.top_p, "seed": s.seed,
                "stop": list(s.stop), "keep_alive": self.keep_alive, "request_id": self.request_id}


@dataclass
class RequestState:
    """Everything a running request is; what live migration ships (DESIGN.md section 7)."""

    request_id: str
    model: str
    sampling: SamplingParams
    prompt_ids: list[int]
    output_ids: list[int] = field(default_factory=list)
    rng_state: bytes | None = None  # the CPU torch.Generator state after the last draw
    emitted_text: str = ""  # text the client has been sent so far
    finish_reason: str | None = None  # "stop", "length", "cancelled", "error" once finished
    # Streaming position: the detokenizer's (prefix, read) offsets into all_ids, and text
    # decoded but held back (it may start a stop string). None/"" before the first token.
    detok_offsets: tuple[int, int] | None = None
    held_text: str = ""

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def to_dict(self) -> dict[str, Any]:
        s = self.sampling
        return {"request_id": self.request_id, "model": self.model,
                "sampling": {"temperature": s.temperature, "top_p": s.top_p, "seed": s.seed,
                             "max_tokens": s.max_tokens, "stop": list(s.stop)},
                "prompt_ids": list(self.prompt_ids), "output_ids": list(self.output_ids),
                "rng_state": self.rng_state, "emitted_text": self.emitted_text, "finish_reason": self.finish_reason,
                "detok_offsets": list(self.detok_offsets) if self.detok_offsets else None,
                "held_text": self.held_text}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RequestState":
        try:
            s = d["sampling"]
            sampling = SamplingParams(s["temperature"], s["top_p"], s["seed"], s["max_tokens"],
                                      tuple(s["stop"])).validate()
            offsets = d.get("detok_offsets")
            state = cls(str(d["request_id"]), str(d["model"]), sampling, [int(t) for t in d["prompt_ids"]],
                        [int(t) for t in d["output_ids"]], d.get("rng_state"), str(d.get("emitted_text", "")),
                        d.get("finish_reason"), tuple(int(o) for o in offsets) if offsets else None,
                        str(d.get("held_text", "")))
        except (KeyError, TypeError, ValueError) as e:
            raise InvalidRequestError(f"malformed request state: {type(e).__name__}: {e}") from e
        _check(state.rng_state is None or isinstance(state.rng_state, bytes), "rng_state must be bytes")
        return state
