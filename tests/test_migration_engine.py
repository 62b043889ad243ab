"""Live migration's engine pieces in one process: a request stopped at a token boundary hands over
its state, and another instance's running batch continues it exactly (fp32 tiny models)."""
from __future__ import annotations

import pytest

from sllmd.inference.engine import Instance
from test_batching_engine import _Background, alone, model_for, request, tok  # noqa: F401  (fixture)


@pytest.mark.parametrize("sampling", [dict(), dict(temperature=0.8, seed=11)], ids=["greedy", "seeded"])
def test_a_handed_over_request_continues_exactly_on_another_instance(tok, sampling):
    model = model_for(tok, max_position_embeddings=100_000)
    req = request("a long story about migrating birds", max_tokens=40, **sampling)
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
    model = model_for(tok)
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
