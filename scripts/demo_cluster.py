"""`make demo-cluster`: three sllmd nodes on loopback placing requests on the node that holds the model.

Starts nodes A, B and C (each its own store, socket, Serf agent and Curve peer socket; B and C join A;
one shared cluster key made with `sllmctl keygen`), waits until `sllmctl nodes` shows all three alive,
imports SmolLM2 on B and C, leaves it in B's DRAM (load, then evict from the device), and asks A: the
request runs on B and the output says why (the placement in the request's stats). Then B is killed
with SIGKILL: `sllmctl nodes` shows it failed and the next request at A still succeeds, on C.
Every step runs the real `sllmctl` command a user would type.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from demo import NAME, Daemon, cache_entry, indent, model_source, say, sllmctl  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Node:
    def __init__(self, root: Path, name: str, key: Path, join: str | None):
        self.name, self.root = name, root / name
        self.root.mkdir()
        self.socket = str(self.root / "sllmd.sock")
        self.gossip = f"127.0.0.1:{free_port()}"
        self.peer = f"tcp://127.0.0.1:{free_port()}"
        self.args = ["--config", "/dev/null", "--socket", self.socket, "--store", str(self.root / "store"),
                     "--dram", "1GiB", "--device-memory", "1GiB", "--keep-alive", "-1",
                     "--node-name", name, "--peer-listen", self.peer, "--gossip-listen", self.gossip,
                     "--cluster-key", str(key), "--serf-profile", "local"] + (["--join", join] if join else [])
        self.daemon = Daemon(self.root, self.args)
        self.error: BaseException | None = None

    def ctl(self, env: dict, *args: str, show: bool = True, check: bool = True):
        run = sllmctl(env, *args, "--socket", self.socket, show=f"{shlex.join(args)}    # at {self.name}",
                      check=check, quiet=not show)
        return run

    def start(self, env: dict) -> None:
        try:
            self.daemon.start(env)
        except BaseException as e:   # reported by the caller
            self.error = e

    def children(self) -> list[int]:
        out = []
        for task in Path(f"/proc/{self.daemon.proc.pid}/task").glob("*"):
            try:
                out += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                pass
        return out


def wait(what: str, check, timeout: float) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if check():
            return time.monotonic() - t0
        time.sleep(0.2)
    raise RuntimeError(f"timed out after {timeout:.0f} s waiting until {what}")


def statuses(node: Node, env: dict) -> dict[str, str]:
    run = node.ctl(env, "nodes", "--json", show=False, check=False)
    return {n["name"]: n["status"] for n in json.loads(run.stdout)} if run.returncode == 0 else {}


def ask(node: Node, env: dict, question: str, max_tokens: int) -> dict:
    run = node.ctl(env, "infer", NAME, question, "--max-tokens", str(max_tokens), "--stats")
    say(indent(run.stdout.strip()))
    stats = json.loads(run.stderr.strip().splitlines()[-1])
    p = stats.get("placement") or {}
    win, second = p.get("winner") or {}, p.get("runner_up") or {}
    why = f"from its {win.get('path')} (estimated {win.get('seconds', 0):.2f} s)" if win else ""
    alt = f"; runner-up {second.get('node')} from {second.get('path')} ({second.get('seconds', 0):.2f} s)" \
        if second else ""
    tried = "".join(f"; tried {t['node']} first ({t['error']})" for t in p.get("tried") or [])
    say(f"    [placed on {p.get('node')} {why}{alt}{tried}; {stats.get('tokens')} tokens]")
    return stats


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--question", default="What is the capital of France?")
    parser.add_argument("--max-tokens", type=int, default=16)
    args = parser.parse_args()

    source, _ = model_source(cache_entry())
    root = Path(tempfile.mkdtemp(prefix="sllm-cluster-", dir="/tmp"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLLMD_")}
    env.update(TQDM_DISABLE="1", PYTHONUNBUFFERED="1")
    key = root / "cluster.key"
    say("sllm cluster demo: three nodes on loopback\n")
    sllmctl(env, "keygen", str(key))
    a = Node(root, "A", key, None)
    b, c = Node(root, "B", key, a.gossip), Node(root, "C", key, a.gossip)
    nodes = [a, b, c]
    code = 1
    try:
        for n in nodes:
            say(f"$ sllmd {' '.join(n.args)} &")
        threads = [threading.Thread(target=n.start, args=(env,)) for n in nodes]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for n in nodes:
            if n.error is not None:
                raise RuntimeError(f"node {n.name}: {n.error}\n{n.daemon.log_tail()}")
        took = wait("A sees three alive nodes",
                    lambda: statuses(a, env) == {"A": "alive", "B": "alive", "C": "alive"}, 60)
        say(f"    [all three ready; A saw B and C alive {took:.1f} s later]")
        say(indent(a.ctl(env, "nodes").stdout))

        for n in (b, c):
            n.ctl(env, "import", NAME, str(source))
        b.ctl(env, "load", NAME)
        b.ctl(env, "evict", NAME, "--tier", "device")
        say("    [B holds the model in DRAM, C on its SSD only, A not at all]")

        def a_sees_b_dram() -> bool:
            rows = json.loads(a.ctl(env, "models", "--all", "--json", show=False).stdout)
            return any(r.get("node") == "B" and "dram" in (r.get("tiers") or []) for r in rows)
        wait("A's view shows B's DRAM copy", a_sees_b_dram, 30)
        say(indent(a.ctl(env, "models", "--all").stdout))

        first = ask(a, env, args.question, args.max_tokens)
        if (first.get("placement") or {}).get("node") != "B":
            raise RuntimeError("the request was not placed on B, which holds the model in DRAM")

        say(f"$ kill -9 {b.daemon.proc.pid}    # B")
        agents = b.children()
        b.daemon.proc.send_signal(signal.SIGKILL)
        b.daemon.proc.wait(10)
        took = wait("A sees B failed", lambda: statuses(a, env).get("B") == "failed", 60)
        say(f"    [A marked B failed {took:.1f} s after the kill]")
        say(indent(a.ctl(env, "nodes").stdout))
        second = ask(a, env, args.question, args.max_tokens)
        if (second.get("placement") or {}).get("node") != "C":
            raise RuntimeError("with B gone the request should have run on C")
        for pid in agents:   # B's Serf agent, if it outlived B
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        code = 0
    except Exception as e:
        say(f"demo failed: {e}")
        for n in nodes:
            say(f"--- {n.name}'s log (last lines) ---\n{n.daemon.log_tail()}")
    finally:
        for n in (a, c):
            try:
                n.daemon.stop()
            except Exception as e:
                say(f"stopping {n.name}: {e}")
        if b.daemon.proc is not None and b.daemon.proc.poll() is None:
            b.daemon.proc.kill()
            b.daemon.proc.wait(10)
        if code == 0:
            import shutil
            shutil.rmtree(root, ignore_errors=True)
        else:
            say(f"(logs kept in {root})")
    return code


if __name__ == "__main__":
    sys.exit(main())
