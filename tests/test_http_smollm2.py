"""The real SmolLM2 checkpoint (bf16, its own chat template) through the OpenAI HTTP API: the
same greedy answer as `sllmctl infer`, streamed and whole, its first request loading it."""
from __future__ import annotations

import json

import openai
import pytest

from daemon_helpers import remove_tree, short_tempdir, sllmctl
from test_http import start_http_daemon

pytestmark = pytest.mark.slow
QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def served(smollm2_checkpoint):
    root = short_tempdir()
    daemon, url = start_http_daemon(root, smollm2_checkpoint, key=None, name="smol", dram="1GiB")
    yield daemon, url
    daemon.close()
    remove_tree(root)


def test_smollm2_over_http_answers_as_sllmctl_infer(served):
    daemon, url = served
    with openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300) as c:
        chunks = list(c.chat.completions.create(model="smol", messages=[{"role": "user", "content": QUESTION}],
                                                max_tokens=16, temperature=0, stream=True))
        streamed = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        whole = c.chat.completions.create(model="smol", messages=[{"role": "user", "content": QUESTION}],
                                          max_tokens=16, temperature=0)
    run = sllmctl("infer", "smol", QUESTION, "--max-tokens", "16", "--temperature", "0", "--json",
                  socket_path=daemon.socket)
    assert run.returncode == 0, run.stderr
    cli = "".join(e["text"] for e in map(json.loads, run.stdout.splitlines()) if e["type"] == "token")
    assert streamed == whole.choices[0].message.content == cli
    assert "Paris" in cli
