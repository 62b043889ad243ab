"""Every error of the HTTP API by raw HTTP (httpx), against a real sllmd with an API key,
--max-streams 1 and a 64KiB body limit (--max-frame): OpenAI's error body with the
right status (400 malformed JSON, wrong types and unsupported fields named, 401,
404, 413, 429 with Retry-After, 503 while shutting down); bodies that are large,
deep or odd leave the daemon serving; a key file readable by others is refused
at start; --http's address grammar."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from daemon_helpers import DaemonProcess, remove_tree, short_tempdir
from sllmd.client import Client
from test_http import API_KEY, checkpoint, httpx, start_http_daemon   # noqa: F401 -- checkpoint is a fixture

AUTH = {"Authorization": f"Bearer {API_KEY}"}
MAX_BODY = 64 << 10
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4, "temperature": 0}


@pytest.fixture(scope="module")
def served(checkpoint):   # noqa: F811
    root = short_tempdir()
    daemon, url = start_http_daemon(root, checkpoint, "--max-streams", "1", "--max-frame", "64KiB",
                                    "--shutdown-grace", "20s")
    with httpx.Client(base_url=url, timeout=60) as h:
        yield daemon, h
    daemon.close()
    remove_tree(root)


def error_of(r, status: int, code: str | None = None, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    error = body["error"]
    assert error["message"] and error["type"]
    if code is not None:
        assert error["code"] == code, error
    if param is not None:
        assert error["param"] == param, error
        assert param.split(".")[0].split("[")[0] in error["message"], error
    return error


def post(h, path: str, body, **kw):
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return h.post(path, content=data, headers={**AUTH, "content-type": "application/json", **kw.pop("headers", {})},
                  **kw)


def test_a_good_request_answers(served):
    _, h = served
    r = post(h, "/v1/chat/completions", CHAT)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] is not None


@pytest.mark.parametrize("body", [b"{bad", b"", b"\xff\xfe{}", b'{"model": NaN}', b"[" * 60_000,
                                  b'{"seed": 1' + b"0" * 5000 + b"}"])
def test_malformed_json_is_400(served, body):
    _, h = served
    error_of(post(h, "/v1/chat/completions", body), 400, "bad_message")


@pytest.mark.parametrize("field,value", [
    ("temperature", "hot"), ("temperature", 3), ("top_p", 0), ("max_tokens", 0), ("max_tokens", 1.5),
    ("seed", "42"), ("stop", [1]), ("stream", "yes"), ("messages", "hello"), ("messages", []),
    ("model", 7), ("keep_alive", "soon"), ("stream_options", {"include_usage": True}),
])
def test_wrong_types_are_400_naming_the_field(served, field, value):
    _, h = served
    error_of(post(h, "/v1/chat/completions", {**CHAT, field: value}), 400, "invalid_request", field)


def test_a_bad_message_is_named(served):
    _, h = served
    body = {**CHAT, "messages": [{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}]}
    error_of(post(h, "/v1/chat/completions", body), 400, "invalid_request", "messages[1].role")
    body = {**CHAT, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}
    error_of(post(h, "/v1/chat/completions", body), 400, "invalid_request", "messages[0].content[0].type")


@pytest.mark.parametrize("field,value", [
    ("n", 2), ("logprobs", True), ("top_logprobs", 2), ("tools", [{"type": "function", "function": {"name": "f"}}]),
    ("tool_choice", "auto"), ("response_format", {"type": "json_object"}), ("presence_penalty", 0.5),
    ("frequency_penalty", 1), ("logit_bias", {"42": 10}), ("audio", {"voice": "x"}), ("no_such_field", 1),
])
def test_unsupported_fields_are_400_naming_the_field(served, field, value):
    _, h = served
    error_of(post(h, "/v1/chat/completions", {**CHAT, field: value}), 400, "invalid_request", field)


def test_off_values_of_unsupported_fields_are_accepted(served):
    _, h = served
    body = {**CHAT, "n": 1, "logprobs": False, "presence_penalty": 0, "tools": [], "logit_bias": {},
            "response_format": {"type": "text"}, "user": "u", "top_p": None}
    assert post(h, "/v1/chat/completions", body).status_code == 200


@pytest.mark.parametrize("field,value", [("echo", True), ("best_of", 3), ("suffix", "x"), ("logprobs", 5),
                                         ("prompt", ["a", "b"]), ("prompt", [1, 2, 3]), ("messages", [])])
def test_completions_refuse_their_unsupported_fields(served, field, value):
    _, h = served
    body = {"model": "tiny", "prompt": "hello", "max_tokens": 4, field: value}
    error_of(post(h, "/v1/completions", body), 400, "invalid_request", field)


@pytest.mark.parametrize("path,body", [("/v1/completions", {"model": "tiny", "prompt": "x " * 5000}),
                                       ("/v1/chat/completions", {**CHAT, "messages": [
                                           {"role": "user", "content": "x " * 5000}]})])
@pytest.mark.parametrize("stream", [False, True])
def test_a_prompt_beyond_the_context_is_400_naming_both_lengths(served, path, body, stream):
    _, h = served   # "x " is one token each in the tiny tokenizer: 10,000 tokens, context 8,192
    error = error_of(post(h, path, {**body, "max_tokens": 4, "stream": stream}), 400, "invalid_request")
    assert re.search(r"the prompt is 10,\d{3} tokens; tiny's context is 8,192", error["message"]), error


def test_unknown_model_is_404(served):
    _, h = served
    error_of(post(h, "/v1/chat/completions", {**CHAT, "model": "nope"}), 404, "model_not_found")
    error_of(post(h, "/v1/completions", {"model": "no/such/../model", "prompt": "x"}), 404, "model_not_found")
    error_of(h.get("/v1/models/nope", headers=AUTH), 404, "model_not_found")
    error_of(h.get("/v1/nothing-here", headers=AUTH), 404)
    error_of(h.delete("/v1/models", headers=AUTH), 405)


def test_a_missing_or_wrong_key_is_401(served):
    _, h = served
    for headers in ({}, {"Authorization": "Bearer wrong-key-0000"}, {"Authorization": API_KEY},
                    {"Authorization": "Basic " + API_KEY}):
        r = h.post("/v1/chat/completions", json=CHAT, headers=headers)
        error_of(r, 401, "unauthorized")
        assert r.headers["www-authenticate"].startswith("Bearer")
        error_of(h.get("/v1/models", headers=headers), 401, "unauthorized")
    assert h.get("/healthz").status_code == 200        # health and metrics are not behind the key
    assert h.get("/metrics").status_code == 200


def test_a_body_over_the_limit_is_413(served):
    daemon, h = served
    big = {**CHAT, "messages": [{"role": "user", "content": "x" * (MAX_BODY + 1)}]}
    error_of(post(h, "/v1/chat/completions", big), 413, "oversized")

    def chunks():   # no Content-Length: the limit holds on what arrives
        for _ in range(64):
            yield b" " * 4096
    error_of(h.post("/v1/chat/completions", content=chunks(), headers=AUTH), 413, "oversized")
    assert h.get("/healthz").status_code == 200 and daemon.proc.poll() is None


def test_busy_is_429_with_retry_after(served):
    long = {"model": "tiny", "prompt": "x", "max_tokens": 100_000, "temperature": 0, "stream": True}
    daemon, h = served
    with h.stream("POST", "/v1/completions", json=long, headers=AUTH) as r:   # holds the one stream (--max-streams 1)
        assert r.status_code == 200
        lines = r.iter_lines()   # kept: a dropped iterator closes the connection, i.e. cancels the stream
        first = next(line for line in lines if line.startswith("data:"))
        assert json.loads(first[5:])["choices"], first
        with Client(daemon.socket) as c:
            assert len(c.requests()) == 1   # it runs (the tiny model's text goes quiet, the decode does not)
        second = post(h, "/v1/chat/completions", CHAT)
        if second.status_code != 429:   # say what became of the first stream
            rest = [line for _, line in zip(range(50), lines) if line]
            pytest.fail(f"second request: {second.status_code} {second.text}; the first stream then: {rest}")
        error_of(second, 429, "busy")
        assert int(second.headers["retry-after"]) >= 1
    deadline = time.monotonic() + 30   # the first one's slot frees once its cancel lands
    while post(h, "/v1/chat/completions", CHAT).status_code == 429 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert post(h, "/v1/chat/completions", CHAT).status_code == 200


def test_odd_bodies_leave_the_daemon_serving(served):
    daemon, h = served
    for body in ([CHAT] * 10, {"model": {"a": [1] * 1000}}, {str(i): i for i in range(3000)}, "\"string\"",
                 {**CHAT, "messages": [{"role": "user", "content": "\u0000\ud800"}]}, {**CHAT, "max_tokens": 10**30},
                 {**CHAT, "stop": ["x"] * 1000}):
        r = post(h, "/v1/chat/completions", body if isinstance(body, str) else json.dumps(body))
        assert 400 <= r.status_code < 500, r.text
    assert h.get("/healthz").json()["status"] == "ok" and daemon.proc.poll() is None


def test_shutting_down_is_503(served):   # last: this stops the module's daemon
    daemon, h = served
    long = {"model": "tiny", "prompt": "x", "max_tokens": 100_000, "temperature": 0, "stream": True}
    with h.stream("POST", "/v1/completions", json=long, headers=AUTH) as r:
        assert r.status_code == 200
        lines = r.iter_lines()   # kept: a dropped iterator closes the connection, i.e. cancels the stream
        next(line for line in lines if line.startswith("data:"))
        daemon.proc.send_signal(signal.SIGTERM)   # the grace keeps it serving the running stream
        assert daemon.wait_notification("STOPPING=1", 30)
        r2 = post(h, "/v1/chat/completions", CHAT)
        error_of(r2, 503, "shutting_down")
        health = h.get("/healthz")
        assert health.status_code == 503 and health.json()["status"] == "shutting_down"
    assert daemon.proc.wait(30) == 0   # our stream closed: nothing left in flight, the stop goes on


# --- start-up -----------------------------------------------------------------------------------------------
def run_sllmd(root, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLLMD_")}
    return subprocess.run([sys.executable, "-m", "sllmd", "--config", "/dev/null", "--socket", str(root / "s.sock"),
                           "--store", str(root / "store"), "--device", "cpu", "--dram", "64MiB",
                           "--device-memory", "64MiB", *args], capture_output=True, text=True, timeout=120, env=env)


def test_a_key_file_readable_by_others_is_refused():
    root = short_tempdir()
    try:
        key = root / "key"
        key.write_text(API_KEY + "\n")
        os.chmod(key, 0o644)
        run = run_sllmd(root, "--http", "127.0.0.1:0", "--api-key-file", str(key))
        assert run.returncode == 78 and "chmod 600" in run.stderr and str(key) in run.stderr, run.stderr
        os.chmod(key, 0o600)
        run = run_sllmd(root, "--api-key-file", str(key), "--print-config")
        assert run.returncode == 78 and "only with http" in run.stderr, run.stderr
        key.write_text("short\n")
        run = run_sllmd(root, "--http", "8000", "--api-key-file", str(key), "--print-config")
        assert run.returncode == 78 and "at least" in run.stderr, run.stderr
    finally:
        remove_tree(root)


@pytest.mark.parametrize("given,expected", [("8000", "127.0.0.1:8000"), (":8000", "127.0.0.1:8000"),
                                            ("0.0.0.0:80", "0.0.0.0:80"), ("[::1]:8000", "[::1]:8000"),
                                            ("localhost:0", "localhost:0")])
def test_http_address_grammar(given, expected):
    from sllmd.config import parse_http_listen
    assert parse_http_listen(given) == expected


@pytest.mark.parametrize("given", ["", "host", "host:", "host:99999", "::1:8000", "[::1:8000"])
def test_bad_http_addresses_are_refused(given):
    from sllmd.config import parse_http_listen
    from sllmd.errors import ConfigError
    with pytest.raises(ConfigError):
        parse_http_listen(given)


def test_an_address_in_use_fails_the_start():
    import socket
    root = short_tempdir()
    busy = socket.socket()
    try:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        daemon = DaemonProcess(root, "--http", f"127.0.0.1:{port}").start(expect_ready=False)
        assert daemon.proc.wait(120) == 1
        assert "already in use" in daemon.log()
        daemon.close()
    finally:
        busy.close()
        remove_tree(root)


def test_the_listener_says_tcp_so_connections_get_nodelay():
    """asyncio sets TCP_NODELAY on accepted connections only for a socket whose proto is TCP; without
    it Nagle held every stream's first chunk until the client acknowledged the headers (+40 ms)."""
    import socket
    from sllmd.http.server import bind
    listener = bind("127.0.0.1:0")
    try:
        assert listener.proto == socket.IPPROTO_TCP
        assert listener.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    finally:
        listener.close()
