"""One request running on a model, a token per step.

`Generation.step()` is the decode loop's body: the first step prefills every
known token (the prompt, or a migrated request's prompt and output so far), in
chunks, and samples; later steps feed the last token through the KV cache and
sample. The caller (an instance's worker) steps until the request finishes,
checking for cancellation between tokens; `should_stop` is also asked between
prefill chunks, so a cancel lands within one chunk of a long prompt.

In a batch (engine.Instance) the pieces are used apart: `prefill_next()` runs
one chunk at a time into the request's own cache (the engine decodes the batch
between chunks), and `accept(logits)` samples from the request's row of the
batch's logits with the request's own generator, stop strings and detokenizer.

The end-of-sequence token ends the request without being emitted: it has no
token event (unless it releases held-back text, then with token_id None) and
does not count in `emitted_tokens`.
"""
from __future__ import annotations

import copy
from typing import Any, Callable

import torch

from .decode import (PREFILL_CHUNK_TOKENS, context_limit, decode_one_token, finish_reason, generator_state,
                     new_cache, new_generator, prefill, prefill_spans, sample, stop_token_ids)
from .request import RequestState
from .text import IncrementalDetokenizer, StopStrings


class Generation:
    def __init__(self, model, tokenizer, state: RequestState, eos: frozenset[int] | None = None,
                 prefill_chunk: int = PREFILL_CHUNK_TOKENS, warm: tuple[Any, int] | None = None):
        """warm: (a KV cache holding the first n of the state's tokens, n), e.g. what a live
        migration's rounds prefilled here already: only the tokens after them are prefilled."""
        if not state.prompt_ids:
            raise ValueError("a request needs at least one prompt token")
        self.model, self.tokenizer, self.state = model, tokenizer, state
        self.eos = stop_token_ids(model, tokenizer) if eos is None else eos
        self.limit = context_limit(model)
        self.gen = new_generator(state.sampling, state.rng_state)
        self.cache, self.prefilled = warm if warm is not None else (new_cache(model), 0)
        if not 0 <= self.prefilled < len(state.all_ids):
            raise ValueError("a warm cache must leave at least one of the state's tokens to prefill")
        # A resumed request continues streaming exactly where its snapshot stopped.
        self.detok = IncrementalDetokenizer(tokenizer, state.all_ids, state.detok_offsets)
        self.stops = StopStrings(state.sampling.stop)
        self.stops.pending = state.held_text
        self.started = False
        self.prefill_chunk = prefill_chunk
        self.prefill_chunks_total = len(prefill_spans(self.prefilled, len(state.all_ids), prefill_chunk))
        self.prefill_chunks_done = 0

    @property
    def finished(self) -> bool:
        return self.state.finished

    @property
    def emitted_tokens(self) -> int:
        """Output tokens, the end-of-sequence token that ended the request not counted."""
        out = self.state.output_ids
        return len(out) - 1 if out and self.state.finish_reason == "stop" and out[-1] in self.eos else len(out)

    def _prefill(self, should_stop: Callable[[], bool] | None) -> torch.Tensor | None:
        """Prefills every known token chunk by chunk; None when should_stop() said so between chunks."""
        logits = None
        for lo, hi in prefill_spans(self.prefilled, len(self.state.all_ids), self.prefill_chunk):
            if should_stop is not None and should_stop():
                return None
            logits = prefill(self.model, self.state.all_ids[lo:hi], self.cache)
            self.prefill_chunks_done += 1
        return logits

    def prefill_next(self) -> torch.Tensor | None:
        """Runs the next prefill chunk into this request's own cache; the next-token
        logits [V] once the last chunk ran, else None (more chunks to go)."""
        spans = prefill_spans(self.prefilled, len(self.state.all_ids), self.prefill_chunk)
        lo, hi = spans[self.prefill_chunks_done]
        with torch.inference_mode():
            logits = prefill(self.model, self.state.all_ids[lo:hi], self.cache)
        self.prefill_chunks_done += 1
        if self.prefill_chunks_done < len(spans):
            return None
        self.started = True
        return logits

    @property
    def next_chunk_tokens(self) -> int:
        """Tokens the next prefill_next() runs (0 once the prefill is done)."""
        spans = prefill_spans(self.prefilled, len(self.state.all_ids), self.prefill_chunk)
        if self.prefill_chunks_done >= len(spans):
            return 0
        lo, hi = spans[self.prefill_chunks_done]
        return hi - lo

    @property
    def at_limit(self) -> bool:
        """The context is full: the request ends ("length") without another token."""
        return self.limit is not None and len(self.state.all_ids) >= self.limit

    def step(self, should_stop: Callable[[], bool] | None = None) -> dict[str, Any] | None:
        """Produces the next token event, or None once the request has finished
        (finish_reason "cancelled" when should_stop() stopped the prefill)."""
        st = self.state
        if st.finished:
            return None
        if self.at_limit:
            st.finish_reason = "length"
            return None
        with torch.inference_mode():
            if not self.started:
                logits = self._prefill(should_stop)
                if logits is None:
                    st.finish_reason = "cancelled"
                    return None
                self.started = True
            else:
                logits = decode_one_token(self.model, st.output_ids[-1], self.cache)
        return self.accept(logits)

    def accept(self, logits: torch.Tensor) -> dict[str, Any] | None:
        """Samples the next token from its logits [V] (from this request's own step or its
        row of a batch's), records it, and returns its token event (None: an
        end-of-sequence token with no text to release)."""
        st = self.state
        token = sample(logits, st.sampling, self.gen)
        st.output_ids.append(token)
        reason = finish_reason(token, len(st.output_ids), len(st.all_ids), self.eos, st.sampling.max_tokens,
                               self.limit)
        text = "" if token in self.eos else self.stops.feed(self.detok.push(token))
        if self.stops.stopped:
            reason = "stop"
        elif reason is not None:
            text += self.stops.feed(self.detok.flush())
            text += self.stops.flush()
        st.emitted_text += text
        st.finish_reason = reason
        if token in self.eos:
            return {"type": "token", "text": text, "token_id": None} if text else None
        return {"type": "token", "text": text, "token_id": token}

    def snapshot(self) -> RequestState:
        """A copy of the request's whole state, sampler position included (for migration)."""
        snap = copy.deepcopy(self.state)
        snap.rng_state = generator_state(self.gen)
        snap.detok_offsets = self.detok.offsets
        snap.held_text = self.stops.pending
        return snap
