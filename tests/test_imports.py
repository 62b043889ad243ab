"""Imports: conversions in a child process (never stalling other loads), cancellation by
`rm` and by shutdown, progress while a GGUF file is dequantized, the `importing` state,
capacity evictions reported to the importer, and pinned models kept unless --force."""
from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

from conftest import make_tiny_model
from daemon_helpers import DaemonProcess, remove_tree, short_tempdir, sllmctl
from sllmd import store
from sllmd.client import Client
from sllmd.errors import (CancelledError, ConversionError, ModelExistsError, ModelNotFoundError, ModelPinnedError,
                          SllmError)
from sllmd.tiers.importer import convert_in_child
from sllmd.tiers.ssd import SsdStore
from test_inference import tiny_tokenizer

MiB = 1 << 20


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    tok = tiny_tokenizer()
    root = tmp_path_factory.mktemp("tiny")
    return store.save_model(make_tiny_model("llama", seed=1, vocab_size=len(tok)), root / "tiny", tokenizer=tok)


def blob(path: Path, mib: int, seed: int = 0) -> Path:
    """A checkpoint of `mib` MiB of random bytes (our format: imported by copying)."""
    g = torch.Generator().manual_seed(seed)
    return store.save_state_dict({"w": torch.randint(0, 255, (mib * MiB,), dtype=torch.uint8, generator=g)}, path)


@pytest.fixture
def daemon_root():
    root = short_tempdir()
    yield root
    remove_tree(root)


class ImportThread(threading.Thread):
    """Runs one import through the Python client, recording its events and outcome."""

    def __init__(self, socket: str, name: str, source: Path):
        super().__init__(daemon=True)
        self.socket, self.name, self.source = socket, name, source
        self.events: list[tuple[float, str, dict]] = []
        self.bytes: list[tuple[float, int, int]] = []
        self.result: dict | None = None
        self.error: BaseException | None = None
        self.finished_at: float | None = None

    def run(self) -> None:
        try:
            with Client(self.socket, timeout=300) as c:
                self.result = c.import_model(
                    self.name, self.source,
                    progress=lambda d, t: self.bytes.append((time.monotonic(), d, t)),
                    on_event=lambda e, d: self.events.append((time.monotonic(), e, d)))
        except BaseException as e:  # noqa: BLE001 - the test inspects it
            self.error = e
        finally:
            self.finished_at = time.monotonic()

    def wait_for_phase(self, phase: str, timeout: float = 180.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.is_alive():
            for _, event, data in list(self.events):
                if event == "phase" and data.get("phase") == phase and data.get("done", 0) > 0:
                    return data
            time.sleep(0.05)
        raise AssertionError(f"no {phase!r} phase reported (events: {self.events[-5:]}, error: {self.error!r})")


def models(socket: str) -> dict[str, dict]:
    with Client(socket) as c:
        return {m["name"]: m for m in c.models()}


def staging_is_empty(store_dir: Path) -> bool:
    return not any((store_dir / "staging").iterdir())


# --- the child process --------------------------------------------------------------------------
def test_a_conversion_error_in_the_child_comes_back_with_its_class(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)
    with pytest.raises(ConversionError, match="bad.gguf"):
        convert_in_child(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_child_conversion_writes_what_convert_writes_and_reports_phases(tmp_path, tiny_models):
    from test_convert import write_tiny_gguf

    gguf = tmp_path / "tiny.gguf"
    write_tiny_gguf(tiny_models("llama"), gguf)
    events, written = [], []
    convert_in_child(gguf, tmp_path / "child", notify=lambda e, d: events.append(d),
                     progress=lambda d, t: written.append((d, t)))
    store.convert(gguf, tmp_path / "here")
    a, b = store.load_state_dict(tmp_path / "child"), store.load_state_dict(tmp_path / "here")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    phases = [d["phase"] for d in events]
    assert "dequantizing" in phases and phases[-1] == "writing" and written[-1][0] == written[-1][1] > 0
    assert all(d["elapsed_s"] >= 0 for d in events)


def converter_pids(log_text: str) -> list[int]:
    return [int(line.rsplit(" ", 1)[1]) for line in log_text.splitlines() if "runs in process" in line]


def is_running(pid: int) -> bool:
    try:
        return b"sllmd.tiers.importer" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def test_cancelling_kills_the_converter(tmp_path, smollm2_gguf, caplog):
    caplog.set_level("DEBUG", logger="sllmd.tiers.importer")
    seen: list[dict] = []
    with pytest.raises(CancelledError):
        convert_in_child(smollm2_gguf, tmp_path / "out", notify=lambda e, d: seen.append(d),
                         cancelled=lambda: any(d["phase"] == "dequantizing" for d in seen))
    (pid,) = converter_pids(caplog.text)
    assert not is_running(pid)


# --- the store ------------------------------------------------------------------------------------
def test_a_cancelled_copy_leaves_nothing_behind(tmp_path):
    src = blob(tmp_path / "src", 40)
    s = SsdStore(tmp_path / "store")
    s.open()
    try:
        calls = []
        with pytest.raises(CancelledError):
            s.import_model("big", src, progress=lambda d, t: calls.append(d), cancelled=lambda: bool(calls))
        assert "big" not in s and s.importing() == [] and staging_is_empty(tmp_path / "store")
        s.import_model("big", src)  # the name is free again
        assert "big" in s
    finally:
        s.close()


def test_pinned_models_are_removed_only_with_force(tmp_path):
    s = SsdStore(tmp_path / "store")
    s.open()
    try:
        s.import_model("keep", blob(tmp_path / "src", 1))
        s.set_pinned("keep", True)
        with pytest.raises(ModelPinnedError, match="pinned"):
            s.remove("keep")
        assert "keep" in s
        s.remove("keep", force=True)
        assert "keep" not in s
    finally:
        s.close()


# --- the daemon --------------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_gguf_import_runs_beside_loads_and_shows_its_progress(daemon_root, smollm2_gguf, tiny_checkpoint):
    with DaemonProcess(daemon_root) as d:
        with Client(d.socket) as c:
            c.import_model("tiny", tiny_checkpoint)
            c.load("tiny")  # takes the skeleton prepared after its import
        imp = ImportThread(d.socket, "smol", smollm2_gguf)
        imp.start()
        deq = imp.wait_for_phase("dequantizing")  # per tensor, while the GGUF file is dequantized
        assert deq["unit"] == "tensors" and 0 < deq["done"] <= deq["total"] and "elapsed_s" in deq

        listed = models(d.socket)["smol"]  # listed while it runs, and never as a usable model
        assert listed["state"] == "importing" and listed["tiers"] == [] and listed["import"]["phase"]
        with Client(d.socket) as c:
            with pytest.raises(ModelExistsError, match="is being imported"):
                c.import_model("smol", smollm2_gguf)
            with pytest.raises(ModelNotFoundError, match="is being imported"):
                c.load("smol")
            c.evict("tiny")  # rebuilding its skeleton needs the process-wide model-construction lock
            loaded = c.load("tiny")
            load_done = time.monotonic()
        assert loaded["state"] == "loaded"
        imp.join(300)
        assert imp.error is None, f"{imp.error!r}\n{d.log()[-3000:]}"
        assert load_done < imp.finished_at, "the load waited for the conversion"

        phases = [data["phase"] for _, event, data in imp.events if event == "phase"]
        assert phases.index("dequantizing") < phases.index("writing")
        first_byte = imp.bytes[0][0]
        assert any(t < first_byte for t, e, data in imp.events if data.get("phase") == "dequantizing")
        assert imp.result["name"] == "smol" and imp.result["evicted"] == []
        assert models(d.socket)["smol"]["state"] == "on_ssd"
        assert staging_is_empty(d.store)


@pytest.mark.slow
def test_rm_cancels_an_import_and_a_failed_import_leaves_nothing(daemon_root, smollm2_gguf, tmp_path):
    with DaemonProcess(daemon_root) as d:
        imp = ImportThread(d.socket, "smol", smollm2_gguf)
        imp.start()
        imp.wait_for_phase("dequantizing")
        rm = sllmctl("rm", "smol", socket_path=d.socket)
        assert rm.returncode == 0, rm.stderr
        assert "cancelled" in rm.stdout
        imp.join(60)
        assert isinstance(imp.error, CancelledError), imp.error
        assert "smol" not in models(d.socket) and staging_is_empty(d.store)
        again = sllmctl("rm", "smol", socket_path=d.socket)
        assert again.returncode == 1 and "no model named" in again.stderr

        bad = tmp_path / "broken.gguf"
        bad.write_bytes(b"GGUF" + os.urandom(256))
        for _ in range(2):  # the same honest error twice: a failed import never claims the name
            run = sllmctl("import", "broken", str(bad), socket_path=d.socket)
            assert run.returncode == 1 and "already exists" not in run.stderr, run.stderr
        assert "broken" not in models(d.socket) and staging_is_empty(d.store)
        rm = sllmctl("rm", "broken", socket_path=d.socket)
        assert rm.returncode == 1 and "no model named" in rm.stderr


def unit_stop_timeout() -> float:
    """TimeoutStopSec of systemd/sllmd.service, in seconds."""
    from sllmd.config import parse_duration

    unit = (Path(__file__).resolve().parent.parent / "systemd" / "sllmd.service").read_text()
    (value,) = [line.split("=", 1)[1].strip() for line in unit.splitlines() if line.startswith("TimeoutStopSec=")]
    return parse_duration(value)


@pytest.mark.slow
def test_shutdown_cancels_an_import_and_leaves_no_trace(daemon_root, smollm2_gguf):
    d = DaemonProcess(daemon_root, "--shutdown-grace", "1s").start()
    try:
        imp = ImportThread(d.socket, "smol", smollm2_gguf)
        imp.start()
        imp.wait_for_phase("dequantizing")
        assert d.stop(signal.SIGTERM, timeout=unit_stop_timeout()) == 0  # before systemd would SIGKILL it
        imp.join(30)
        assert isinstance(imp.error, SllmError), imp.error
        assert staging_is_empty(d.store) and not (d.store / "models" / "smol").exists()
        catalog = json.loads((d.store / "catalog.json").read_text())
        assert "smol" not in catalog["models"]
        (pid,) = converter_pids(d.log())
        assert not is_running(pid)
    finally:
        d.close()


def servable(path: Path, seed: int) -> Path:
    """A small servable model (config, weights, tokenizer) of a few MiB."""
    tok = tiny_tokenizer()
    model = make_tiny_model("llama", seed=seed, vocab_size=len(tok), hidden_size=256, intermediate_size=1024)
    return store.save_model(model, path, tokenizer=tok)


def test_capacity_evictions_are_reported_and_pins_need_force(daemon_root, tmp_path):
    one, two = servable(tmp_path / "a", 1), servable(tmp_path / "b", 2)
    size = sum(f.stat().st_size for f in one.rglob("*") if f.is_file())
    with DaemonProcess(daemon_root, "--ssd-capacity", str(size * 3 // 2)) as d:  # room for one model only
        with Client(d.socket) as c:
            c.import_model("old", one)
            events: list[tuple[str, dict]] = []
            info = c.import_model("new", two, on_event=lambda e, data: events.append((e, data)))
            assert [e["name"] for e in info["evicted"]] == ["old"]
            assert info["evicted"][0]["reason"] == "lru" and info["evicted"][0]["size_bytes"] > 0
            assert [data["name"] for e, data in events if e == "evicted"] == ["old"]
        assert "evicting old from the ssd store" in d.log()
        assert set(models(d.socket)) == {"new"}

        assert sllmctl("pin", "new", socket_path=d.socket).returncode == 0
        for verb in (["rm", "new"], ["evict", "new", "--tier", "ssd"]):
            run = sllmctl(*verb, socket_path=d.socket)
            assert run.returncode == 1 and "pinned" in run.stderr and "--force" in run.stderr, run.stderr
            assert "new" in models(d.socket)
        with Client(d.socket) as c:  # capacity never evicts a pinned model either
            with pytest.raises(SllmError, match="pinned or in use"):
                c.import_model("third", one)
        run = sllmctl("rm", "new", "--force", socket_path=d.socket)
        assert run.returncode == 0, run.stderr
        assert models(d.socket) == {}


def test_sllmctl_import_shows_phases_tensors_long_phases_and_evictions():
    from sllmctl.daemon_verbs import import_note

    shown: dict = {}
    events = [("phase", {"phase": "reading the GGUF tensors", "done": 0, "total": 0, "unit": "", "phase_elapsed_s": t,
                         "elapsed_s": 3 + t}) for t in (0.0, 1.0, 9.0, 10.5, 11.0)]
    events += [("phase", {"phase": "dequantizing", "done": d, "total": 272, "unit": "tensors", "phase_elapsed_s": 0,
                          "elapsed_s": 20.0}) for d in (0, 10, 68, 70, 272)]
    events += [("phase", {"phase": "writing", "done": 5, "total": 10, "unit": "bytes", "elapsed_s": 30.0}),
               ("evicted", {"name": "old", "reason": "lru", "size_bytes": 6 << 20, "last_used": 0.0})]
    lines = [line for e, d in events if (line := import_note(e, d, shown))]
    assert lines == ["reading the GGUF tensors (3.0s)", "reading the GGUF tensors (13.5s)",
                     "dequantizing 0/272 tensors (20.0s)", "dequantizing 68/272 tensors (20.0s)",
                     "dequantizing 272/272 tensors (20.0s)",
                     "evicted old from the store to make room (lru, 6.0 MiB, last used never)"]
