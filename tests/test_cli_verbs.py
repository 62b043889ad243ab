"""sllmctl's options and daemon discovery against a real sllmd: global options before the verb,
--json on every verb, --version, defaults in --help, --timeout > 0, the systemd socket fallback."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import pytest

import sllmd.client
from daemon_helpers import DaemonProcess, remove_tree, short_tempdir, sllmctl
from sllmctl.__main__ import build_parser, main


@pytest.fixture(scope="module")
def daemon(tiny_servable_checkpoint):
    root = short_tempdir()
    proc = DaemonProcess(root).start()
    try:   # a failed import must not leave the daemon running
        run = sllmctl("import", "tiny", str(tiny_servable_checkpoint), socket_path=proc.socket)
        assert run.returncode == 0, run.stderr
        yield proc
    finally:
        proc.close()
        remove_tree(root)


def clean_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLLMD_") and k != "XDG_RUNTIME_DIR"}
    return {**env, **extra}


def test_socket_and_json_go_before_the_verb_too(daemon):
    before = sllmctl("--socket", daemon.socket, "--json", "models")
    after = sllmctl("models", "--json", "--socket", daemon.socket)
    assert before.returncode == after.returncode == 0, (before.stderr, after.stderr)
    assert [m["name"] for m in json.loads(before.stdout)] == [m["name"] for m in json.loads(after.stdout)] == ["tiny"]
    # A value after the verb wins over one before it.
    run = sllmctl("--socket", "/nonexistent/x.sock", "status", "--json", "--socket", daemon.socket)
    assert run.returncode == 0 and json.loads(run.stdout)["daemon"]["pid"] == daemon.proc.pid


def test_json_on_pin_unpin_and_rm(daemon, tiny_servable_checkpoint):
    assert json.loads(sllmctl("--json", "pin", "tiny", socket_path=daemon.socket).stdout) == \
        {"name": "tiny", "pinned": True}
    assert json.loads(sllmctl("unpin", "tiny", "--json", socket_path=daemon.socket).stdout) == \
        {"name": "tiny", "pinned": False}
    assert sllmctl("import", "gone", str(tiny_servable_checkpoint), socket_path=daemon.socket).returncode == 0
    run = sllmctl("rm", "gone", "--json", socket_path=daemon.socket)
    assert run.returncode == 0 and {"name": "gone", "removed": True}.items() <= json.loads(run.stdout).items()
    run = sllmctl("import", "again", str(tiny_servable_checkpoint), "--json", socket_path=daemon.socket)
    assert run.returncode == 0 and json.loads(run.stdout)["name"] == "again"
    assert sllmctl("rm", "again", socket_path=daemon.socket).returncode == 0


def test_every_verb_takes_json_socket_and_timeout():
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name, parser in sub.choices.items():
        dests = {a.dest for a in parser._actions}
        assert {"json", "socket", "timeout"} <= dests, name


def test_version():
    run = subprocess.run([sys.executable, "-m", "sllmctl", "--version"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and run.stdout.startswith("sllmctl ") and "protocol 1" in run.stdout


def test_every_option_that_takes_a_value_states_its_default():
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    missing = []
    for name, parser in sub.choices.items():
        text = parser.format_help()
        for action in parser._actions:
            if not action.option_strings or action.nargs == 0 or isinstance(action, argparse._AppendAction):
                continue
            help_text = parser.formatter_class(prog=name)._get_help_string(action)
            if "default" not in help_text:
                missing.append(f"{name} {action.option_strings[0]}")
        assert "(default:" in text or name in ("inspect",), name
    assert missing == []
    assert "(default: 256)" in " ".join(sub.choices["infer"].format_help().split())


@pytest.mark.parametrize("value", ["0", "-1", "nan", "soon"])
def test_timeout_must_be_positive(value):
    run = sllmctl("status", "--timeout", value)
    assert run.returncode == 2 and "--timeout" in run.stderr and "Traceback" not in run.stderr


def test_infer_reads_the_prompt_from_stdin_and_refuses_an_empty_one(daemon):
    run = sllmctl("infer", "tiny", "-", socket_path=daemon.socket, input="   \n")
    assert run.returncode == 2 and "stdin is empty" in run.stderr


def test_convert_says_overwrite_the_cli_way(tiny_servable_checkpoint, tmp_path, capsys):
    dest = tmp_path / "exists"
    dest.mkdir()
    assert main(["convert", str(tiny_servable_checkpoint), str(dest)]) == 1
    err = capsys.readouterr().err
    assert "use --overwrite" in err and "overwrite=True" not in err


# --- finding the daemon --------------------------------------------------------------------------------
def test_the_systemd_socket_is_found_when_no_other_is_given(daemon, tmp_path, monkeypatch, capsys):
    """No --socket, no $SLLMD_SOCKET, no per-user socket: the client tries the systemd unit's path
    (here pointed at the test daemon, since /run/sllmd is the real system's)."""
    for key in [k for k in os.environ if k.startswith("SLLMD_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))          # the per-user socket is absent
    monkeypatch.setattr(sllmd.client, "SYSTEM_SOCKET", daemon.socket)
    assert sllmd.client.socket_candidates() == [str(tmp_path / "sllm" / "sllmd.sock"), daemon.socket]
    assert main(["--json", "models"]) == 0
    assert [m["name"] for m in json.loads(capsys.readouterr().out)] == ["tiny"]
    with sllmd.client.Client() as c:
        assert c.socket == daemon.socket


def test_the_per_user_socket_comes_first(daemon, monkeypatch):
    root = short_tempdir()
    try:
        (root / "sllm").mkdir()
        os.symlink(daemon.socket, root / "sllm" / "sllmd.sock")
        for key in [k for k in os.environ if k.startswith("SLLMD_")]:
            monkeypatch.delenv(key)
        monkeypatch.setenv("XDG_RUNTIME_DIR", str(root))
        monkeypatch.setattr(sllmd.client, "SYSTEM_SOCKET", "/nonexistent/sllmd.sock")
        with sllmd.client.Client() as c:
            assert c.socket == str(root / "sllm" / "sllmd.sock") and c.models()
    finally:
        remove_tree(root)


def test_not_running_names_every_path_it_tried():
    if os.path.exists(sllmd.client.SYSTEM_SOCKET):
        pytest.skip("a system sllmd socket exists on this host")
    root = short_tempdir()
    try:
        run = subprocess.run([sys.executable, "-m", "sllmctl", "status"], capture_output=True, text=True, timeout=60,
                             env=clean_env(XDG_RUNTIME_DIR=str(root)))
        assert run.returncode == 69, run.stderr
        line = run.stderr.strip()
        assert "\n" not in line and "sllmd is not running" in line
        assert str(root / "sllm" / "sllmd.sock") in line and "/run/sllmd/sllmd.sock" in line
    finally:
        remove_tree(root)


def test_a_negative_duration_is_a_value_not_an_option(daemon):
    run = sllmctl("load", "tiny", "--keep-alive", "-1m", "--json", socket_path=daemon.socket)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["expires_at"] is None              # negative: loaded forever
    assert "kept loaded until stopped" in sllmctl("load", "tiny", "--keep-alive", "-1s", socket_path=daemon.socket).stdout
    assert sllmctl("evict", "tiny", socket_path=daemon.socket).returncode == 0
    run = sllmctl("load", "tiny", "--keep-alive", "-soon", socket_path=daemon.socket)
    assert run.returncode == 2 and "not a duration: '-soon'" in run.stderr
