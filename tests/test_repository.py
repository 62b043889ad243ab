"""Model repositories (DESIGN.md section 11) against a real nginx and a real sllmd: publish,
download on first request, verification, resume after kill -9, retries, capacity, sharing."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from daemon_helpers import DaemonProcess, remove_tree, short_tempdir, sllmctl
from nginx_helpers import NGINX, Nginx
from sllmd.client import Client
from sllmd.repository.index import INDEX, publish, read_local_index

pytestmark = pytest.mark.skipif(NGINX is None, reason="nginx is not installed (make setup installs nginx-light)")

PROMPT = "hello world"


@pytest.fixture(scope="module")
def big_checkpoint(tmp_path_factory):
    """A servable tiny llama of about 9 MiB: big enough to kill a download midway."""
    from conftest import make_tiny_model
    from sllmd import store
    from test_inference import tiny_tokenizer
    path = tmp_path_factory.mktemp("big") / "ckpt"
    tok = tiny_tokenizer()
    store.save_model(make_tiny_model("llama", vocab_size=len(tok), hidden_size=256, intermediate_size=688,
                                     num_hidden_layers=4), path, tokenizer=tok)
    return path


@pytest.fixture
def root():
    d = short_tempdir("sllm-repo-")
    (d / "d").mkdir()   # the daemon's
    yield d
    remove_tree(d)


def data_bytes(repo: Path, name: str) -> int:
    return sum(f.size for f in read_local_index(repo)[name].files if f.path.endswith(".bin"))


def store_is_clean(daemon: DaemonProcess, name: str) -> bool:
    return (not (daemon.store / "models" / name).exists() and not any((daemon.store / "staging").iterdir())
            and not (daemon.store / "downloads" / name).exists())


def test_published_model_is_downloaded_verified_and_answers(tiny_servable_checkpoint, root):
    run = sllmctl("publish", str(tiny_servable_checkpoint), str(root / "repo"), "--name", "tiny")
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("published tiny: ")
    index = json.loads((root / "repo" / INDEX).read_text())
    assert index["format"] == "sllm-repository" and index["models"]["tiny"]["files"][0]["path"] == "manifest.json"
    with Nginx(root / "nginx", root / "repo") as ng, \
            DaemonProcess(root / "d", "--repository", ng.url, "--download-connections", "4") as d:
        with Client(d.socket) as c:
            text = c.generate("tiny", PROMPT, max_tokens=4)
            assert isinstance(text, str)
            [m] = c.models()
            assert m["name"] == "tiny" and m["source"] == f"{ng.url}/tiny"
        assert ng.bytes_served(".bin") >= data_bytes(root / "repo", "tiny")
        assert (root / "repo" / "tiny" / "data-00000.bin").read_bytes() == \
            (d.store / "models" / "tiny" / "data-00000.bin").read_bytes()
        assert not (d.store / "downloads" / "tiny").exists()


def test_sllmctl_import_of_a_model_url_shows_progress(tiny_servable_checkpoint, root):
    publish(tiny_servable_checkpoint, root / "repo", "tiny")
    with Nginx(root / "nginx", root / "repo") as ng, DaemonProcess(root / "d") as d:
        run = sllmctl("import", "mine", f"{ng.url}/tiny", socket_path=d.socket)   # a model in a repository
        assert run.returncode == 0, run.stderr
        assert "importing mine: 100%" in run.stderr and "imported mine in" in run.stderr
        run = sllmctl("import", "tiny", ng.url, "--json", socket_path=d.socket)   # the repository: NAME in it
        assert run.returncode == 0, run.stderr
        info = json.loads(run.stdout)
        assert info["download"]["repository"] == ng.url and info["download"]["fetched_bytes"] > 0
        run = sllmctl("import", "other", ng.url, socket_path=d.socket)
        assert run.returncode == 1 and "lists no model 'other'" in run.stderr
        with Client(d.socket) as c:
            assert sorted(m["name"] for m in c.models()) == ["mine", "tiny"]
            assert c.generate("mine", PROMPT, max_tokens=2) is not None


def test_file_url_repository(tiny_servable_checkpoint, root):
    publish(tiny_servable_checkpoint, root / "repo", "tiny")
    with DaemonProcess(root / "d", "--repository", f"file://{root / 'repo'}") as d, Client(d.socket) as c:
        assert isinstance(c.generate("tiny", PROMPT, max_tokens=3), str)
        assert c.models()[0]["source"] == f"file://{root / 'repo'}/tiny"


def _downloaded_fraction(d: DaemonProcess, name: str, total: int) -> float:
    try:
        record = json.loads((d.store / "downloads" / name / "progress.json").read_text())
    except (OSError, ValueError):
        return 0.0
    return sum(hi - lo for runs in record["files"].values() for lo, hi in runs) * (1 << 20) / total


def test_a_killed_download_resumes_and_fetches_only_the_rest(big_checkpoint, root):
    publish(big_checkpoint, root / "repo", "big")
    total = data_bytes(root / "repo", "big")
    flags = ["--repository", "URL", "--download-connections", "2"]
    with Nginx(root / "nginx", root / "repo", location="limit_rate 1m;") as ng:
        flags[1] = ng.url
        d = DaemonProcess(root / "d", *flags).start()
        loader = subprocess.Popen([sys.executable, "-m", "sllmctl", "--socket", d.socket, "load", "big"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while _downloaded_fraction(d, "big", total) < 0.35 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _downloaded_fraction(d, "big", total) >= 0.35
        d.proc.send_signal(signal.SIGKILL)
        d.proc.wait(10)
        d.close()
        loader.wait(30)
        kept = _downloaded_fraction(d, "big", total)
        assert 0.35 <= kept < 1.0
        time.sleep(2)   # nginx logs a request when it notices the client went away
        before = ng.bytes_served(".bin")
        assert 0 < before < total
        with DaemonProcess(root / "d", *flags) as d2, Client(d2.socket) as c:
            assert isinstance(c.generate("big", PROMPT, max_tokens=2), str)
        after = ng.bytes_served(".bin") - before
        assert after <= total * (1 - kept) + (4 << 20), (after, total, kept)   # only the rest (+ pieces cut short)
        assert after < total * 0.7
        assert (root / "repo" / "big" / "data-00000.bin").read_bytes() == \
            (root / "d" / "store" / "models" / "big" / "data-00000.bin").read_bytes()


def test_a_corrupted_file_is_refused_naming_file_and_offset(big_checkpoint, root):
    publish(big_checkpoint, root / "repo", "big")
    data = root / "repo" / "big" / "data-00000.bin"
    with open(data, "r+b") as f:   # one byte of the third 1 MiB block
        f.seek((2 << 20) + 12345)
        byte = f.read(1)
        f.seek((2 << 20) + 12345)
        f.write(bytes([byte[0] ^ 0xFF]))
    with Nginx(root / "nginx", root / "repo") as ng, DaemonProcess(root / "d") as d:
        run = sllmctl("import", "big", f"{ng.url}/big", socket_path=d.socket)
        assert run.returncode == 1, run.stderr
        assert "data-00000.bin" in run.stderr and f"offset {2 << 20}" in run.stderr and "checksum" in run.stderr
        assert store_is_clean(d, "big")
        with Client(d.socket) as c:
            assert c.models() == []


def test_a_server_answering_500_is_retried_then_fails_clearly(tiny_servable_checkpoint, root):
    publish(tiny_servable_checkpoint, root / "repo", "tiny")
    with Nginx(root / "nginx", root / "repo", server_extra=r"location ~ \.bin$ { return 500; }") as ng, \
            DaemonProcess(root / "d", "--repository", ng.url, "--download-retries", "3") as d:
        with Client(d.socket) as c:
            with pytest.raises(Exception) as err:
                c.generate("tiny", PROMPT, max_tokens=2)
            assert getattr(err.value, "code", None) == "repository"
            assert "HTTP 500" in str(err.value) and "gave up after 3 attempts" in str(err.value)
            assert c.models() == []
        bin_requests = [u for u, status, _, _ in ng.served() if u.endswith(".bin")]
        assert len(bin_requests) == 3   # one piece: three attempts
        assert not (d.store / "models" / "tiny").exists()


def test_a_stalling_server_is_retried_then_fails_clearly(tiny_servable_checkpoint, root):
    publish(tiny_servable_checkpoint, root / "repo", "tiny")
    stall = r"location ~ \.bin$ { limit_rate 1; }"   # a byte a second: silence past the read timeout
    with Nginx(root / "nginx", root / "repo", server_extra=stall) as ng, \
            DaemonProcess(root / "d", "--download-timeout", "0.3s", "--download-retries", "2") as d:
        t0 = time.monotonic()
        run = sllmctl("import", "tiny", f"{ng.url}/tiny", socket_path=d.socket)
        assert run.returncode == 75, run.stderr
        assert "sent nothing for 0.3 s" in run.stderr and "gave up after 2 attempts" in run.stderr
        assert time.monotonic() - t0 < 30
        with Client(d.socket) as c:
            assert c.models() == []


def test_a_full_ssd_tier_refuses_before_downloading(big_checkpoint, root):
    publish(big_checkpoint, root / "repo", "big")
    with Nginx(root / "nginx", root / "repo") as ng, \
            DaemonProcess(root / "d", "--repository", ng.url, "--ssd-capacity", "4MiB") as d:
        with Client(d.socket) as c:
            with pytest.raises(Exception) as err:
                c.generate("big", PROMPT, max_tokens=2)
            assert getattr(err.value, "code", None) == "store_full", err.value
        assert [u for u, *_ in ng.served()] == ["/index.json"]   # not one byte of the model
        assert store_is_clean(d, "big")


def test_two_concurrent_requests_share_one_download(big_checkpoint, root):
    publish(big_checkpoint, root / "repo", "big")
    total = data_bytes(root / "repo", "big")
    with Nginx(root / "nginx", root / "repo", location="limit_rate 4m;") as ng, \
            DaemonProcess(root / "d", "--repository", ng.url) as d:
        results, errors = [], []

        def ask():
            try:
                with Client(d.socket) as c:
                    results.append(c.generate("big", PROMPT, max_tokens=2))
            except Exception as e:   # noqa: BLE001 - reported below
                errors.append(e)

        threads = [threading.Thread(target=ask) for _ in range(2)]
        for t in threads:
            t.start()
            time.sleep(0.3)   # the second arrives while the first downloads
        for t in threads:
            t.join(120)
        assert not errors and len(results) == 2
        ranges = [(u, r) for u, _, _, r in ng.served() if u.endswith(".bin")]
        assert len(ranges) == len(set(ranges))   # no piece asked for twice
        assert ng.bytes_served(".bin") - total < 64 << 10   # the data once (+ response headers)
        assert sum(1 for u, *_ in ng.served() if u.endswith("manifest.json")) == 1


def test_rm_cancels_a_download_at_once_and_leaves_nothing(big_checkpoint, root):
    publish(big_checkpoint, root / "repo", "big")
    total = data_bytes(root / "repo", "big")
    with Nginx(root / "nginx", root / "repo", location="limit_rate 512k;") as ng, \
            DaemonProcess(root / "d", "--download-connections", "2") as d:
        importer = subprocess.Popen([sys.executable, "-m", "sllmctl", "--socket", d.socket, "import", "big",
                                     f"{ng.url}/big"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while _downloaded_fraction(d, "big", total) < 0.1 and time.monotonic() < deadline:
            time.sleep(0.05)
        with Client(d.socket) as c:
            assert [m["name"] for m in c.models()] == ["big"] and c.models()[0]["state"] == "importing"
        t0 = time.monotonic()
        run = sllmctl("rm", "big", socket_path=d.socket)
        assert run.returncode == 0 and "cancelled the import of big" in run.stdout, run.stderr
        assert time.monotonic() - t0 < 5
        _, err = importer.communicate(timeout=30)
        assert importer.returncode != 0 and "cancelled" in err
        assert store_is_clean(d, "big")
        with Client(d.socket) as c:
            assert c.models() == [] and c.status()["tiers"]["ssd"]["reserved_bytes"] == 0


@pytest.fixture
def small_disk(root):
    """A 6 MiB tmpfs for the daemon's store (root only: skipped elsewhere)."""
    mnt = root / "small"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mnt)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_a_full_disk_stops_the_download_at_once_and_leaves_nothing(big_checkpoint, root, small_disk):
    publish(big_checkpoint, root / "repo", "big")   # 9 MiB onto a 6 MiB disk, with no --ssd-capacity
    with Nginx(root / "nginx", root / "repo") as ng, \
            DaemonProcess(root / "d", "--store", str(small_disk / "store")) as d:
        run = sllmctl("import", "big", f"{ng.url}/big", socket_path=d.socket)
        assert run.returncode == 1, run.stderr
        assert "is full" in run.stderr and "No space left on device" in run.stderr
        assert not (small_disk / "store" / "downloads" / "big").exists()
        assert not (small_disk / "store" / "models" / "big").exists()
        with Client(d.socket) as c:
            assert c.models() == [] and c.status()["tiers"]["ssd"]["reserved_bytes"] == 0
        assert sum(f.stat().st_size for f in (small_disk / "store").rglob("*") if f.is_file()) < 1 << 20


def test_a_resumed_download_rechecks_what_its_record_claims(big_checkpoint, root):
    """In process, over file://: a stopped download keeps its record; a block the record lists
    but the disk lost (a power cut) is fetched again, the rest is not."""
    from sllmd.errors import CancelledError
    from sllmd.repository.download import Download
    from sllmd.repository.remote import FileRemote
    publish(big_checkpoint, root / "repo", "big")
    entry = read_local_index(root / "repo")["big"]
    remote = FileRemote(f"file://{root / 'repo'}").child("big")
    first = Download(remote, entry, root / "work", connections=1, piece_bytes=1 << 20)
    first.cancelled = lambda: first.landed > (4 << 20)
    with pytest.raises(CancelledError):
        first.run()
    record = json.loads((root / "work" / "progress.json").read_text())
    done = [i for lo, hi in record["files"]["data-00000.bin"] for i in range(lo, hi)]
    assert len(done) >= 3
    with open(root / "work" / "checkpoint" / "data-00000.bin", "r+b") as f:   # lose one block's bytes
        f.seek(done[1] << 20)
        f.write(bytes(1 << 20))
    again = Download(remote, entry, root / "work", connections=2)
    ckpt = again.run()
    assert again.resumed_bytes == (len(done) - 1) << 20
    assert again.fetched == entry.size_bytes - again.resumed_bytes - entry.file("manifest.json").size
    assert (ckpt / "data-00000.bin").read_bytes() == (root / "repo" / "big" / "data-00000.bin").read_bytes()


def test_concurrent_publishers_keep_every_entry(tiny_servable_checkpoint, root):
    errors = []

    def one(name):
        try:
            publish(tiny_servable_checkpoint, root / "repo", name)
        except Exception as e:   # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=one, args=(f"m{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(read_local_index(root / "repo")) == ["m0", "m1", "m2", "m3"]
    assert not [p for p in (root / "repo").iterdir() if p.name.startswith(".publish-")]
    run = sllmctl("publish", str(tiny_servable_checkpoint), str(root / "repo"), "--name", "m0")
    assert run.returncode == 1 and "already has a model named 'm0'" in run.stderr


def test_a_bad_repository_url_is_a_one_line_config_error():
    run = subprocess.run([sys.executable, "-m", "sllmd", "--config", "/dev/null", "--repository", "ftp://host/x"],
                         capture_output=True, text=True, timeout=60, env={k: v for k, v in os.environ.items()
                                                                          if not k.startswith("SLLMD_")})
    assert run.returncode == 78
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "not a repository URL: 'ftp://host/x'" in lines[0]


def test_a_download_a_request_triggered_shows_its_progress_on_the_watch_stream(big_checkpoint, root):
    publish(big_checkpoint, root / "repo", "big")
    with Nginx(root / "nginx", root / "repo", location="limit_rate 4m;") as ng, \
            DaemonProcess(root / "d", "--repository", ng.url) as d:
        with Client(d.socket) as w, w.watch(interval_s=0.1) as updates:
            with Client(d.socket) as c:
                assert isinstance(c.generate("big", PROMPT, max_tokens=2), str)   # downloads first
            seen: list[dict] = []
            for u in updates:
                seen += [e for e in u["events"] if e["kind"] == "import_progress" and e["model"] == "big"]
                if any(e["kind"] == "request_finished" for e in u["events"]):
                    break
    assert seen, "no import_progress event while the request's download ran"
    done = [e["done"] for e in seen]
    assert done == sorted(done) and seen[-1]["done"] == seen[-1]["total"] > 0
