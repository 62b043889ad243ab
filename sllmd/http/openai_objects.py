"""The OpenAI response objects: a whole completion, a stream chunk, usage, a model.

`id` is the request's id (InferRequest.request_id, what `sllmctl requests`
lists); `usage` and `finish_reason` come from the done event's stats (the
prompt's token count, the tokens generated, "stop" or "length").
"""
from __future__ import annotations

import json

FINISH_REASONS = {"stop": "stop", "length": "length"}


def finish_reason(stats: dict | None) -> str | None:
    reason = (stats or {}).get("finish_reason")
    return FINISH_REASONS.get(reason, reason)


def usage(stats: dict | None) -> dict:
    stats = stats or {}
    prompt = int(stats.get("prompt_tokens") or 0)
    completion = int(stats.get("tokens") or 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def completion(kind: str, request_id: str, model: str, created: int, text: str, stats: dict | None) -> dict:
    """The non-streaming answer: a chat.completion or a text_completion."""
    if kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                  "logprobs": None, "finish_reason": finish_reason(stats)}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason(stats)}
        obj = "text_completion"
    return {"id": request_id, "object": obj, "created": created, "model": model, "choices": [choice],
            "usage": usage(stats)}


class ChunkWriter:
    """The server-sent events of one streamed answer, as bytes ready to send."""

    def __init__(self, kind: str, request_id: str, model: str, created: int, include_usage: bool):
        self.kind, self.include_usage = kind, include_usage
        self._head = {"id": request_id, "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
                      "created": created, "model": model}

    def _event(self, choices: list, **extra) -> bytes:
        obj = dict(self._head, choices=choices, **extra)
        if self.include_usage and "usage" not in obj:
            obj["usage"] = None   # as OpenAI: every chunk but the last has usage null
        return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"

    def _choice(self, text: str | None, reason: str | None, role: bool = False) -> dict:
        if self.kind == "chat":
            delta: dict = {}
            if role:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
        return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}

    def start(self) -> bytes:
        """The first chunk of a chat stream (the assistant's role); a completion stream has none."""
        return self._event([self._choice("", None, role=True)]) if self.kind == "chat" else b""

    def text(self, text: str) -> bytes:
        return self._event([self._choice(text, None)])

    def finish(self, stats: dict | None) -> bytes:
        """The last chunks: the finish reason, usage (when asked for), then [DONE]."""
        out = self._event([self._choice(None if self.kind == "chat" else "", finish_reason(stats))])
        if self.include_usage:
            out += self._event([], usage=usage(stats))
        return out + DONE

    @staticmethod
    def error(body: dict) -> bytes:
        """An error after the stream began (the status was already sent): its body as one event."""
        return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n" + DONE


DONE = b"data: [DONE]\n\n"
