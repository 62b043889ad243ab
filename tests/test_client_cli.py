"""sllmctl and the Python client against a real sllmd process, and the daemon's lifecycle.

A model without a tokenizer (a tiny Llama built from a config) is enough for
the catalog verbs; text generation through sllmctl runs here against the real
server with a scripted node, and against SmolLM2 in test_e2e_daemon.py.
"""
from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time

import pytest

from daemon_helpers import DaemonProcess, ScriptedNode, remove_tree, short_tempdir, sllmctl
from sllmd.client import Client
from sllmd.protocol import BusyError
from sllmd.server import Server
from sllmd.transport import ZmqTransport


@pytest.fixture(scope="module")
def daemon():
    root = short_tempdir()
    proc = DaemonProcess(root).start()
    yield proc
    proc.close()
    remove_tree(root)


@pytest.fixture
def scripted():
    """A real Server with a ScriptedNode on a temporary socket: (socket path, node)."""
    root = short_tempdir()
    transport = ZmqTransport()
    node = ScriptedNode()
    server = Server(node, transport.bind(f"ipc://{root}/s.sock", max_frame_bytes=1 << 20), heartbeat_s=0.2)
    server.start()
    yield f"{root}/s.sock", node
    server.close(timeout=2)
    transport.close()
    remove_tree(root)


def test_status_human_and_json(daemon):
    run = sllmctl("status", socket_path=daemon.socket)
    assert run.returncode == 0, run.stderr
    assert "TIER" in run.stdout and all(t in run.stdout for t in ("ssd", "dram", "device")), run.stdout
    run = sllmctl("status", "--json", socket_path=daemon.socket)
    status = json.loads(run.stdout)
    assert status["daemon"]["pid"] == daemon.proc.pid
    assert status["tiers"]["dram"]["capacity_bytes"] == 64 << 20
    assert status["uptime_s"] > 0


def test_socket_is_private_and_found_through_the_environment(daemon):
    assert stat.S_IMODE(os.stat(daemon.socket).st_mode) == 0o600
    run = sllmctl("models", "--json", env={"SLLMD_SOCKET": daemon.socket})
    assert run.returncode == 0 and isinstance(json.loads(run.stdout), list)


def test_catalog_verbs(daemon, tiny_servable_checkpoint):
    run = sllmctl("import", "tiny", str(tiny_servable_checkpoint), socket_path=daemon.socket)
    assert run.returncode == 0, run.stderr
    assert "importing tiny" in run.stderr and "100%" in run.stderr and run.stdout == ""
    models = json.loads(sllmctl("models", "--json", socket_path=daemon.socket).stdout)
    (tiny,) = [m for m in models if m["name"] == "tiny"]
    assert tiny["tiers"] == ["ssd"] and tiny["state"] == "on_ssd" and tiny["pinned"] is False
    table = sllmctl("models", socket_path=daemon.socket).stdout
    assert table.splitlines()[0].split()[:5] == ["NAME", "DISK", "DRAM", "DEVICE", "STATE"] and "tiny" in table

    assert sllmctl("pin", "tiny", socket_path=daemon.socket).returncode == 0
    with Client(daemon.socket) as c:
        assert [m["pinned"] for m in c.models() if m["name"] == "tiny"] == [True]
        c.unpin("tiny")
        assert [m["pinned"] for m in c.models() if m["name"] == "tiny"] == [False]

    run = sllmctl("evict", "tiny", "--tier", "dram", "--json", socket_path=daemon.socket)
    assert run.returncode == 0 and json.loads(run.stdout)["tier"] == "dram"
    ps = sllmctl("ps", "--json", socket_path=daemon.socket)
    assert ps.returncode == 0 and json.loads(ps.stdout) == []
    assert sllmctl("rm", "tiny", socket_path=daemon.socket).returncode == 0
    assert all(m["name"] != "tiny" for m in json.loads(sllmctl("models", "--json", socket_path=daemon.socket).stdout))


@pytest.mark.parametrize("args, code, text", [
    (["load", "nope"], 1, "no model named 'nope'"),
    (["infer", "nope", "hi"], 1, "no model named 'nope'"),
    (["load", "../etc"], 2, "name"),
    (["infer", "x", "hi", "--top-p", "0"], 2, "top_p"),
    (["evict", "x", "--tier", "floppy"], 2, "invalid choice"),
    (["load", "x", "--keep-alive", "soon"], 2, "not a duration"),
    (["import", "x", "/no/such/source"], 1, ""),
])
def test_errors_have_one_clear_line_and_an_exit_code(daemon, args, code, text):
    run = sllmctl(*args, socket_path=daemon.socket)
    assert run.returncode == code, (run.stdout, run.stderr)
    assert text in run.stderr
    if code == 1:
        assert len(run.stderr.strip().splitlines()) == 1 and run.stderr.startswith("sllmctl: error: ")


def test_no_daemon_is_exit_69_with_one_line():
    root = short_tempdir()
    try:
        for verb in (["status"], ["models", "--json"], ["infer", "m", "hi"]):
            run = sllmctl(*verb, socket_path=str(root / "none.sock"))
            assert run.returncode == 69
            assert run.stderr.strip().count("\n") == 0 and "sllmd is not running" in run.stderr
    finally:
        remove_tree(root)


def test_infer_streams_to_stdout_and_busy_is_75(scripted):
    path, node = scripted
    run = sllmctl("infer", "echo", "the capital is Paris", "--max-tokens", "4", "--stats", socket_path=path)
    assert run.returncode == 0, run.stderr
    assert run.stdout == "the capital is Paris \n"
    assert json.loads(run.stderr.strip().splitlines()[-1])["tokens"] == 4
    run = sllmctl("infer", "echo", "a b", "--max-tokens", "2", "--json", socket_path=path)
    assert [json.loads(line)["type"] for line in run.stdout.splitlines()] == ["token", "token", "done"]

    node.load_error = BusyError("the queue is full")
    run = sllmctl("load", "echo", socket_path=path)
    assert run.returncode == 75 and "queue is full" in run.stderr


def test_infer_output_arrives_while_generating(scripted):
    path, node = scripted
    node.token_delay = 0.3
    proc = subprocess.Popen([sys.executable, "-m", "sllmctl", "infer", "echo", "first second third",
                             "--max-tokens", "3", "--socket", path], stdout=subprocess.PIPE, text=True)
    try:
        first = proc.stdout.read(6)              # arrives before the rest is generated
        t_first = time.monotonic()
        rest = proc.stdout.read()
        assert first == "first " and rest == "second third \n"
        assert time.monotonic() - t_first > 0.3
    finally:
        proc.wait(30)


def test_ctrl_c_cancels_the_request(scripted):
    path, node = scripted
    node.token_delay = 0.05
    proc = subprocess.Popen([sys.executable, "-m", "sllmctl", "infer", "echo", "w", "--max-tokens", "100000",
                             "--socket", path], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.read(2) == "w "
    proc.send_signal(signal.SIGINT)
    assert proc.wait(30) == 130
    assert node.wait_closed_early(1, timeout=5)


# --- the daemon's lifecycle --------------------------------------------------------------------------
def test_sigterm_and_sigint_stop_cleanly_and_notify_systemd():
    root = short_tempdir()
    try:
        for sig in (signal.SIGTERM, signal.SIGINT):
            daemon = DaemonProcess(root).start()
            assert any(n.startswith("READY=1") for n in daemon.notifications)
            assert os.path.exists(daemon.socket)
            assert daemon.stop(sig) == 0
            assert daemon.wait_notification("STOPPING=1", 1)
            assert not os.path.exists(daemon.socket)
            daemon.close()
        log = daemon.log()
        assert "stopping (SIGTERM)" in log and "stopping (SIGINT)" in log and "Traceback" not in log
    finally:
        remove_tree(root)


def test_one_daemon_per_socket_and_the_store_survives_a_restart(tiny_servable_checkpoint):
    root = short_tempdir()
    try:
        with DaemonProcess(root) as first:
            with Client(first.socket) as c:
                c.import_model("keepme", tiny_servable_checkpoint)
            second = DaemonProcess(root)
            second.start(expect_ready=False)
            assert second.proc.wait(60) == 1
            assert "already listening" in second.log()
            with Client(first.socket) as c:                       # the first one is untouched
                assert c.ping() < 1
        with DaemonProcess(root) as again:
            with Client(again.socket) as c:
                (m,) = c.models()
                assert m["name"] == "keepme" and m["tiers"] == ["ssd"] and m["state"] == "on_ssd"
    finally:
        remove_tree(root)


def test_a_client_recovers_when_the_daemon_restarts(tiny_servable_checkpoint):
    root = short_tempdir()
    try:
        daemon = DaemonProcess(root).start()
        c = Client(daemon.socket)
        try:
            assert c.models() == []
            daemon.close()
            daemon = DaemonProcess(root).start()
            assert c.models() == []                           # says hello again on the new daemon
        finally:
            c.close()
            daemon.close()
    finally:
        remove_tree(root)


def test_bad_config_exits_78_and_version_prints():
    run = subprocess.run([sys.executable, "-m", "sllmd", "--dram", "lots"], capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 78 and "dram" in run.stderr and "not a size" in run.stderr
    run = subprocess.run([sys.executable, "-m", "sllmd", "--version"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and run.stdout.startswith("sllmd ") and "protocol 1" in run.stdout


def test_a_second_daemon_on_the_same_store_fails_cleanly():
    root = short_tempdir()
    other = short_tempdir()
    try:
        with DaemonProcess(root) as first:
            second = DaemonProcess(other)
            second.args[second.args.index("--store") + 1] = str(first.store)
            second.start(expect_ready=False)
            assert second.proc.wait(60) == 1
            log = second.log()
            assert "cannot start" in log and "Traceback" not in log
            assert not os.path.exists(second.socket)          # its socket is gone again
            second.close()
            with Client(first.socket) as c:
                assert c.models() == []
    finally:
        remove_tree(root)
        remove_tree(other)
