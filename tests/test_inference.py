"""The decode loop and instances: KV-cache decoding equals full recomputation,
seeded sampling, stop tokens and strings, incremental detokenization, chat
templates, bounded queues, cancellation, and resuming a request from its state."""
from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from conftest import make_tiny_model
from daemon_helpers import DaemonProcess, remove_tree, short_tempdir, sllmctl
from sllmd.client import Client
from sllmd.inference import InferRequest, RequestState, SamplingParams
from sllmd.inference.decode import build_prompt_ids, sample, stop_token_ids
from sllmd.inference.engine import Instance
from sllmd.errors import BusyError, InstanceClosedError, InvalidRequestError, RequestCancelledError
from sllmd.inference.generation import Generation
from sllmd.inference.text import IncrementalDetokenizer, StopStrings

CORPUS = ["The capital of France is Paris.", "héllo wörld ünïcödé çà", "日本語のテキスト 🙂🚀 ∑∫",
          "user assistant system"] * 10
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tiny_tokenizer():
    """A byte-level BPE trained here (pad 0, bos 1, eos 2, like the tiny configs): multi-byte
    characters span several tokens, which is what incremental detokenization must survive."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    t = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|endoftext|>", bos_token="<|im_start|>",
                                eos_token="<|im_end|>")
    t.chat_template = CHAT_TEMPLATE
    return t


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def model_for(tok, kind="llama", seed=0, **overrides):
    return make_tiny_model(kind, seed=seed, vocab_size=len(tok), **overrides)


def run(model, tok, request: InferRequest) -> tuple[list[int], str, str]:
    state = RequestState("r", "m", request.sampling, build_prompt_ids(tok, request))
    gen = Generation(model, tok, state)
    text = ""
    while (ev := gen.step()) is not None:
        text += ev["text"]
    return state.output_ids, text, state.finish_reason


# --- requests ---------------------------------------------------------------------------
@pytest.mark.parametrize("fields, message", [
    ({}, "model"),
    ({"model": "m"}, "exactly one"),
    ({"model": "m", "prompt": "x", "messages": [{"role": "user", "content": "y"}]}, "exactly one"),
    ({"model": "m", "prompt": 3}, "prompt"),
    ({"model": "m", "messages": []}, "messages"),
    ({"model": "m", "messages": [{"role": "user"}]}, "role and content"),
    ({"model": "m", "prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"model": "m", "prompt": "x", "max_tokens": True}, "max_tokens"),
    ({"model": "m", "prompt": "x", "max_tokens": 1.5}, "max_tokens"),
    ({"model": "m", "prompt": "x", "temperature": -1}, "temperature"),
    ({"model": "m", "prompt": "x", "temperature": float("nan")}, "temperature"),
    ({"model": "m", "prompt": "x", "top_p": 0}, "top_p"),
    ({"model": "m", "prompt": "x", "top_p": 1.5}, "top_p"),
    ({"model": "m", "prompt": "x", "seed": -1}, "seed"),
    ({"model": "m", "prompt": "x", "seed": "7"}, "seed"),
    ({"model": "m", "prompt": "x", "stop": [""]}, "stop"),
    ({"model": "m", "prompt": "x", "stop": 5}, "stop"),
    ({"model": "m", "prompt": "x", "keep_alive": "5m"}, "keep_alive"),
    ({"model": "m", "prompt": "x", "chat": "yes"}, "chat"),
    ({"model": "m", "prompt": "x", "bogus": 1}, "unknown"),
])
def test_bad_requests_are_refused(fields, message):
    with pytest.raises(InvalidRequestError, match=message):
        InferRequest.from_dict(fields)


def test_request_defaults_and_wire_fields():
    r = InferRequest.from_dict({"model": "m", "prompt": "hi", "max_tokens": None, "temperature": None,
                                "stop": "END", "chat": False, "keep_alive": -1})
    assert r.raw and r.sampling.greedy and r.sampling.max_tokens == SamplingParams.max_tokens
    assert r.sampling.stop == ("END",) and r.keep_alive == -1
    assert InferRequest.from_dict(r.to_dict()).to_dict() == r.to_dict()


# --- text --------------------------------------------------------------------------------
@pytest.mark.parametrize("text", ["héllo wörld ünïcödé", "日本語のテキスト 🙂🚀 ∑∫", "The capital of France is Paris.",
                                  "🙂🙂🙂 mixed ascii 日本"])
def test_incremental_detokenizer_never_breaks_characters(tok, text):
    ids = tok.encode(text, add_special_tokens=False)
    singles = [tok.decode([i]) for i in ids]
    assert any("\ufffd" in s for s in singles) or text.isascii()  # the test really splits characters
    detok = IncrementalDetokenizer(tok, tok.encode("user: ", add_special_tokens=False))
    deltas = [detok.push(i) for i in ids] + [detok.flush()]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == text


def test_detokenizer_flush_gives_an_unfinished_character_as_replacement(tok):
    ids = tok.encode("🙂", add_special_tokens=False)
    assert len(ids) > 1
    detok = IncrementalDetokenizer(tok)
    assert detok.push(ids[0]) == ""
    assert detok.flush() == "\ufffd" * len(tok.decode(ids[:1]))


@pytest.mark.parametrize("stops, pieces, expected, stopped", [
    ((), ["ab", "cd"], ["ab", "cd"], False),
    (("END",), ["hello E", "N", "D more"], ["hello ", "", ""], True),
    (("END",), ["hello E", "NX"], ["hello ", "ENX"], False),        # a false start is released
    (("END",), ["xEN"], ["x"], False),                             # held: might become END
    (("\n\n", "###"), ["a\n", "b##", "#c"], ["a", "\nb", ""], True),  # "\n" is held, then released
    (("ab", "b"), ["xab"], ["x"], True),                           # the earliest stop string wins
])
def test_stop_strings(stops, pieces, expected, stopped):
    s = StopStrings(stops)
    assert [s.feed(p) for p in pieces] == expected
    assert s.stopped is stopped


def test_stop_strings_flush_releases_held_text():
    s = StopStrings(["END"])
    assert s.feed("abcEN") == "abc"
    assert s.flush() == "EN"


# --- decode loop -------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["llama", "gpt2", "opt"])
def test_kv_cache_decoding_equals_full_recomputation(tok, kind):
    model = model_for(tok, kind)
    req = InferRequest("m", prompt="The capital of France", sampling=SamplingParams(max_tokens=12))
    ids, _, _ = run(model, tok, req)
    # The reference: no cache, the whole sequence through the model for every token.
    seq = build_prompt_ids(tok, req)
    expected = []
    with torch.inference_mode():
        for _ in range(len(ids)):
            nxt = int(model(torch.tensor([seq])).logits[0, -1].argmax())
            expected.append(nxt)
            seq.append(nxt)
            if nxt in stop_token_ids(model, tok):
                break
    assert ids == expected


def test_seeded_sampling_is_reproducible_and_seed_dependent(tok):
    model = model_for(tok)

    def sampled(seed, top_p=1.0):
        return run(model, tok, InferRequest("m", prompt="héllo", sampling=SamplingParams(
            max_tokens=24, temperature=1.5, top_p=top_p, seed=seed)))[0]

    assert sampled(7) == sampled(7)
    assert sampled(7) != sampled(8)
    greedy = run(model, tok, InferRequest("m", prompt="héllo", sampling=SamplingParams(max_tokens=24)))[0]
    assert sampled(7, top_p=1e-9) == greedy  # a nucleus of one token is greedy


def test_top_p_never_samples_outside_the_nucleus():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    gen = torch.Generator().manual_seed(0)
    params = SamplingParams(temperature=1.0, top_p=0.75)
    draws = {sample(logits, params, gen) for _ in range(400)}
    assert draws == {0, 1}  # 0.5 + 0.3 reaches 0.75; 2 and 3 are cut
    assert {sample(logits, SamplingParams(temperature=1.0), gen) for _ in range(400)} == {0, 1, 2, 3}


def test_max_tokens_and_eos(tok):
    model = model_for(tok)
    req = InferRequest("m", prompt="héllo", sampling=SamplingParams(max_tokens=10))
    ids, text, reason = run(model, tok, req)
    assert len(ids) == 10 and reason == "length"
    # Make the 4th greedy token the end of sequence: generation ends there, without its text.
    model.generation_config.eos_token_id = [ids[3]]
    ids2, text2, reason2 = run(model, tok, req)
    assert ids2 == ids[:4] and reason2 == "stop"
    assert text2 == tok.decode(ids[:3], skip_special_tokens=True)


def test_stop_string_cuts_the_output(tok):
    model = model_for(tok, seed=0)
    req = InferRequest("m", prompt="Paris", sampling=SamplingParams(max_tokens=30))
    _, text, _ = run(model, tok, req)
    windows = [text[i:i + 2] for i in range(2, len(text) - 1) if "\ufffd" not in text[i:i + 2]]
    assert windows, text
    stop = windows[0]
    req.sampling = SamplingParams(max_tokens=30, stop=(stop,))
    _, cut, reason = run(model, tok, req)
    assert reason == "stop" and stop not in cut and cut == text[:text.index(stop)]


def test_chat_template_is_applied(tok):
    chat = build_prompt_ids(tok, InferRequest("m", prompt="hi"))
    raw = build_prompt_ids(tok, InferRequest("m", prompt="hi", raw=True))
    assert tok.decode(chat) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode(raw) == "hi"
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert tok.decode(build_prompt_ids(tok, InferRequest("m", messages=msgs))).startswith("<|im_start|>system\n")


@pytest.mark.parametrize("sampling", [SamplingParams(max_tokens=24),
                                      SamplingParams(max_tokens=24, temperature=1.2, top_p=0.9, seed=11),
                                      "held"])
@pytest.mark.parametrize("at", [1, 5, 13])
def test_a_request_resumes_from_its_state(tok, sampling, at):
    """What token-based migration relies on: a fresh Generation built from a snapshot
    (token list, sampler state, streaming position) continues exactly like the original:
    the same tokens, and the text streamed before plus after is the unmigrated text."""
    model = model_for(tok, seed=2)
    if sampling == "held":  # a stop string that starts often and never completes: text is held back
        plain = run(model, tok, InferRequest("m", prompt="日本語 🙂", sampling=SamplingParams(max_tokens=24)))[1]
        sampling = SamplingParams(max_tokens=24, stop=(next(c for c in plain if c != "\ufffd") + "\x01\x02",))
    req = InferRequest("m", prompt="日本語 🙂", sampling=sampling)
    full, full_text, _ = run(model, tok, req)
    state = RequestState("r", "m", sampling, build_prompt_ids(tok, req))
    gen = Generation(model, tok, state)
    for _ in range(at):
        gen.step()
    snap = RequestState.from_dict(gen.snapshot().to_dict())  # as it would travel
    resumed = Generation(model, tok, snap)
    while resumed.step() is not None:
        pass
    assert snap.output_ids == full
    assert snap.emitted_text == full_text
    assert snap.finish_reason == "length"


# --- instances ------------------------------------------------------------------------------------
def _collect(handle):
    events = list(handle)
    return "".join(e["text"] for e in events if e["type"] == "token"), events[-1]


def test_instance_streams_tokens_and_stats(tok):
    model = model_for(tok)
    inst = Instance("m", model, tok, device="cpu", nbytes=0)
    try:
        req = InferRequest("m", prompt="héllo", sampling=SamplingParams(max_tokens=8))
        text, done = _collect(inst.submit(req))
        _, expected, _ = run(model, tok, req)
        assert text == expected
        stats = done["stats"]
        assert done["type"] == "done" and stats["tokens"] == 8 and stats["finish_reason"] == "length"
        assert stats["ttft_s"] > 0 and stats["tokens_per_s"] > 0
    finally:
        assert inst.close(timeout=10)


def _long_running(tok):
    model = model_for(tok, max_position_embeddings=100_000)
    return model, InferRequest("m", prompt="x", sampling=SamplingParams(max_tokens=50_000))


def test_full_queue_is_busy_and_cancel_frees_slots(tok):
    model, long_req = _long_running(tok)
    inst = Instance("m", model, tok, device="cpu", nbytes=0, queue_depth=1)
    try:
        running = inst.submit(long_req)
        it = iter(running)
        next(it)  # it is running: the worker is busy for a long while
        queued = inst.submit(InferRequest("m", prompt="a", sampling=SamplingParams(max_tokens=2)))
        assert (inst.active, inst.queued) == (1, 1)
        with pytest.raises(BusyError) as err:
            inst.submit(InferRequest("m", prompt="b"))
        assert err.value.code == "busy" and err.value.exit_code == 75
        queued.cancel()  # a cancelled queued request leaves at once ...
        assert inst.queued == 0
        with pytest.raises(RequestCancelledError):
            list(queued)
        third = inst.submit(InferRequest("m", prompt="c", sampling=SamplingParams(max_tokens=3)))  # ... freeing its slot
        it.close()  # the client of the running request goes away: it stops before its next token
        text, done = _collect(third)
        assert done["stats"]["tokens"] == 3
        assert running.finish_reason == "cancelled"
        assert len(running.state.output_ids) < 50_000
    finally:
        assert inst.close(timeout=10)


def test_concurrent_requests_get_their_own_answers(tok):
    model = model_for(tok)
    inst = Instance("m", model, tok, device="cpu", nbytes=0, queue_depth=8)
    prompts = ["héllo", "Paris", "日本語", "wörld", "France", "🙂", "system", "capital"]
    expected = {p: run(model, tok, InferRequest("m", prompt=p, sampling=SamplingParams(max_tokens=6)))[1]
                for p in prompts}
    results, errors = {}, []

    def client(p):
        try:
            results[p] = _collect(inst.submit(InferRequest("m", prompt=p, sampling=SamplingParams(max_tokens=6))))[0]
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=client, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors and results == expected
    assert inst.close(timeout=10)


def test_close_fails_queued_requests_and_lets_the_running_one_finish(tok):
    model, long_req = _long_running(tok)
    long_req.sampling = SamplingParams(max_tokens=40)
    inst = Instance("m", model, tok, device="cpu", nbytes=0)
    running = inst.submit(long_req)
    it = iter(running)
    next(it)
    queued = inst.submit(InferRequest("m", prompt="a"))
    assert inst.close(timeout=10)
    with pytest.raises(InstanceClosedError):
        list(queued)
    rest = list(it)
    assert rest[-1]["type"] == "done" and rest[-1]["stats"]["tokens"] == 40
    with pytest.raises(InstanceClosedError):
        inst.submit(InferRequest("m", prompt="late"))


def test_a_failing_request_does_not_kill_the_worker(tok):
    model = model_for(tok)
    inst = Instance("m", model, tok, device="cpu", nbytes=0)
    try:
        with pytest.raises(InvalidRequestError, match="empty"):
            inst.submit(InferRequest("m", prompt="", raw=True))  # no prompt tokens at all: refused at submit
        proj = model.model.layers[0].self_attn.q_proj
        good = proj.weight
        proj.weight = torch.nn.Parameter(good[:, :3].clone())  # the forward now fails with a shape error
        bad = inst.submit(InferRequest("m", prompt="ok", sampling=SamplingParams(max_tokens=2)))
        with pytest.raises(Exception):
            list(bad)
        proj.weight = good
        text, done = _collect(inst.submit(InferRequest("m", prompt="ok", sampling=SamplingParams(max_tokens=2))))
        assert done["stats"]["tokens"] == 2
    finally:
        inst.close(timeout=10)


def test_close_cancels_a_request_that_outlives_the_grace(tok):
    model, long_req = _long_running(tok)
    inst = Instance("m", model, tok, device="cpu", nbytes=0)
    it = iter(inst.submit(long_req))
    next(it)
    t0 = time.perf_counter()
    assert inst.close(timeout=0.2)
    assert time.perf_counter() - t0 < 10
    with pytest.raises(RequestCancelledError):
        list(it)


# --- context, chunked prefill, cancelling a prefill, end of sequence ----------------------------------
def test_a_prompt_longer_than_the_context_is_refused_at_submit(tok):
    model = model_for(tok, max_position_embeddings=64)
    inst = Instance("tiny", model, tok, device="cpu", nbytes=0)
    try:
        long = InferRequest("tiny", prompt="héllo wörld " * 40, raw=True)
        n = len(build_prompt_ids(tok, long))
        assert n > 64
        with pytest.raises(InvalidRequestError, match=rf"the prompt is {n:,} tokens; tiny's context is 64"):
            inst.submit(long)
        assert inst.queued == 0 and inst.active == 0
        # prompt + max_tokens beyond the context: the answer is clipped at the context, finish_reason "length".
        fits = InferRequest("tiny", prompt="héllo", raw=True, sampling=SamplingParams(max_tokens=500))
        n_fit = len(build_prompt_ids(tok, fits))
        text, done = _collect(inst.submit(fits))
        assert done["stats"]["finish_reason"] == "length" and done["stats"]["tokens"] == 64 - n_fit
    finally:
        inst.close(timeout=10)


@pytest.mark.parametrize("chunk", [1, 7, 32])
def test_chunked_prefill_gives_the_same_greedy_output_as_one_pass(tok, chunk):
    model = model_for(tok, seed=3)  # fp32
    req = InferRequest("m", prompt="The capital of France is Paris. " * 4, raw=True,
                       sampling=SamplingParams(max_tokens=16))
    ids = build_prompt_ids(tok, req)
    assert len(ids) > 32

    def greedy(prefill_chunk):
        state = RequestState("r", "m", req.sampling, list(ids))
        gen = Generation(model, tok, state, prefill_chunk=prefill_chunk)
        while gen.step() is not None:
            pass
        return state.output_ids, gen.prefill_chunks_done

    one_pass, one = greedy(len(ids))
    chunked, chunks = greedy(chunk)
    assert one == 1 and chunks == -(-len(ids) // chunk)
    assert chunked == one_pass


class _CancelAtChunk(threading.Event):
    """A client's cancel (the server's call.cancelled) that arrives once the handle's prefill
    has done `k` chunks: deterministic, whatever the machine's speed."""

    def __init__(self, k: int):
        super().__init__()
        self.k, self.handle = k, None

    def is_set(self) -> bool:
        if self.handle is not None and self.handle.prefill_chunks_done >= self.k:
            self.set()
        return super().is_set()


def test_a_cancel_stops_a_long_prefill_within_one_chunk_and_the_next_request_runs(tok):
    model = model_for(tok, max_position_embeddings=4096)
    inst = Instance("m", model, tok, device="cpu", nbytes=0, prefill_chunk=16)
    try:
        cancel = _CancelAtChunk(3)
        long = InferRequest("m", prompt="日本語のテキスト 🙂 " * 60, raw=True, sampling=SamplingParams(max_tokens=4))
        abandoned = inst.submit(long, cancelled=cancel)
        cancel.handle = abandoned
        nxt = inst.submit(InferRequest("m", prompt="ok", sampling=SamplingParams(max_tokens=2)))
        with pytest.raises(RequestCancelledError):
            list(abandoned)
        assert abandoned.prefill_chunks_total > 10
        assert abandoned.prefill_chunks_done == 3  # stopped at the first chunk boundary after the cancel
        text, done = _collect(nxt)  # the next request did not wait for the rest of the abandoned prefill
        assert done["stats"]["tokens"] == 2 and done["stats"]["prefill_chunks"] == 1
    finally:
        inst.close(timeout=10)


def test_handle_cancel_from_another_thread_stops_the_prefill(tok):
    """As sllmd's server does when a client disconnects: the cancel comes from another thread."""
    model = model_for(tok, max_position_embeddings=100_000)
    inst = Instance("m", model, tok, device="cpu", nbytes=0, prefill_chunk=8)
    try:
        cancel = threading.Event()
        handle = inst.submit(InferRequest("m", prompt="x " * 20_000, raw=True), cancelled=cancel)
        while handle.prefill_chunks_done < 1:
            time.sleep(0.001)
        cancel.set()
        with pytest.raises(RequestCancelledError):
            list(handle)
        assert handle.prefill_chunks_done < handle.prefill_chunks_total
    finally:
        inst.close(timeout=10)


def test_a_queued_request_cancelled_through_its_event_never_runs(tok):
    model, long_req = _long_running(tok)
    inst = Instance("m", model, tok, device="cpu", nbytes=0)
    try:
        running = iter(inst.submit(long_req))
        next(running)
        cancel = threading.Event()
        queued = inst.submit(InferRequest("m", prompt="ok"), cancelled=cancel)
        cancel.set()
        running.close()
        with pytest.raises(RequestCancelledError):
            list(queued)
        assert queued.state is None  # it never started
    finally:
        inst.close(timeout=10)


def test_the_end_of_sequence_token_is_not_emitted_or_counted(tok):
    model = model_for(tok)
    req = InferRequest("m", prompt="héllo", sampling=SamplingParams(max_tokens=10))
    ids, _, _ = run(model, tok, req)
    eos = ids[3]
    model.generation_config.eos_token_id = [eos]
    inst = Instance("m", model, tok, device="cpu", nbytes=0)
    try:
        events = list(inst.submit(req))
        tokens, done = events[:-1], events[-1]
        assert done["stats"]["finish_reason"] == "stop" and done["stats"]["tokens"] == 3
        assert [e["token_id"] for e in tokens if e["token_id"] is not None] == ids[:3]
        assert all(e["text"] for e in tokens if e["token_id"] is None)  # only text held back until the end
    finally:
        inst.close(timeout=10)


# --- the same through a real sllmd ------------------------------------------------------------------------
@pytest.mark.slow
def test_sllmd_refuses_a_prompt_beyond_the_context_and_ctrl_c_stops_a_prefill(smollm2_checkpoint):
    root = short_tempdir()
    try:
        with DaemonProcess(root, "--keep-alive", "-1", dram="1GiB", device_memory="1GiB") as daemon:
            assert sllmctl("import", "smol", str(smollm2_checkpoint), socket_path=daemon.socket).returncode == 0
            too_long = "word " * 20_000  # 100,000 characters
            refused = r"the prompt is [\d,]+ tokens; smol's context is 8,192"
            with Client(daemon.socket) as c:
                with pytest.raises(InvalidRequestError, match=refused):
                    list(c.infer("smol", too_long, max_tokens=4))
            run = sllmctl("infer", "smol", too_long, socket_path=daemon.socket)
            assert run.returncode == 1 and re.search(refused, run.stderr) and run.stdout.strip() == "", run

            # Ctrl-C during a long prefill: the daemon stops it at the next chunk boundary.
            cmd = [sys.executable, "-m", "sllmctl", "infer", "smol", "word " * 7000, "--max-tokens", "4",
                   "--socket", daemon.socket]
            client = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            try:
                with Client(daemon.socket) as probe:
                    while not any(i["active_requests"] for i in probe.ps()):  # the prefill is running
                        assert client.poll() is None, client.communicate()
                        time.sleep(0.05)
                client.send_signal(signal.SIGINT)
                client.communicate(timeout=60)
            finally:
                if client.poll() is None:
                    client.kill()
                    client.wait()
            answer = sllmctl("infer", "smol", "What is the capital of France?", "--max-tokens", "12",
                             socket_path=daemon.socket)
            assert answer.returncode == 0 and "Paris" in answer.stdout, answer
            (line,) = re.findall(r"cancelled during its prefill, after (\d+) of (\d+) chunks", daemon.log())
            assert int(line[0]) < int(line[1])
    finally:
        remove_tree(root)


# --- compute dtype ---------------------------------------------------------------------------------------
def test_compute_dtype_auto_follows_the_host():
    from sllmd.errors import ConfigError
    from sllmd.inference import compute_dtype as cdt
    with open("/proc/cpuinfo") as f:
        native = bool({"avx512_bf16", "amx_bf16"} & set(f.read().split()))
    # (this host's EPYC has avx512_bf16: bf16 here; an AVX2-only CPU gets fp32)
    assert cdt.resolve("auto", "cpu", torch.bfloat16) == (torch.bfloat16 if native else torch.float32)
    assert cdt.resolve("auto", "cpu", "float16") == torch.float32
    assert cdt.resolve("auto", "cpu", torch.float32) == torch.float32
    assert cdt.resolve("bf16", "cpu", torch.float32) == torch.bfloat16
    assert cdt.resolve("float16", "cpu", None) == torch.float16
    with pytest.raises(ConfigError, match="compute dtype"):
        cdt.parse_compute_dtype("int8")


@pytest.fixture(scope="module")
def bf16_checkpoint(tmp_path_factory, tok):
    from sllmd.store import save_model
    model = model_for(tok, seed=5, tie_word_embeddings=True).to(torch.bfloat16)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model, save_model(model, tmp_path_factory.mktemp("bf16") / "m", tokenizer=tok)


@pytest.mark.parametrize("arena", [True, False])
def test_a_bf16_checkpoint_served_in_fp32_computes_in_fp32_from_a_cast_buffer(bf16_checkpoint, tok, arena):
    from sllmd.pool import HostArena
    from sllmd.store.format import open_checkpoint
    from sllmd.tiers.loader import device_bytes, load_instance

    reference, path = bf16_checkpoint
    files = sorted(p.relative_to(path) for p in path.rglob("*"))
    ckpt = open_checkpoint(path)
    host = HostArena(64 << 20, prefault=False) if arena else None
    stored = device_bytes(ckpt, "cpu", host)
    cast = device_bytes(ckpt, "cpu", host, "fp32")
    assert device_bytes(ckpt, "cpu", host, "bf16") == stored  # no cast, no change
    loaded = load_instance("m", ckpt, "cpu", arena=host, compute_dtype="fp32")
    params = dict(loaded.model.named_parameters())
    assert params and all(p.dtype == torch.float32 for p in params.values())
    assert loaded.model.lm_head.weight is loaded.model.model.embed_tokens.weight  # still tied
    raw = sum(p.numel() * 2 for p in reference.parameters())  # bf16 bytes, the tied matrix once
    assert 2 * raw <= cast < 2 * raw + (4 << 20 if arena else 64 * 1024)  # the budget counts the fp32 size
    if arena:
        assert host.used == cast  # the cast buffer lives in the arena; the bf16 staging went back
    # The same answer as the model built in fp32 with its weights rounded through bf16 (buffers
    # such as rotary frequencies stay fp32, as the fresh skeleton builds them).
    expected = model_for(tok, seed=5, tie_word_embeddings=True)
    for p in expected.parameters():
        p.data = p.data.to(torch.bfloat16).float()
    ids = torch.tensor([build_prompt_ids(tok, InferRequest("m", prompt="héllo wörld", raw=True))])
    with torch.inference_mode():
        assert torch.equal(loaded.model(ids).logits, expected(ids).logits)
    assert sorted(p.relative_to(path) for p in path.rglob("*")) == files  # no second copy on disk


def test_a_node_serving_bf16_with_fp32_compute_counts_the_cast_size(tmp_path, tok):
    from sllmd.config import MiB, Config
    from sllmd.node import Node
    from sllmd.store import save_model
    from sllmd.store.format import open_checkpoint
    from sllmd.tiers.loader import device_bytes

    big = model_for(tok, seed=6, hidden_size=256, intermediate_size=1024).to(torch.bfloat16)  # ~4 MiB in bf16
    path = save_model(big, tmp_path / "src", tokenizer=tok)
    node = Node(Config(socket=str(tmp_path / "sock"), store_dir=tmp_path / "store", dram_bytes=32 * MiB,
                       chunk_size=1 * MiB, device_memory_bytes=32 * MiB, compute_dtype="fp32"))
    node.start()
    try:
        node.import_model("m", str(path))
        events = list(node.infer(InferRequest("m", prompt="héllo", sampling=SamplingParams(max_tokens=3))))
        assert events[-1]["stats"]["tokens"] == 3
        slot = node.device.get("m")
        assert all(p.dtype == torch.float32 for p in slot.instance.model.parameters())
        ckpt = open_checkpoint(path)
        assert slot.nbytes == device_bytes(ckpt, "cpu", node.arena, "fp32") > device_bytes(ckpt, "cpu", node.arena)
    finally:
        node.close()


@pytest.mark.gpu
def test_compute_dtype_on_cuda_casts_into_one_device_buffer(bf16_checkpoint):
    from sllmd.inference import compute_dtype as cdt
    from sllmd.store.format import open_checkpoint
    from sllmd.tiers.loader import device_bytes, load_instance

    _, path = bf16_checkpoint
    ckpt = open_checkpoint(path)
    assert cdt.resolve("auto", "cuda:0", torch.bfloat16) == (
        torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    loaded = load_instance("m", ckpt, "cuda:0", compute_dtype="fp32")
    params = list(loaded.model.parameters())
    assert all(p.dtype == torch.float32 and p.device.type == "cuda" for p in params)
    assert len({p.untyped_storage().data_ptr() for p in params}) == 1  # one cast buffer
    assert device_bytes(ckpt, "cuda:0", None, "fp32") == cdt.cast_nbytes(ckpt, torch.float32)
