"""sllmctl run / show / infer - / inspect NAME and the per-tier sizes, against a real sllmd serving
SmolLM2 (greedy: "What is the capital of France?" is answered with Paris)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from daemon_helpers import DaemonProcess, remove_tree, short_tempdir, sllmctl
from sllmd.client import Client

QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def served(smollm2_checkpoint):
    root = short_tempdir()
    daemon = DaemonProcess(root, "--keep-alive", "-1", dram="1GiB", device_memory="1GiB").start()
    try:   # a failed import must not leave the daemon running
        run = sllmctl("import", "smol", str(smollm2_checkpoint), socket_path=daemon.socket)
        assert run.returncode == 0, run.stderr
        yield daemon
    finally:
        daemon.close()
        remove_tree(root)


def cells(table: str, name: str, header: str) -> str:
    """The cell under `header` in the row of `name` (columns split on 2+ spaces)."""
    import re
    lines = table.splitlines()
    heads = re.split(r"\s{2,}", lines[0].strip())
    for line in lines[1:]:
        row = re.split(r"\s{2,}", line.strip())
        if row[0] == name:
            return row[heads.index(header)]
    raise AssertionError(f"no row {name!r} in\n{table}")


def test_show_describes_the_model(served):
    run = sllmctl("show", "smol", socket_path=served.socket)
    assert run.returncode == 0, run.stderr
    out = run.stdout
    for text in ("LlamaForCausalLM (llama)", "134.5 M", "8192", "bfloat16", "on disk", "chat template: "):
        assert text in out, out
    info = json.loads(sllmctl("show", "smol", "--json", socket_path=served.socket).stdout)
    assert info["context_length"] == 8192 and info["parameters"] == 134515008 and info["dtype"] == "bfloat16"
    assert "<|im_start|>" in info["chat_template"] and info["architecture"] == "LlamaForCausalLM"
    assert os.path.isdir(info["path"])
    full = sllmctl("show", "smol", "--template", socket_path=served.socket).stdout
    assert info["chat_template"].strip() in full
    run = sllmctl("show", "nope", socket_path=served.socket)
    assert run.returncode == 1 and "no model named 'nope'" in run.stderr


def test_load_twice_says_already_loaded_and_sizes_agree(served):
    sllmctl("evict", "smol", socket_path=served.socket)
    first = sllmctl("load", "smol", socket_path=served.socket)
    assert first.returncode == 0 and "loaded from" in first.stdout and "already" not in first.stdout
    again = sllmctl("load", "smol", socket_path=served.socket)
    assert again.returncode == 0 and "already loaded" in again.stdout, again.stdout

    models = sllmctl("models", socket_path=served.socket).stdout
    ps = sllmctl("ps", socket_path=served.socket).stdout
    status = sllmctl("status", socket_path=served.socket).stdout
    tiers = status[status.index("TIER"):status.index("\nloader: ")]
    assert "from disk (O_DIRECT)" in status and "\nloads: " in status and " ok, " in status, status
    # One model: its size on disk is the store's use, its size on the device the device's use, and
    # `models`, `ps` and `status` print the same figure for each.
    assert cells(models, "smol", "DEVICE") == cells(ps, "smol", "DEVICE SIZE") == cells(tiers, "device", "USED")
    assert cells(models, "smol", "DISK") == cells(tiers, "ssd", "USED")
    assert cells(models, "smol", "DEVICE") != "-"
    sllmctl("evict", "smol", socket_path=served.socket)
    models = sllmctl("models", socket_path=served.socket).stdout
    assert cells(models, "smol", "LAST EVICTED").startswith("device (manual) ")
    assert cells(models, "smol", "DEVICE") == "-"


def test_infer_reads_the_prompt_from_stdin(served):
    run = sllmctl("infer", "smol", "-", "--max-tokens", "12", socket_path=served.socket, input=QUESTION + "\n")
    assert run.returncode == 0, run.stderr
    assert "Paris" in run.stdout


def test_run_keeps_the_conversation(served):
    run = sllmctl("run", "smol", "--max-tokens", "12", "--stats", socket_path=served.socket,
                  input=f"{QUESTION}\nAnd of Germany?\n/clear\n\"\"\"What is the capital\nof France?\"\"\"\n"
                        "/bye\nnot read\n")
    assert run.returncode == 0, run.stderr
    answers = run.stdout.strip().splitlines()
    assert len(answers) == 3 and "Paris" in answers[0], run.stdout
    first, second, third = (json.loads(line) for line in run.stderr.splitlines() if line.startswith("{"))
    # The second turn resends the first question and its answer: its prompt holds both.
    assert second["prompt_tokens"] > first["prompt_tokens"] + first["tokens"]
    # After /clear the conversation starts afresh: one message of two lines, as long as the first.
    assert "(conversation cleared)" in run.stderr
    assert abs(third["prompt_tokens"] - first["prompt_tokens"]) <= 2


def test_run_with_a_prompt_answers_once_and_ctrl_d_leaves(served):
    run = sllmctl("run", "smol", QUESTION, "--max-tokens", "12", socket_path=served.socket)
    assert run.returncode == 0 and "Paris" in run.stdout, run.stderr
    run = sllmctl("run", "smol", "--json", "--max-tokens", "12", socket_path=served.socket, input=QUESTION)
    events = [json.loads(line) for line in run.stdout.splitlines()]
    assert run.returncode == 0 and events[-1]["type"] == "done" and {e["type"] for e in events[:-1]} == {"token"}
    assert "Paris" in "".join(e["text"] for e in events[:-1])
    run = sllmctl("run", "smol", socket_path=served.socket, input="")      # end of input at once
    assert run.returncode == 0 and run.stdout == ""
    run = sllmctl("run", "nope", socket_path=served.socket, input="hi\n")
    assert run.returncode == 1 and "no model named 'nope'" in run.stderr


def test_ctrl_c_cancels_the_answer_and_keeps_the_session(served):
    proc = subprocess.Popen([sys.executable, "-m", "sllmctl", "run", "smol", "--max-tokens", "100000",
                             "--socket", served.socket], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        proc.stdin.write("Write a very long story about a dragon who learns to read.\n")
        proc.stdin.flush()
        assert proc.stdout.read(1) != ""               # the answer is streaming
        proc.send_signal(signal.SIGINT)
        deadline = time.monotonic() + 30
        with Client(served.socket) as c:                # the daemon stops generating it
            while True:
                (inst,) = c.ps()
                if inst["active_requests"] == 0:
                    break
                assert time.monotonic() < deadline, inst
                time.sleep(0.1)
        proc.stdin.write(f"{QUESTION}\n/bye\n")
        proc.stdin.flush()
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == 0, err
    assert "(answer cancelled)" in err and "Paris" in out, (out, err)


def test_inspect_takes_a_model_name(served, smollm2_checkpoint):
    by_name = sllmctl("inspect", "smol", "--json", socket_path=served.socket)
    assert by_name.returncode == 0, by_name.stderr
    d = json.loads(by_name.stdout)
    assert d["path"].endswith("/models/smol") and d["totals"]["tensors"] > 0
    by_path = json.loads(sllmctl("inspect", str(smollm2_checkpoint), "--json").stdout)
    assert d["totals"] == by_path["totals"]
    run = sllmctl("inspect", "nope", socket_path=served.socket)
    assert run.returncode == 1 and "no model named 'nope'" in run.stderr


def test_inspect_reads_the_default_store_without_a_daemon(smollm2_checkpoint):
    """With no daemon to ask, a name is looked up in the default store ($XDG_DATA_HOME/sllm/store)."""
    root = short_tempdir()
    try:
        daemon = DaemonProcess(root)
        daemon.args[daemon.args.index("--store") + 1] = str(root / "data" / "sllm" / "store")
        with daemon:
            with Client(daemon.socket) as c:
                c.import_model("smol", smollm2_checkpoint)
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLLMD_")}
        env.update(XDG_DATA_HOME=str(root / "data"), XDG_RUNTIME_DIR=str(root / "runtime"))
        run = subprocess.run([sys.executable, "-m", "sllmctl", "inspect", "smol", "--json"], capture_output=True,
                             text=True, timeout=120, env=env)
        assert run.returncode == 0, run.stderr
        assert json.loads(run.stdout)["path"] == str(root / "data" / "sllm" / "store" / "models" / "smol")
    finally:
        remove_tree(root)


# Where readline waits for a key: select() (pselect6 in glibc) on fd 0 alone, so nfds is 1.
SELECT_SYSCALLS = {"x86_64": {23, 270}, "aarch64": {72}}
# The child makes the pty its controlling terminal, so a ^C typed on it raises SIGINT as on a user's.
ON_THE_PTY = ("import fcntl, os, sys, termios; fcntl.ioctl(0, termios.TIOCSCTTY, 0); "
              "os.execv(sys.executable, [sys.executable, '-m', 'sllmctl', *sys.argv[1:]])")


def waiting_for_a_key(pid: int) -> bool:
    """Whether pid's main thread is blocked in readline's select() on stdin.

    CPython's readline checks for signals only when that select() fails with EINTR: a SIGINT
    arriving after the prompt is drawn but before select() is entered stays pending until the
    next key (python/cpython#112585), so a ^C sent the instant the prompt appears can go
    unanswered. A user's ^C comes long after; the test waits until select() is entered."""
    import platform
    fields = open(f"/proc/{pid}/syscall").read().split()   # "running", or "NR arg1 ..." (hex args)
    return fields[0].isdigit() and int(fields[0]) in SELECT_SYSCALLS[platform.machine()] \
        and int(fields[1], 16) == 1


def test_run_on_a_terminal(served):
    """On a terminal: a >>> prompt, Ctrl-C at the prompt keeps the session, Ctrl-D leaves."""
    import pty
    import select
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-c", ON_THE_PTY, "run", "smol", "--max-tokens", "12",
                             "--socket", served.socket], stdin=slave, stdout=slave, stderr=slave,
                            start_new_session=True)
    os.close(slave)
    seen = b""

    def read_until(text: bytes, timeout: float = 120) -> None:
        nonlocal seen
        deadline = time.monotonic() + timeout
        while text not in seen:
            assert time.monotonic() < deadline and proc.poll() is None, seen.decode(errors="replace")
            if select.select([master], [], [], 0.2)[0]:
                try:
                    seen += os.read(master, 4096)
                except OSError:   # the child closed the terminal
                    break
        assert text in seen, seen
        seen = seen[seen.index(text) + len(text):]

    def wait_for_a_key(timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not waiting_for_a_key(proc.pid):
            assert time.monotonic() < deadline and proc.poll() is None, "sllmctl run never waited for a key"
            time.sleep(0.01)

    try:
        read_until(b"/bye to leave")
        read_until(b">>> ")
        wait_for_a_key()
        os.write(master, b"\x03")   # Ctrl-C, as typed: the terminal raises SIGINT
        read_until(b"Use Ctrl-D or /bye to leave.")
        read_until(b">>> ")
        os.write(master, QUESTION.encode() + b"\r")
        read_until(b"Paris")
        read_until(b">>> ")
        os.write(master, b"\x04")
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        os.close(master)
