"""One request running on a model, a token per step.

`Generation.step()` is the decode loop's body: the first step prefills every
known token (the prompt, or a migrated request's prompt and output so far) and
samples; later steps feed the last token through the KV cache and sample. The
caller (an instance's worker) steps until the request finishes, checking for
cancellation between tokens.
"""
from __future__ import annotations

import copy
from typing import Any

import torch

from .decode import (context_limit, decode_one_token, finish_reason, generator_state, new_cache, new_generator,
                     prefill, sample, stop_token_ids)
from .request import RequestState
from .text import IncrementalDetokenizer, StopStrings


class Generation:
    def __init__(self, model, tokenizer, state: RequestState, eos: frozenset[int] | None = None):
        if not state.prompt_ids:
            raise ValueError("a request needs at least one prompt token")
        self.model, self.tokenizer, self.state = model, tokenizer, state
        self.eos = stop_token_ids(model, tokenizer) if eos is None else eos
        self.limit = context_limit(model)
        self.gen = new_generator(state.sampling, state.rng_state)
        self.cache = new_cache(model)
        # A resumed request continues streaming exactly where its snapshot stopped.
        self.detok = IncrementalDetokenizer(tokenizer, state.all_ids, state.detok_offsets)
        self.stops = StopStrings(state.sampling.stop)
        self.stops.pending = state.held_text
        self.started = False

    @property
    def finished(self) -> bool:
        return self.state.finished

    def step(self) -> dict[str, Any] | None:
        """Produces the next token event, or None once the request has finished."""
        st = self.state
        if st.finished:
            return None
        if self.limit is not None and len(st.all_ids) >= self.limit:
            st.finish_reason = "length"
            return None
        with torch.inference_mode():
            if not self.started:
                logits = prefill(self.model, st.all_ids, self.cache)
                self.started = True
            else:
                logits = decode_one_token(self.model, st.output_ids[-1], self.cache)
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
        return {"type": "token", "text": text, "token_id": token}

    def snapshot(self) -> RequestState:
        """A copy of the request's whole state, sampler position included (for migration)."""
        snap = copy.deepcopy(self.state)
        snap.rng_state = generator_state(self.gen)
        snap.detok_offsets = self.detok.offsets
        snap.held_text = self.stops.pending
        return snap
