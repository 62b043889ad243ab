"""Live migration's engine pieces in one process: a request stopped at a token boundary hands over
its state, and another instance's running batch continues it exactly (fp32 tiny models)."""
from __future__ import annotations

import pytest

from sllmd.inference.engine import Instance
from test_batching_engine import _Background, alone, model_for, request
from test_inference import tiny_tokenizer

LONG = 400   # tokens: a request this long is still running whenever a test hands it over


@pytest.fixture(scope="module")
def tok():
    """The tiny tokenizer without an end token: with an end-less model, a request runs to max_tokens."""
    t = tiny_tokenizer()
    t.eos_token = None
    return t


def endless(tok, **kw):
    return model_for(tok, max_position_embeddings=100_000, eos_token_id=None, **kw)


@pytest.mark.parametrize("sampling", [dict(), dict(temperature=0.8, seed=11)], ids=["greedy", "seeded"])
def test_a_handed_over_request_continues_exactly_on_another_instance(tok, sampling):
    model = endless(tok)
    req = request("a long story about migrating birds", max_tokens=LONG, **sampling)
    full_ids, full_text = alone(model, tok, req)
    source = Instance("m", model, tok, device="cpu", nbytes=0, max_batch=4)
    dest = Instance("m", model, tok, device="cpu", nbytes=0, max_batch=4)
    try:
        busy = _Background(dest)                  # the destination is serving a batch already
        handle = source.submit(req)
        events = iter(handle)
        before = [next(events) for _ in range(7)]
        assert source.find(req.request_id) is handle
        state = source.handoff(handle, timeout=30)
        rest = list(events)
        assert rest and rest[-1]["type"] == "migrated" and rest[-1]["state"] is state
        before += rest[:-1]                        # tokens sampled before the boundary still arrive
        assert state.output_ids == [e["token_id"] for e in before if e["token_id"] is not None]
        assert source.find(req.request_id) is None and source.active == 0
        after = list(dest.resume(state))
        busy.stop()
    finally:
        assert source.close(timeout=10) and dest.close(timeout=10)
    tokens = [e for e in before + after if e["type"] == "token"]
    assert [e["token_id"] for e in tokens if e["token_id"] is not None] == full_ids
    assert "".join(e["text"] for e in tokens) == full_text
    assert after[-1]["type"] == "done" and after[-1]["stats"]["resumed_at"] == len(state.output_ids)


def test_a_queued_request_hands_over_its_prompt(tok):
    model = endless(tok)
    inst = Instance("m", model, tok, device="cpu", nbytes=0, max_batch=1)
    try:
        busy = _Background(inst)                   # holds the only batch slot
        handle = inst.submit(request("waiting"))
        state = inst.handoff(handle, timeout=30)
        assert state is not None and state.output_ids == [] and state.prompt_ids
        assert [e["type"] for e in handle] == ["migrated"]
        busy.stop()
    finally:
        assert inst.close(timeout=10)


def test_a_request_that_finished_first_hands_over_nothing(tok):
    model = model_for(tok)
    inst = Instance("m", model, tok, device="cpu", nbytes=0, max_batch=2)
    try:
        handle = inst.submit(request("short", max_tokens=2))
        events = list(handle)
        assert events[-1]["type"] == "done"
        assert inst.handoff(handle, timeout=1) is None
        assert inst.find(handle.request.request_id) is None
    finally:
        assert inst.close(timeout=10)


def test_rounds_parked_ahead_leave_only_the_last_tokens_to_prefill_at_the_handoff(tok):
    model = endless(tok)
    req = request("the rounds of a live migration", max_tokens=LONG)
    full_ids, full_text = alone(model, tok, req)
    source = Instance("m", model, tok, device="cpu", nbytes=0, max_batch=4)
    dest = Instance("m", model, tok, device="cpu", nbytes=0, max_batch=4, prefill_chunk=8)
    try:
        handle = source.submit(req)
        events = iter(handle)
        before = [next(events) for _ in range(20)]
        first_round = list(handle.state.all_ids)
        assert dest.park(req.request_id, first_round[:-1], timeout=30)["parked"] == len(first_round) - 1
        before += [next(events) for _ in range(10)]
        second = list(handle.state.all_ids)                  # the next round adds only the new tokens
        assert dest.park(req.request_id, second[:-1], timeout=30)["parked"] == len(second) - 1
        state = source.handoff(handle, timeout=30)
        before += [e for e in events if e["type"] == "token"]
        after = list(dest.resume(state))
    finally:
        assert source.close(timeout=10) and dest.close(timeout=10)
    tokens = [e for e in before + after if e["type"] == "token"]
    assert [e["token_id"] for e in tokens] == full_ids and "".join(e["text"] for e in tokens) == full_text
    behind = len(state.all_ids) - (len(second) - 1)          # what the handoff itself had to prefill
    assert after[-1]["stats"]["prefill_chunks"] == -(-behind // 8)


def test_a_parked_prefix_that_does_not_match_the_state_is_not_used(tok):
    model = endless(tok)
    req = request("mismatch", max_tokens=LONG)
    full_ids, _ = alone(model, tok, req)
    source = Instance("m", model, tok, device="cpu", nbytes=0, max_batch=2)
    dest = Instance("m", model, tok, device="cpu", nbytes=0, max_batch=2)
    try:
        handle = source.submit(req)
        events = iter(handle)
        before = [next(events) for _ in range(3)]
        state = source.handoff(handle, timeout=30)
        before += [e for e in events if e["type"] == "token"]
        dest.park(req.request_id, [5, 6, 7, 8], timeout=30)     # not this request's tokens
        after = list(dest.resume(state))
    finally:
        assert source.close(timeout=10) and dest.close(timeout=10)
    assert [e["token_id"] for e in before + after if e["type"] == "token"] == full_ids
