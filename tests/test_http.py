"""The OpenAI HTTP API (sllmd --http) through the official `openai` client, against a
real sllmd serving an fp32 tiny model with a fixed seed (one daemon for the module):
chat and completions, streaming and not, usage and finish_reason, seeded sampling,
the same answer as `sllmctl infer` and the IPC client, /v1/models, a model only on
SSD loaded by its first HTTP request, a disconnect cancelling its request, /metrics,
and 64 concurrent streaming clients (each completes with its own text or gets a 429).
The error cases, by raw HTTP, are in test_http_errors.py."""
from __future__ import annotations

import json
import os
import re
import threading
import time

import openai
import pytest

from conftest import make_tiny_model
from daemon_helpers import DaemonProcess, remove_tree, short_tempdir, sllmctl
from test_inference import tiny_tokenizer
from sllmd.client import Client

try:
    import httpx2 as httpx   # what this openai release is built on
except ImportError:   # older openai releases bring httpx
    import httpx

API_KEY = "test-key-0123456789"
CONTEXT = 8192
PROMPTS = [f"request {i}: {word}" for i, word in enumerate(
    ["héllo", "Paris", "wörld", "日本語", "🙂🚀", "∑∫", "ça", "system"] * 8)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from sllmd import store
    tok = tiny_tokenizer()
    path = tmp_path_factory.mktemp("http") / "tiny"
    store.save_model(make_tiny_model("llama", seed=3, vocab_size=len(tok), max_position_embeddings=CONTEXT),
                     path, tokenizer=tok)
    return path


def http_url(daemon: DaemonProcess) -> str:
    """The address the daemon bound for --http HOST:0 (its READY status says it)."""
    for note in daemon.notifications:
        m = re.search(r"http on (http://\S+)", note)
        if m:
            return m.group(1)
    raise AssertionError(f"no http address in {daemon.notifications}")


def start_http_daemon(root, checkpoint, *args: str, key: str | None = API_KEY, name: str = "tiny",
                      dram: str = "64MiB") -> tuple[DaemonProcess, str]:
    extra: list[str] = []
    if key is not None:
        key_file = root / "api-key"
        key_file.write_text(key + "\n")
        os.chmod(key_file, 0o600)
        extra = ["--api-key-file", str(key_file)]
    daemon = DaemonProcess(root, "--http", "127.0.0.1:0", *extra, "--keep-alive", "-1", *args,
                           dram=dram, device_memory="1GiB").start()
    run = sllmctl("import", name, str(checkpoint), socket_path=daemon.socket)
    assert run.returncode == 0, run.stderr + daemon.log()
    return daemon, http_url(daemon)


@pytest.fixture(scope="module")
def served(checkpoint):
    root = short_tempdir()
    daemon, url = start_http_daemon(root, checkpoint, "--max-batch", "8")
    yield daemon, url
    daemon.close()
    remove_tree(root)


@pytest.fixture(scope="module")
def client(served):
    _, url = served
    with openai.OpenAI(base_url=url + "/v1", api_key=API_KEY, max_retries=0, timeout=120) as c:
        yield c


def chat(client, prompt: str, **kw):
    kw.setdefault("temperature", 0)
    if "max_completion_tokens" not in kw:
        kw.setdefault("max_tokens", 16)
    return client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": prompt}], **kw)


def streamed_chat(client, prompt: str, **kw) -> tuple[str, list]:
    kw.setdefault("temperature", 0)
    kw.setdefault("max_tokens", 16)
    chunks = list(client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": prompt}],
                                                 stream=True, **kw))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks


def ipc_answer(socket: str, prompt: str, **kw) -> tuple[str, dict]:
    with Client(socket, timeout=120) as c:
        stream = c.infer("tiny", prompt, **kw)
        return stream.text(), stream.stats


# --- chat and completions ------------------------------------------------------------------------------
def test_chat_whole_and_streamed_agree_with_usage_and_id(client):
    whole = chat(client, "The capital of France is", max_tokens=12)
    assert whole.object == "chat.completion" and whole.model == "tiny"
    choice = whole.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert whole.usage.prompt_tokens > 0 and 0 < whole.usage.completion_tokens <= 12
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens
    assert re.fullmatch(r"[0-9a-f]{32}", whole.id)   # the request's id

    text, chunks = streamed_chat(client, "The capital of France is", max_tokens=12,
                                 stream_options={"include_usage": True})
    assert text == choice.message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert {c.id for c in chunks} == {chunks[0].id} and chunks[0].id != whole.id
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert [c.choices[0].finish_reason for c in finals] == [choice.finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_completions_whole_and_streamed(client):
    whole = client.completions.create(model="tiny", prompt="wörld wörld", max_tokens=10, temperature=0)
    assert whole.object == "text_completion" and whole.choices[0].text
    assert whole.choices[0].finish_reason in ("stop", "length")
    chunks = list(client.completions.create(model="tiny", prompt="wörld wörld", max_tokens=10, temperature=0,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_max_tokens_gives_length_and_max_completion_tokens_is_the_same(client):
    a = chat(client, "x", max_tokens=3)
    b = chat(client, "x", max_completion_tokens=3)
    assert a.choices[0].message.content == b.choices[0].message.content
    if a.choices[0].finish_reason == "length":
        assert a.usage.completion_tokens == 3


def test_seed_determinism(client):
    kw = dict(temperature=1.0, top_p=0.95, max_tokens=24)
    first = chat(client, "héllo", seed=42, **kw).choices[0].message.content
    assert chat(client, "héllo", seed=42, **kw).choices[0].message.content == first
    assert streamed_chat(client, "héllo", seed=42, **kw)[0] == first
    others = {chat(client, "héllo", seed=s, **kw).choices[0].message.content for s in (1, 2, 3)}
    assert others != {first}   # other seeds sample other streams


def test_same_answer_as_sllmctl_infer_and_ipc(served, client):
    daemon, _ = served
    prompt = "The capital of France is"
    run = sllmctl("infer", "tiny", prompt, "--max-tokens", "16", "--temperature", "0", "--json",
                  socket_path=daemon.socket)
    assert run.returncode == 0, run.stderr
    events = [json.loads(line) for line in run.stdout.splitlines()]
    cli_text = "".join(e["text"] for e in events if e["type"] == "token")
    assert chat(client, prompt, max_tokens=16).choices[0].message.content == cli_text
    raw = sllmctl("infer", "tiny", prompt, "--max-tokens", "16", "--temperature", "0", "--raw", "--json",
                  socket_path=daemon.socket)
    raw_text = "".join(e["text"] for e in map(json.loads, raw.stdout.splitlines()) if e["type"] == "token")
    completion = client.completions.create(model="tiny", prompt=prompt, max_tokens=16, temperature=0)
    assert completion.choices[0].text == raw_text
    ipc_text, stats = ipc_answer(daemon.socket, prompt, max_tokens=16, temperature=0)
    assert ipc_text == cli_text
    assert chat(client, prompt, max_tokens=16).usage.completion_tokens == stats["tokens"]


def test_keep_alive_extension_and_ignored_user(client):
    out = chat(client, "Paris", max_tokens=4, user="someone", extra_body={"keep_alive": "10m"})
    assert out.choices[0].message.content


# --- models -------------------------------------------------------------------------------------------------
def test_models_list_where_each_is(client):
    models = client.models.list().data
    tiny = next(m for m in models if m.id == "tiny")
    assert tiny.object == "model" and tiny.owned_by == "sllm"
    locations = tiny.model_extra["locations"]
    assert len(locations) == 1 and "ssd" in locations[0]["tiers"] and locations[0]["state"]
    one = client.models.retrieve("tiny")
    assert one.id == "tiny" and one.model_extra["locations"] == locations
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_a_model_only_on_ssd_is_loaded_by_its_first_request(served, client):
    daemon, _ = served
    with Client(daemon.socket) as c:
        c.evict("tiny", tier="device")
        c.evict("tiny", tier="dram")
        assert not c.ps()
        assert next(m for m in c.models() if m["name"] == "tiny")["tiers"] == ["ssd"]
    text, chunks = streamed_chat(client, "Paris", max_tokens=8)
    assert text
    with Client(daemon.socket) as c:
        assert [p["name"] for p in c.ps()] == ["tiny"]
    assert "device" in client.models.retrieve("tiny").model_extra["locations"][0]["tiers"]


def test_a_client_that_goes_away_cancels_its_request(served):
    daemon, url = served
    headers = {"Authorization": f"Bearer {API_KEY}"}
    body = {"model": "tiny", "prompt": "x", "max_tokens": 6000, "temperature": 0, "stream": True}
    before = generated_tokens(url)
    with httpx.Client(timeout=60) as h:
        with h.stream("POST", url + "/v1/completions", json=body, headers=headers) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            assert next(line for line in lines if line.startswith("data:"))
            with Client(daemon.socket) as c:
                assert len(c.requests()) == 1
    deadline = time.monotonic() + 30
    with Client(daemon.socket) as c:
        while c.requests() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert c.requests() == [], "the request still runs after its client went away"
    assert generated_tokens(url) == before   # it was stopped, not finished


def generated_tokens(url: str) -> float:
    """sllmd_http_generated_tokens_total for tiny: it counts finished completions only."""
    text = httpx.get(url + "/metrics", timeout=30).text
    m = re.search(r'^sllmd_http_generated_tokens_total\{model="tiny"\} (\S+)$', text, re.M)
    return float(m.group(1)) if m else 0.0


def test_a_client_that_gives_up_on_a_whole_answer_cancels_it(served):
    daemon, url = served
    before = generated_tokens(url)
    body = {"model": "tiny", "prompt": "x", "max_tokens": 6000, "temperature": 0}
    with httpx.Client(timeout=httpx.Timeout(60, read=1.0)) as h:   # it stops waiting after 1 s
        with pytest.raises(httpx.ReadTimeout):
            h.post(url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {API_KEY}"})
    deadline = time.monotonic() + 30
    with Client(daemon.socket) as c:
        while c.requests() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert c.requests() == [], "the request still runs after its client went away"
    assert generated_tokens(url) == before   # it was stopped, not finished


def test_metrics(served, client):
    _, url = served

    def scrape() -> str:
        r = httpx.get(url + "/metrics", timeout=30)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        return r.text

    def value(text: str, name: str, labels: str = "") -> float:
        m = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.M)
        return float(m.group(1)) if m else 0.0

    before = scrape()
    out = chat(client, "Paris", max_tokens=6)
    after = scrape()
    ok = '{route="/v1/chat/completions",status="200"}'
    assert value(after, "sllmd_http_requests_total", ok) == value(before, "sllmd_http_requests_total", ok) + 1
    tokens = '{model="tiny"}'
    assert value(after, "sllmd_http_generated_tokens_total", tokens) - \
        value(before, "sllmd_http_generated_tokens_total", tokens) == out.usage.completion_tokens
    assert value(after, "sllmd_models_loaded") == 1
    assert value(after, "sllmd_http_requests_in_flight") == 0
    assert "sllmd_http_time_to_first_token_seconds_bucket" in after
    for line in after.splitlines():
        if line.startswith("# TYPE") and line.endswith(" counter"):
            assert line.split()[2].startswith("sllmd_")


# --- concurrency ----------------------------------------------------------------------------------------
def test_64_concurrent_streams_each_complete_with_their_own_text_or_get_429(served, client):
    daemon, url = served
    expected: dict[str, str] = {}

    def answer_ipc(prompts: list[str]) -> None:   # 8 at a time: the batch (fp32) keeps each answer its own
        for p in prompts:
            expected[p] = ipc_answer(daemon.socket, p, max_tokens=16, temperature=0)[0]

    ipc = [threading.Thread(target=answer_ipc, args=(PROMPTS[i::8],)) for i in range(8)]
    for t in ipc:
        t.start()
    for t in ipc:
        t.join(120)
    assert len(expected) == len(PROMPTS)
    results: dict[int, object] = {}
    start = threading.Barrier(len(PROMPTS))

    def run(i: int, prompt: str) -> None:
        with openai.OpenAI(base_url=url + "/v1", api_key=API_KEY, max_retries=0, timeout=120) as own:
            start.wait()
            try:
                results[i] = streamed_chat(own, prompt, max_tokens=16)[0]
            except openai.RateLimitError as e:
                results[i] = e
            except Exception as e:   # noqa: BLE001 -- reported below
                results[i] = e

    threads = [threading.Thread(target=run, args=(i, p)) for i, p in enumerate(PROMPTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert len(results) == len(PROMPTS), "a request was lost"
    completed = 0
    for i, prompt in enumerate(PROMPTS):
        got = results[i]
        if isinstance(got, openai.RateLimitError):
            assert got.status_code == 429 and got.response.headers.get("retry-after")
            assert got.body["code"] == "busy"
            continue
        assert not isinstance(got, Exception), f"request {i}: {got!r}"
        assert got == expected[prompt], f"request {i} got another's text"
        completed += 1
    assert completed >= 8   # at least a full batch went through
