"""Continuous batching in-process: the batch's KV cache (batch.BatchKV) and an
instance stepping many requests together (engine.Instance, max_batch > 1), on
fp32 tiny models. The same behaviour through a real sllmd is in
test_batching_daemon.py."""
from __future__ import annotations

import threading

import pytest
import torch

from conftest import TINY_KINDS, make_tiny_model
from test_inference import tiny_tokenizer
from sllmd.errors import RequestCancelledError
from sllmd.inference import InferRequest, RequestState, SamplingParams
from sllmd.inference.batch import BatchKV, kv_bytes_per_token, supported
from sllmd.inference.decode import build_prompt_ids, decode_one_token, new_cache, prefill, stop_token_ids
from sllmd.inference.engine import Instance
from sllmd.inference.generation import Generation
from sllmd.inference.tokenizer_lock import LockedTokenizer

PROMPTS = ["héllo", "The capital of France is", "日本語のテキスト 🙂", "wörld " * 9, "Paris", "🙂🚀 ∑∫ " * 4,
           "system user assistant", "ça"]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def model_for(tok, kind="llama", **overrides):
    return make_tiny_model(kind, vocab_size=len(tok), **overrides)


def alone(model, tok, req: InferRequest) -> tuple[list[int], str]:
    """The request served by itself: the reference a batched run must equal."""
    state = RequestState(req.request_id, req.model, req.sampling, build_prompt_ids(tok, req))
    gen = Generation(model, tok, state)
    text = []
    while (ev := gen.step()) is not None:
        text.append(ev["text"])
        if gen.finished:
            break
    return state.output_ids, "".join(text)


def collect(handle) -> tuple[list[int], str, dict]:
    events = list(handle)
    tokens = [e for e in events if e["type"] == "token"]
    return [e["token_id"] for e in tokens], "".join(e["text"] for e in tokens), events[-1]


def request(prompt: str, max_tokens: int = 12, **sampling) -> InferRequest:
    return InferRequest("m", prompt=prompt, sampling=SamplingParams(max_tokens=max_tokens, **sampling))


class _Background:
    """A long request that keeps the batch running while a test's requests join it."""

    def __init__(self, inst: Instance):
        self.handle = inst.submit(request("x", max_tokens=50_000))
        self.it = iter(self.handle)
        next(self.it)  # it decodes now

    def stop(self) -> None:
        self.it.close()


# --- the batch's KV cache ------------------------------------------------------------------------
@pytest.mark.parametrize("kind", TINY_KINDS)
def test_batch_rows_compute_what_each_request_computes_alone(kind):
    torch.manual_seed(1)
    model = make_tiny_model(kind)
    assert supported(model)
    prompts = [torch.randint(3, 250, (n,)).tolist() for n in (5, 17, 9, 30)]
    ref = []
    with torch.inference_mode():
        for p in prompts:
            cache = new_cache(model)
            logits = [prefill(model, p, cache)]
            out = [int(logits[-1].argmax())]
            for _ in range(10):
                logits.append(decode_one_token(model, out[-1], cache))
                out.append(int(logits[-1].argmax()))
            ref.append(logits)
        kv, outs, rows = BatchKV(model), [], []
        for step in range(10):
            if step in (0, 3):  # two join at once, two more later
                for i in ((0, 1) if step == 0 else (2, 3)):
                    cache = new_cache(model)
                    logits = prefill(model, prompts[i], cache)
                    kv.add(cache, len(prompts[i]))
                    outs.append([int(logits.argmax())])
                    rows.append(i)
            if step == 6:  # the longest leaves: the others go on
                kv.remove([rows.index(3)])
                del outs[rows.index(3)]
                rows.remove(3)
            logits = kv.decode([o[-1] for o in outs])
            for r, (i, o) in enumerate(zip(rows, outs)):
                torch.testing.assert_close(logits[r], ref[i][len(o)], rtol=0, atol=1e-4)
                o.append(int(logits[r].argmax()))
        assert kv.width == max(len(prompts[i]) + len(o) - 1 for i, o in zip(rows, outs))


def test_kv_bytes_per_token_matches_the_cache(tok):
    model = model_for(tok)
    cache = new_cache(model)
    with torch.inference_mode():
        prefill(model, [3, 4, 5], cache)
    held = sum(layer.keys.numel() * layer.keys.element_size() * 2 for layer in cache.layers)
    assert kv_bytes_per_token(model) * 3 == held


# --- an instance serving a batch -----------------------------------------------------------------
@pytest.mark.parametrize("kind", TINY_KINDS)
def test_eight_concurrent_greedy_requests_equal_their_answers_alone(tok, kind):
    model = model_for(tok, kind, max_position_embeddings=100_000)
    reqs = [request(p, max_tokens=6 + 3 * i) for i, p in enumerate(PROMPTS)]
    expected = [alone(model, tok, r) for r in reqs]
    inst = Instance("m", model, tok, device="cpu", nbytes=0, max_batch=9)
    try:
        bg = _Background(inst)  # they all join a running batch
        handles = [inst.submit(r) for r in reqs]
        results = [collect(h) for h in handles]
        bg.stop()
    finally:
        assert inst.close(timeout=10)
    for (ids, text, done), (want_ids, want_text) in zip(results, expected):
        assert (ids, text) == (want_ids, want_text)
        assert done["stats"]["batch_size"] >= 2 and done["stats"]["tokens"] == len(want_ids)


def test_a_joining_request_streams_before_the_batch_finishes(tok):
    model = model_for(tok, max_position_embeddings=100_000)
    inst = Instance("m", model, tok, device="cpu", nbytes=0, max_batch=4)
    try:
        others = [inst.submit(request(p, max_tokens=3000)) for p in PROMPTS[:3]]
        iters = [iter(h) for h in others]
        for it in iters:
            next(it)
        joiner = inst.submit(request("Paris", max_tokens=4))
        stream = iter(joiner)
        first = next(stream)
        assert first["type"] == "token"
        assert not any(h.done.is_set() for h in others)
        done = list(stream)[-1]
        assert done["stats"]["batch_size"] == 4
        for it in iters:
            it.close()
    finally:
        assert inst.close(timeout=10)


def test_cancelling_one_request_leaves_the_others_unchanged(tok):
    model = model_for(tok, max_position_embeddings=100_000)
    reqs = [request(p, max_tokens=20) for p in PROMPTS[:4]]
    expected = [alone(model, tok, r) for r in reqs]
    inst = Instance("m", model, tok, device="cpu", nbytes=0, max_batch=4)
    try:
        bg = _Background(inst)
        handles = [inst.submit(r) for r in reqs]
        victim = iter(handles[1])
        for _ in range(3):
            next(victim)
        victim.close()  # its client goes away mid-stream
        results = {i: collect(handles[i]) for i in (0, 2, 3)}
        bg.stop()
        with pytest.raises(RequestCancelledError):
            list(handles[1])
    finally:
        assert inst.close(timeout=10)
    assert handles[1].finish_reason == "cancelled"
    for i, (ids, text, _) in results.items():
        assert (ids, text) == expected[i]


def test_seeded_sampling_is_the_same_alone_and_in_a_batch(tok):
    model = model_for(tok, max_position_embeddings=100_000)
    reqs = [request(p, max_tokens=16, temperature=0.9, top_p=0.95, seed=100 + i) for i, p in enumerate(PROMPTS[:5])]
    expected = [alone(model, tok, r) for r in reqs]
    inst = Instance("m", model, tok, device="cpu", nbytes=0, max_batch=8)
    try:
        bg = _Background(inst)
        results = [collect(h)[:2] for h in [inst.submit(r) for r in reqs]]
        bg.stop()
    finally:
        assert inst.close(timeout=10)
    assert results == [(ids, text) for ids, text in expected]


def test_each_request_keeps_its_stop_strings_and_max_tokens(tok):
    model = model_for(tok, max_position_embeddings=100_000)
    free = alone(model, tok, request("héllo", max_tokens=30))[1]
    stop = free[len(free) // 2:len(free) // 2 + 2]
    assert stop
    reqs = [request("héllo", max_tokens=30, stop=(stop,)), request("héllo", max_tokens=5), request("Paris", 30)]
    expected = [alone(model, tok, r)[1] for r in reqs]
    inst = Instance("m", model, tok, device="cpu", nbytes=0, max_batch=4)
    try:
        results = [collect(h) for h in [inst.submit(r) for r in reqs]]
    finally:
        assert inst.close(timeout=10)
    assert [text for _, text, _ in results] == expected
    assert stop not in results[0][1] and results[0][2]["stats"]["finish_reason"] == "stop"
    assert results[1][2]["stats"]["tokens"] == 5


@pytest.mark.parametrize("sampling", [dict(), dict(temperature=0.8, seed=11)], ids=["greedy", "seeded"])
def test_resume_from_state_inside_a_running_batch_continues_exactly(tok, sampling):
    model = model_for(tok, max_position_embeddings=100_000)
    req = request("日本語のテキスト 🙂", max_tokens=24, **sampling)
    full_ids, full_text = alone(model, tok, req)
    state = RequestState(req.request_id, "m", req.sampling, build_prompt_ids(tok, req))
    gen = Generation(model, tok, state)
    for _ in range(9):  # stopped mid-generation, as migration stops it after a token
        gen.step()
    snap = gen.snapshot()
    inst = Instance("m", model, tok, device="cpu", nbytes=0, max_batch=4)
    try:
        bg = _Background(inst)
        ids, text, done = collect(inst.resume(snap))
        bg.stop()
    finally:
        assert inst.close(timeout=10)
    assert snap.output_ids + ids == full_ids
    assert snap.emitted_text + text == full_text
    assert done["stats"]["batch_size"] == 2 and done["stats"]["tokens"] == len(full_ids) - 9


class _Budget:
    """A KV budget of a fixed size (the device tier's part, engine.KvBudget)."""

    def __init__(self, nbytes: int):
        self.free, self.lock, self.refused = nbytes, threading.Lock(), 0

    def try_reserve(self, n: int) -> bool:
        with self.lock:
            if n > self.free:
                self.refused += 1
                return False
            self.free -= n
            return True

    def release(self, n: int) -> None:
        with self.lock:
            self.free += n


def test_a_batch_without_kv_room_queues_the_newcomer_and_runs_it_later(tok):
    model = model_for(tok, max_position_embeddings=100_000)
    per_token = kv_bytes_per_token(model)
    budget = _Budget(per_token * 10)  # no room for a second row of 50,000 tokens
    inst = Instance("m", model, tok, device="cpu", nbytes=0, max_batch=4, kv_budget=budget)
    try:
        bg = _Background(inst)
        waiting = inst.submit(request("Paris", max_tokens=4))
        while budget.refused == 0:
            threading.Event().wait(0.005)
        assert inst.active == 1 and inst.queued == 1  # queued, not failed: the running request goes on
        assert [r["state"] for r in inst.requests()] == ["running", "queued"]
        bg.stop()
        ids, text, done = collect(waiting)
        assert done["stats"]["tokens"] == 4
        assert (ids, text) == alone(model, tok, request("Paris", max_tokens=4))
    finally:
        assert inst.close(timeout=10)
    assert budget.free == per_token * 10 and inst.kv_reserved == 0


def test_kv_reservation_grows_with_the_batch_and_is_given_back(tok):
    model = model_for(tok, max_position_embeddings=100_000)
    per_token = kv_bytes_per_token(model)
    budget = _Budget(1 << 40)
    inst = Instance("m", model, tok, device="cpu", nbytes=0, max_batch=4, kv_budget=budget)
    try:
        bg = _Background(inst)  # its prompt + 50,000 tokens: the instance's own row
        assert inst.kv_reserved == 0
        longest = len(bg.handle.prompt_ids) + 50_000
        h = inst.submit(request("Paris", max_tokens=4))
        it = iter(h)
        next(it)
        assert inst.kv_reserved == longest * per_token  # the second row, padded to the longest
        list(it)
        bg.stop()
    finally:
        assert inst.close(timeout=10)
    assert inst.kv_reserved == 0 and budget.free == 1 << 40


def test_the_tokenizer_is_safe_from_many_threads(tok):
    locked = LockedTokenizer(tok)
    text = "héllo wörld 日本語のテキスト 🙂 " * 20
    want = tok.encode(text)
    errors = []

    def worker():
        try:
            for _ in range(200):
                assert locked.encode(text) == want
                locked.decode(want)
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert LockedTokenizer(locked).inner is tok and LockedTokenizer(locked).lock is locked.lock
    assert stop_token_ids(None, locked) == stop_token_ids(None, tok)
