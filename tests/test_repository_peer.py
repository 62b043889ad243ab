"""Peer transfer (DESIGN.md sections 8 and 11): a model a cluster member holds is fetched from it
over the peer socket, verified like a repository download, and not from the repository."""
from __future__ import annotations

import shutil
import time

import pytest

from cluster_helpers import close_all, make_nodes, start_all
from daemon_helpers import short_tempdir
from nginx_helpers import NGINX, Nginx
from sllmd.repository.index import publish

pytestmark = pytest.mark.skipif(NGINX is None or shutil.which("serf") is None,
                                reason="needs nginx and serf (make setup installs both)")


def _wait(what, predicate, timeout: float):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(0.2)
    raise AssertionError(f"{what}: not within {timeout} s (last: {last!r})")


def test_a_model_held_by_a_peer_comes_from_the_peer_not_the_repository(tiny_servable_checkpoint):
    root = short_tempdir("sllm-peer-")
    try:
        publish(tiny_servable_checkpoint, root / "repo", "tiny")
        with Nginx(root / "nginx", root / "repo") as ng:
            a, b = nodes = make_nodes(root, ["a", "b"], "--repository", ng.url)
            try:
                start_all(nodes)
                run = a.ctl("import", "tiny", str(tiny_servable_checkpoint))   # a local copy on a only
                assert run.returncode == 0, run.stderr

                def b_sees_a_holding_it():
                    with b.client() as c:
                        for n in c.nodes():
                            if n["name"] == "a" and any(m["name"] == "tiny" and "ssd" in m.get("tiers", [])
                                                        for m in (n.get("state") or {}).get("models") or []):
                                return True
                    return False
                _wait("b sees a's copy", b_sees_a_holding_it, 60)
                with b.client() as c:
                    text = c.generate("tiny", "hello world", max_tokens=2, node="b")   # runs on b: b fetches
                    assert isinstance(text, str)
                    [m] = [m for m in c.models() if m["name"] == "tiny"]
                    assert m["source"] == "peer://a/tiny"
                    assert c.status()["tiers"]["ssd"]["reserved_bytes"] == 0
                assert not [u for u, *_ in ng.served() if u.startswith("/tiny/")]   # not a byte from the repository
                assert (a.store / "models" / "tiny" / "data-00000.bin").read_bytes() == \
                    (b.store / "models" / "tiny" / "data-00000.bin").read_bytes()
                assert "downloaded peer://a/tiny" in b.log()
            finally:
                close_all(nodes)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_a_model_only_in_the_repository_is_placed_by_its_repository_path(tiny_servable_checkpoint):
    """No node holds it: placement prices the repository path (a node with --repository, at the
    default bandwidth before it measured one); once one holds it, a request through the other
    goes to the holder."""
    root = short_tempdir("sllm-repoplace-")
    try:
        publish(tiny_servable_checkpoint, root / "repo", "tiny")
        with Nginx(root / "nginx", root / "repo") as ng:
            a, b = nodes = make_nodes(root, ["a", "b"], "--repository", ng.url)
            try:
                start_all(nodes)
                def both_alive():
                    with a.client() as c:
                        return len([n for n in c.nodes() if n["status"] == "alive"]) == 2
                _wait("a sees b", both_alive, 60)
                with a.client() as c, c.infer("tiny", "hello", max_tokens=2, chat=False) as s:
                    list(s.events())
                    placement = s.stats["placement"]
                assert placement["winner"]["path"] == "repo", placement      # on a or b: their own SSD rates
                assert placement["winner"]["detail"]["bytes"] > 0              # decide; both may fetch
                holder = {"a": a, "b": b}[placement["node"]]
                other = b if holder is a else a

                def other_sees_the_copy():
                    with other.client() as c:
                        return any(n["name"] == holder.name and any(m["name"] == "tiny" for m in
                                                                    (n.get("state") or {}).get("models") or [])
                                   for n in c.nodes())
                _wait("the other node sees the copy", other_sees_the_copy, 60)
                with other.client() as c, c.infer("tiny", "hello", max_tokens=2, chat=False) as s:
                    list(s.events())
                    assert s.stats["placement"]["node"] == holder.name, s.stats["placement"]   # no download
                with other.client() as c:
                    assert not any(m["name"] == "tiny" for m in c.models())
            finally:
                close_all(nodes)
    finally:
        shutil.rmtree(root, ignore_errors=True)
