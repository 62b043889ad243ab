"""The HTTP API of a cluster node: two real sllmd nodes on loopback (each with its own Serf
agent), the tiny model only on B; A serves --http. A request to A's HTTP API is placed on B
and relayed, exactly as an IPC request to A is (same answer), and A's /v1/models lists the
model where it is (B)."""
from __future__ import annotations

import json
import re
import shutil
import time

import openai
import pytest

from cluster_helpers import ClusterNode, close_all, start_all, write_cluster_key
from daemon_helpers import remove_tree, short_tempdir
from test_http import API_KEY, checkpoint, http_url   # noqa: F401 -- checkpoint is a fixture

pytestmark = pytest.mark.skipif(shutil.which("serf") is None, reason="serf is not installed (make setup installs it)")

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def cluster(checkpoint):   # noqa: F811
    root = short_tempdir("sllm-hcl-")
    key = root / "cluster.key"
    write_cluster_key(key)
    sizes = {"dram": "64MiB", "device_memory": "512MiB"}
    a = ClusterNode(root / "a", "A", key, None, "--http", "127.0.0.1:0", **sizes)
    b = ClusterNode(root / "b", "B", key, a.gossip, **sizes)
    nodes = [a, b]
    try:
        start_all(nodes)
        run = b.ctl("import", "tiny", str(checkpoint))
        assert run.returncode == 0, run.stderr
        yield a, b
    finally:
        close_all(nodes)
        remove_tree(root)


def _models_at_a(url: str) -> list:
    """A's listing of `tiny` once B's copy is servable there (a view pulled during B's import lists it
    as importing, and placement rightly skips a copy that is not ready)."""
    with openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60) as c:
        return [m for m in c.models.list().data if m.id == "tiny"
                and any(loc.get("state") not in (None, "importing") for loc in m.model_extra["locations"])]


def test_a_request_to_a_is_placed_on_b_and_answered(cluster):
    a, b = cluster
    url = http_url(a)
    deadline = time.monotonic() + 30   # A learns B's models from B's pulled state
    while not _models_at_a(url) and time.monotonic() < deadline:
        time.sleep(0.2)
    (tiny,) = _models_at_a(url)
    assert [loc["node"] for loc in tiny.model_extra["locations"]] == ["B"]

    with openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120) as c:
        whole = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": PROMPT}],
                                          max_tokens=12, temperature=0)
        chunks = list(c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": PROMPT}],
                                                max_tokens=12, temperature=0, stream=True))
    streamed = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert whole.choices[0].message.content == streamed and streamed
    assert whole.usage.completion_tokens > 0
    with b.client() as cb:   # it ran (and was loaded) on B, not on A
        assert [p["name"] for p in cb.ps()] == ["tiny"]
    with a.client() as ca:
        assert ca.ps() == []

    run = a.ctl("infer", "tiny", PROMPT, "--max-tokens", "12", "--temperature", "0", "--json", "--stats")
    assert run.returncode == 0, run.stderr
    ipc = "".join(e["text"] for e in map(json.loads, run.stdout.splitlines()) if e["type"] == "token")
    assert ipc == streamed
    stats = json.loads(run.stderr.strip().splitlines()[-1])
    assert stats["placement"]["node"] == "B"
    assert re.search(r"http on http://127\.0\.0\.1:\d+", " ".join(a.notifications))


def test_an_unknown_model_at_a_is_404(cluster):
    a, _ = cluster
    with openai.OpenAI(base_url=http_url(a) + "/v1", api_key="unused", max_retries=0, timeout=60) as c:
        with pytest.raises(openai.NotFoundError):
            c.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
