"""Continuous batching through a real sllmd (--max-batch 8) on an fp32 tiny model
with a fixed seed: concurrent requests equal their sequential answers, a
joining request streams before the batch finishes, cancelling one leaves the
others unchanged, seeded sampling is the same alone and in a batch, ps/status
show the batch, and a device budget without room for another KV cache queues
the newcomer instead of failing anyone. (Resuming a request state inside a
running batch has no protocol message yet: it is tested in-process in
test_batching_engine.py.)"""
from __future__ import annotations

import json
import threading
import time

import pytest

from conftest import make_tiny_model
from daemon_helpers import DaemonProcess, remove_tree, short_tempdir, sllmctl
from test_inference import tiny_tokenizer
from sllmd.client import Client

PROMPTS = ["héllo", "The capital of France is", "日本語のテキスト 🙂", "wörld " * 9, "Paris", "🙂🚀 ∑∫ " * 4,
           "system user assistant", "ça"]
CONTEXT = 8192


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from sllmd import store
    tok = tiny_tokenizer()
    path = tmp_path_factory.mktemp("batching") / "tiny"
    store.save_model(make_tiny_model("llama", seed=3, vocab_size=len(tok), max_position_embeddings=CONTEXT),
                     path, tokenizer=tok)
    return path


def start(checkpoint, *args: str, device_memory: str = "1GiB") -> tuple[DaemonProcess, object]:
    root = short_tempdir()
    daemon = DaemonProcess(root, "--keep-alive", "-1", "--max-batch", "8", *args, dram="64MiB",
                           device_memory=device_memory).start()
    run = sllmctl("import", "tiny", str(checkpoint), socket_path=daemon.socket)
    assert run.returncode == 0, run.stderr + daemon.log()
    return daemon, root


@pytest.fixture(scope="module")
def served(checkpoint):
    daemon, root = start(checkpoint)
    yield daemon
    daemon.close()
    remove_tree(root)


def answer(socket: str, prompt: str, **kw) -> tuple[str, dict]:
    with Client(socket, timeout=120) as c:
        stream = c.infer("tiny", prompt, **kw)
        text = stream.text()
        return text, stream.stats


class Background:
    """A long request keeping the instance's batch running while others join it."""

    def __init__(self, socket: str):
        self.client = Client(socket, timeout=120)
        self.stream = self.client.infer("tiny", "x", max_tokens=50_000)
        self.events = self.stream.events()
        assert next(self.events)["type"] == "token"

    def stop(self) -> None:
        self.stream.close()
        self.client.close()


def concurrently(fn, args: list) -> list:
    results, errors = [None] * len(args), []

    def run(i):
        try:
            results[i] = fn(*args[i])
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(args))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    return results


def test_eight_concurrent_greedy_requests_equal_their_sequential_answers(served):
    kws = [dict(max_tokens=6 + 4 * i) for i in range(8)]
    expected = [answer(served.socket, p, **kw)[0] for p, kw in zip(PROMPTS, kws)]  # one at a time
    assert len(set(expected)) > 4
    bg = Background(served.socket)
    try:
        results = concurrently(lambda p, kw: answer(served.socket, p, **kw), list(zip(PROMPTS, kws)))
    finally:
        bg.stop()
    assert [text for text, _ in results] == expected
    assert all(stats["batch_size"] >= 2 for _, stats in results)
    assert [stats["tokens"] for _, stats in results] == [kw["max_tokens"] for kw in kws]


def test_a_joining_request_gets_its_first_token_before_the_others_finish(served):
    others = [Client(served.socket, timeout=120) for _ in range(3)]
    streams = [c.infer("tiny", p, max_tokens=4000) for c, p in zip(others, PROMPTS)]
    events = [s.events() for s in streams]
    try:
        for e in events:
            assert next(e)["type"] == "token"
        with Client(served.socket, timeout=120) as c:
            joiner = c.infer("tiny", "Paris", max_tokens=4)
            first = next(joiner.events())
            assert first["type"] == "token"
            assert not any(s.done for s in streams)
            listing = c.requests()
            assert sum(1 for r in listing if r["state"] == "running") >= 3
    finally:
        for s, c in zip(streams, others):
            s.close()
            c.close()


def test_cancelling_one_request_of_a_batch_leaves_the_others_unchanged(served):
    prompts = PROMPTS[:4]
    expected = [answer(served.socket, p, max_tokens=24)[0] for p in prompts]
    bg = Background(served.socket)
    results, errors = {}, []

    def ask(i):
        try:
            results[i] = answer(served.socket, prompts[i], max_tokens=24)[0]
        except BaseException as e:  # surfaced below
            errors.append(e)
    try:
        with Client(served.socket, timeout=120) as victim_client:
            victim = victim_client.infer("tiny", "wörld", max_tokens=5000)
            it = iter(victim)
            next(it)
            threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
            for t in threads:
                t.start()
            next(it)
            victim.close()  # cancelled while the others decode
            for t in threads:
                t.join(300)
    finally:
        bg.stop()
    assert not errors, errors
    results = [results[i] for i in range(4)]
    assert results == expected


def test_seeded_sampling_gives_the_same_text_alone_and_in_a_batch(served):
    kws = [dict(max_tokens=20, temperature=0.9, top_p=0.95, seed=40 + i) for i in range(5)]
    expected = [answer(served.socket, p, **kw)[0] for p, kw in zip(PROMPTS, kws)]
    bg = Background(served.socket)
    try:
        results = concurrently(lambda p, kw: answer(served.socket, p, **kw)[0], list(zip(PROMPTS, kws)))
    finally:
        bg.stop()
    assert results == expected


def test_ps_and_status_show_the_batch(served):
    bg = Background(served.socket)
    second = Background(served.socket)
    try:
        deadline = time.time() + 60
        while True:
            (inst,) = json.loads(sllmctl("ps", "--json", socket_path=served.socket).stdout)
            if inst["batch_size"] == 2 or time.time() > deadline:
                break
            time.sleep(0.05)
        assert (inst["max_batch"], inst["batch_size"], inst["active_requests"], inst["queued"]) == (8, 2, 2, 0)
        assert inst["kv_bytes"] > 0  # the second row's KV cache is counted in the device budget
        table = sllmctl("ps", socket_path=served.socket).stdout
        assert "BATCH" in table and "2/8" in table and "RUNNING" in table
        status = sllmctl("status", socket_path=served.socket).stdout
        assert "instance tiny: batch 2/8 decoding" in status
    finally:
        bg.stop()
        second.stop()


def test_kv_budget_pressure_queues_the_newcomer_instead_of_failing(checkpoint):
    # 2 MiB: the model's arena range and nothing more, so no second KV cache fits next to the first.
    daemon, root = start(checkpoint, device_memory="2MiB")
    try:
        expected = answer(daemon.socket, "Paris", max_tokens=5)[0]
        bg = Background(daemon.socket)
        out = {}
        t = threading.Thread(target=lambda: out.setdefault("r", answer(daemon.socket, "Paris", max_tokens=5)))
        t.start()
        deadline = time.time() + 60
        while time.time() < deadline:
            (inst,) = json.loads(sllmctl("ps", "--json", socket_path=daemon.socket).stdout)
            if inst["queued"] == 1:
                break
            time.sleep(0.05)
        assert (inst["active_requests"], inst["queued"], inst["kv_bytes"]) == (1, 1, 0)  # waiting, not failed
        assert not bg.stream.done
        bg.stop()  # the running request leaves: the newcomer runs
        t.join(120)
        text, stats = out["r"]
        assert text == expected and stats["finish_reason"] == "length"
    finally:
        daemon.close()
        remove_tree(root)
