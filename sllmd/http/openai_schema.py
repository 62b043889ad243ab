"""An OpenAI request body -> a validated InferRequest, or a 400 that names the field.

Every field the API defines is either served (model, messages / prompt,
max_tokens, max_completion_tokens, temperature, top_p, seed, stop, stream,
stream_options.include_usage), allowed and ignored because it cannot change the
answer (user and the other caller identifiers), accepted only at the value that
means "off" (n = 1, logprobs = false, tools = [], presence_penalty = 0, ...), or
refused by name. A field this table does not know is refused too: nothing is
silently ignored. `null` means "not given", as in OpenAI's API.

Defaults are OpenAI's where they differ from sllm's: temperature 1 (sllmctl's
is 0, greedy). max_tokens defaults to sllm's 256. The sllm extension
`keep_alive` (seconds, or "5m", "-1" = forever, "0" = unload after) is an
infer's keep_alive.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

from sllmd import names
from sllmd.errors import ConfigError, InvalidRequestError, ModelNotFoundError
from sllmd.http.errors import HttpError, invalid, http_error
from sllmd.inference.request import InferRequest, SamplingParams
from sllmd.units import parse_duration

OPENAI_TEMPERATURE = 1.0   # OpenAI's default when the field is absent
MAX_TEMPERATURE = 2.0      # OpenAI's range is [0, 2]
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}

# Fields that cannot change the answer: allowed, ignored.
IGNORED = frozenset({"user", "safety_identifier", "prompt_cache_key", "metadata", "store", "service_tier",
                     "parallel_tool_calls"})


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# Unsupported features, accepted only at the value that turns them off.
_OFF: dict[str, Callable[[Any], bool]] = {
    "n": lambda v: _is_int(v) and v == 1,
    "best_of": lambda v: _is_int(v) and v == 1,
    "logprobs": lambda v: v is False or (_is_int(v) and v == 0),
    "top_logprobs": lambda v: _is_int(v) and v == 0,
    "echo": lambda v: v is False,
    "suffix": lambda v: v == "",
    "presence_penalty": lambda v: _is_number(v) and v == 0,
    "frequency_penalty": lambda v: _is_number(v) and v == 0,
    "repetition_penalty": lambda v: _is_number(v) and v == 1,
    "logit_bias": lambda v: v == {},
    "tools": lambda v: v == [],
    "functions": lambda v: v == [],
    "tool_choice": lambda v: v == "none",
    "function_call": lambda v: v == "none",
    "response_format": lambda v: v == {"type": "text"},
    "modalities": lambda v: v == ["text"],
    "audio": lambda v: False,
    "prediction": lambda v: False,
    "reasoning_effort": lambda v: False,
    "verbosity": lambda v: False,
    "web_search_options": lambda v: False,
}
_SERVED_COMMON = frozenset({"model", "max_tokens", "temperature", "top_p", "seed", "stop", "stream",
                            "stream_options", "keep_alive"})
CHAT_FIELDS = _SERVED_COMMON | {"messages", "max_completion_tokens"}
COMPLETION_FIELDS = _SERVED_COMMON | {"prompt"}
_CHAT_ONLY_OFF = {"top_logprobs", "tools", "functions", "tool_choice", "function_call", "response_format",
                  "modalities", "audio", "prediction", "reasoning_effort", "verbosity", "web_search_options",
                  "parallel_tool_calls", "store", "metadata", "service_tier", "prompt_cache_key", "safety_identifier"}
_COMPLETION_ONLY_OFF = {"best_of", "echo", "suffix"}


@dataclass
class Parsed:
    """A request ready to run: what to generate, and how to answer."""

    kind: str              # "chat" or "completion"
    request: InferRequest
    stream: bool
    include_usage: bool


def parse_chat(body: Any) -> Parsed:
    return _parse(body, "chat")


def parse_completion(body: Any) -> Parsed:
    return _parse(body, "completion")


def _parse(body: Any, kind: str) -> Parsed:
    if not isinstance(body, dict):
        raise invalid("the request body must be a JSON object")
    fields = {k: v for k, v in body.items() if v is not None}
    served = CHAT_FIELDS if kind == "chat" else COMPLETION_FIELDS
    other_only = _COMPLETION_ONLY_OFF if kind == "chat" else _CHAT_ONLY_OFF | {"max_completion_tokens"}
    for key in sorted(fields):
        if key in served:
            continue
        if key in other_only:
            where = "/v1/completions" if kind == "chat" else "/v1/chat/completions"
            raise invalid(f"{key!r} is not a field of this endpoint (it belongs to {where})", key)
        if key in IGNORED:
            continue
        if key in _OFF:
            if not _OFF[key](fields[key]):
                raise invalid(f"{key} = {fields[key]!r} is not supported by sllmd", key)
            continue
        raise invalid(f"unknown field {key!r}", key)

    model = _model(fields)
    stream = _bool(fields, "stream", False)
    include_usage = _stream_options(fields, stream)
    sampling = _sampling(fields, kind)
    keep_alive = _keep_alive(fields)
    if kind == "chat":
        if "messages" not in fields:
            raise invalid("'messages' is required", "messages")
        req = InferRequest(model=model, messages=_messages(fields["messages"]), sampling=sampling,
                           keep_alive=keep_alive)
    else:
        if "prompt" not in fields:
            raise invalid("'prompt' is required", "prompt")
        req = InferRequest(model=model, prompt=_prompt(fields["prompt"]), raw=True, sampling=sampling,
                           keep_alive=keep_alive)
    try:
        req.validate()
    except InvalidRequestError as e:   # our checks above name the field first; this is the last word
        raise http_error(e) from None
    return Parsed(kind, req, stream, include_usage)


def _utf8(text: str, where: str) -> str:
    """`text` if it can be encoded (JSON's \\ud800 escapes can spell lone surrogates, which no tokenizer takes)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise invalid(f"{where} holds a lone surrogate (not Unicode text)", where) from None
    return text


def _model(fields: dict) -> str:
    model = fields.get("model")
    if model is None:
        raise invalid("'model' is required", "model")
    if not isinstance(model, str) or not model:
        raise invalid("'model' must be a non-empty string", "model")
    if not names.is_valid(model):   # no such name can exist in the store
        raise http_error(ModelNotFoundError(f"no model named {model!r}"), "model")
    return model


def _bool(fields: dict, key: str, default: bool) -> bool:
    value = fields.get(key, default)
    if not isinstance(value, bool):
        raise invalid(f"'{key}' must be a boolean", key)
    return value


def _stream_options(fields: dict, stream: bool) -> bool:
    options = fields.get("stream_options")
    if options is None:
        return False
    if not isinstance(options, dict):
        raise invalid("'stream_options' must be an object", "stream_options")
    if not stream:
        raise invalid("'stream_options' is only allowed when 'stream' is true", "stream_options")
    for key, value in options.items():
        if key == "include_usage":
            if value is not None and not isinstance(value, bool):
                raise invalid("'stream_options.include_usage' must be a boolean", "stream_options.include_usage")
        elif key == "include_obfuscation":
            if value not in (None, False):
                raise invalid("stream_options.include_obfuscation is not supported by sllmd",
                              "stream_options.include_obfuscation")
        else:
            raise invalid(f"unknown field 'stream_options.{key}'", f"stream_options.{key}")
    return bool(options.get("include_usage"))


def _sampling(fields: dict, kind: str) -> SamplingParams:
    max_tokens = _positive_int(fields, "max_tokens")
    if kind == "chat":
        newer = _positive_int(fields, "max_completion_tokens")
        if newer is not None and max_tokens is not None and newer != max_tokens:
            raise invalid("'max_tokens' and 'max_completion_tokens' disagree; give one",
                          "max_completion_tokens")
        max_tokens = newer if newer is not None else max_tokens
    temperature = fields.get("temperature", OPENAI_TEMPERATURE)
    if not _is_number(temperature) or not 0 <= temperature <= MAX_TEMPERATURE:
        raise invalid(f"'temperature' must be a number in [0, {MAX_TEMPERATURE:g}]", "temperature")
    top_p = fields.get("top_p", 1.0)
    if not _is_number(top_p) or not 0 < top_p <= 1:
        raise invalid("'top_p' must be a number in (0, 1]", "top_p")
    seed = fields.get("seed")
    if seed is not None:
        if not _is_int(seed) or not -(2**63) <= seed < 2**64:
            raise invalid("'seed' must be a 64-bit integer", "seed")
        seed %= 2**64   # a negative seed names a stream as well as any other
    stop = fields.get("stop", ())
    if isinstance(stop, str):
        stop = (stop,)
    if not isinstance(stop, list | tuple) or not all(isinstance(s, str) and s for s in stop):
        raise invalid("'stop' must be a non-empty string or a list of them", "stop")
    stop = [_utf8(s, "stop") for s in stop]
    return SamplingParams(temperature=float(temperature), top_p=float(top_p), seed=seed,
                          max_tokens=SamplingParams.max_tokens if max_tokens is None else max_tokens,
                          stop=tuple(stop))


def _positive_int(fields: dict, key: str) -> int | None:
    value = fields.get(key)
    if value is None:
        return None
    if not _is_int(value) or value < 1:
        raise invalid(f"'{key}' must be an integer >= 1", key)
    return value


def _keep_alive(fields: dict) -> float | None:
    value = fields.get("keep_alive")
    if value is None:
        return None
    if not isinstance(value, str | int | float) or isinstance(value, bool):
        raise invalid("'keep_alive' must be seconds or a duration such as \"5m\"", "keep_alive")
    try:
        seconds = parse_duration(value)
    except ConfigError as e:
        raise invalid(f"keep_alive: {e}", "keep_alive") from None
    return -1.0 if math.isinf(seconds) and seconds > 0 else seconds


def _messages(messages: Any) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise invalid("'messages' must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise invalid(f"{where} must be an object", where)
        m = {k: v for k, v in m.items() if v is not None}
        role = m.get("role")
        if not isinstance(role, str):
            raise invalid(f"{where}.role must be a string", f"{where}.role")
        if role not in ROLES:
            raise invalid(f"{where}.role {role!r} is not supported by sllmd (system, developer, user, assistant)",
                          f"{where}.role")
        for key in m:
            if key not in ("role", "content", "name"):
                raise invalid(f"{where}.{key} is not supported by sllmd", f"{where}.{key}")
        if "name" in m and not isinstance(m["name"], str):
            raise invalid(f"{where}.name must be a string", f"{where}.name")
        out.append({"role": ROLES[role], "content": _content(m.get("content", ""), f"{where}.content")})
    return out


def _content(content: Any, where: str) -> str:
    """A message's text: a string, or a list of text parts (joined by newlines, as vLLM does)."""
    if isinstance(content, str):
        return _utf8(content, where)
    if not isinstance(content, list):
        raise invalid(f"{where} must be a string or a list of text parts", where)
    texts = []
    for j, part in enumerate(content):
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            raise invalid(f"{where}[{j}] must be an object with a type", f"{where}[{j}]")
        if part["type"] != "text":
            raise invalid(f"{where}[{j}].type {part['type']!r} is not supported by sllmd (text only)",
                          f"{where}[{j}].type")
        if not isinstance(part.get("text"), str):
            raise invalid(f"{where}[{j}].text must be a string", f"{where}[{j}].text")
        texts.append(_utf8(part["text"], f"{where}[{j}].text"))
    return "\n".join(texts)


def _prompt(prompt: Any) -> str:
    if isinstance(prompt, str):
        return _utf8(prompt, "prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        return _utf8(prompt[0], "prompt")
    if isinstance(prompt, list) and all(isinstance(p, str) for p in prompt):
        raise invalid("a list of several prompts (a batch) is not supported by sllmd: send one request each",
                      "prompt")
    raise invalid("'prompt' must be a string (token-id prompts are not supported by sllmd)", "prompt")


__all__ = ["Parsed", "parse_chat", "parse_completion", "HttpError"]
