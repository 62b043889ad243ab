"""The node's answers as a user sees them: exit codes of sllmctl against a real sllmd
(tiny models, so these run in seconds)."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from conftest import make_tiny_model
from daemon_helpers import DaemonProcess, remove_tree, short_tempdir, sllmctl
from sllmd import store
from sllmd.client import Client
from test_inference import tiny_tokenizer


@pytest.fixture(scope="module")
def tiny_source(tmp_path_factory):
    """A tiny model with no end-of-sequence token (neither its config nor its tokenizer names one) and
    a 100,000-token context: it answers until max_tokens, so a long stream stays running. (With the
    tokenizer's EOS it ends after 365 tokens of "x", well under a second.)"""
    tok = tiny_tokenizer()
    tok.eos_token = None
    model = make_tiny_model("llama", seed=0, vocab_size=len(tok), max_position_embeddings=100_000,
                            eos_token_id=None)
    return store.save_model(model, tmp_path_factory.mktemp("src") / "m0", tokenizer=tok)


@pytest.fixture
def root():
    path = short_tempdir()
    yield path
    remove_tree(path)


def test_a_model_larger_than_the_device_budget_exits_1_with_human_sizes(root, tiny_source):
    with DaemonProcess(root, device_memory="1KiB") as daemon:
        run = sllmctl("import", "m0", str(tiny_source), socket_path=daemon.socket)
        assert run.returncode == 0, run.stderr + daemon.log()
        for verb in (["infer", "m0", "hello"], ["load", "m0"]):
            run = sllmctl(*verb, socket_path=daemon.socket)
            assert run.returncode == 1, (verb, run.returncode, run.stderr)
            assert "needs 2 MiB; the device budget on cpu is 1 KiB" in run.stderr, run.stderr
        (m,) = json.loads(sllmctl("models", "--json", socket_path=daemon.socket).stdout)
        assert m["state"] == "failed" and "needs 2 MiB" in m["error"]
        status = json.loads(sllmctl("status", "--json", socket_path=daemon.socket).stdout)
        assert status["loads"]["failed"] == 2 and status["loads"]["ok"] == 0


def test_sigterm_answers_a_running_stream_and_a_new_request_alike(root, tiny_source):
    with DaemonProcess(root, "--shutdown-grace", "120") as daemon:
        assert sllmctl("import", "m0", str(tiny_source), socket_path=daemon.socket).returncode == 0
        stream = subprocess.Popen([sys.executable, "-m", "sllmctl", "--socket", daemon.socket, "infer", "m0", "x",
                                   "--max-tokens", "100000"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                  text=True)
        try:
            deadline = time.monotonic() + 60
            with Client(daemon.socket) as probe:
                while not any(p["active_requests"] for p in probe.ps()):  # wait until it is generating
                    if time.monotonic() > deadline or stream.poll() is not None:
                        pytest.fail("the stream never started:\n" + daemon.log())
                    time.sleep(0.05)
            daemon.proc.send_signal(signal.SIGTERM)
            late = sllmctl("infer", "m0", "y", socket_path=daemon.socket)  # in the grace: answered, not taken
            daemon.proc.send_signal(signal.SIGTERM)  # a second signal cuts the grace short
            _, err = stream.communicate(timeout=60)
        finally:
            if stream.poll() is None:
                stream.kill()
        assert late.returncode == 75 and "shutting down" in late.stderr, (late.returncode, late.stderr)
        assert stream.returncode == 75 and "shutting down" in err, (stream.returncode, err)
        assert daemon.proc.wait(60) == 0
