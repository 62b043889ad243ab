"""Streaming text out of tokens: incremental detokenization that never emits
a broken UTF-8 character or the same text twice, and stop strings that are
matched across token boundaries and never leak into the output."""
from __future__ import annotations

from typing import Sequence

REPLACEMENT = "\ufffd"
CONTEXT_TOKENS = 6  # prompt tokens decoded along with the first output tokens (leading-space rules)


class IncrementalDetokenizer:
    """Turns token ids, one at a time, into text deltas.

    It decodes a short window twice: the tokens already turned into text
    (prefix..read) and the same window with the new tokens (prefix..end); the
    difference is new text. While the window ends inside a multi-byte
    character (the decode ends in U+FFFD), nothing is emitted until the
    character completes.
    """

    def __init__(self, tokenizer, context_ids: Sequence[int] = (), offsets: tuple[int, int] | None = None):
        """context_ids: the tokens before the first one pushed (the prompt, or a resumed
        request's whole token list); offsets: a snapshot's (prefix, read) into them,
        else the last CONTEXT_TOKENS of them are context and all of them are read."""
        self.tokenizer = tokenizer
        self.ids: list[int] = list(context_ids)
        if offsets is None:
            self.prefix, self.read = max(0, len(self.ids) - CONTEXT_TOKENS), len(self.ids)
        else:
            self.prefix, self.read = offsets
            if not 0 <= self.prefix <= self.read <= len(self.ids):
                raise ValueError(f"detokenizer offsets {offsets} do not fit {len(self.ids)} tokens")

    @property
    def offsets(self) -> tuple[int, int]:
        return self.prefix, self.read

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        return self._advance(final=False)

    def flush(self) -> str:
        """Whatever is still held back (an unfinished character decodes as U+FFFD)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        if self.read == len(self.ids):
            return ""
        before = self._decode(self.ids[self.prefix:self.read])
        after = self._decode(self.ids[self.prefix:])
        if len(after) > len(before) and (final or not after.endswith(REPLACEMENT)):
            delta = after[len(before):]  # `after` extends `before` (a longer decode of the same window)
            self.prefix, self.read = self.read, len(self.ids)
            return delta
        if final:
            self.prefix = self.read = len(self.ids)
        return ""


class StopStrings:
    """Holds back text that might be the start of a stop string; cuts the
    output before the first stop string that appears."""

    def __init__(self, stops: Sequence[str]):
        self.stops = tuple(s for s in stops if s)
        self.pending = ""
        self.stopped = False

    def feed(self, delta: str) -> str:
        """Text safe to emit now. After a stop string appears, `stopped` is set
        and the text before it is the last thing returned."""
        if self.stopped:
            return ""
        if not self.stops:
            return delta
        self.pending += delta
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending, self.stopped = self.pending[:min(hits)], "", True
            return out
        hold = self._held_suffix(self.pending)
        cut = len(self.pending) - hold
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out

    def flush(self) -> str:
        out, self.pending = ("" if self.stopped else self.pending), ""
        return out

    def _held_suffix(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
        best = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best
