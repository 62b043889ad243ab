"""The README's screenshot of `sllmctl top`: a real sllmd on a temporary store, SmolLM2 loading
cold from the SSD tier while a tiny model answers a request; the TUI's screen saved as SVG
in the middle of the load (and as PNG where cairosvg is installed: pip install cairosvg).

    .venv/bin/python scripts/tui_screenshot.py [--out docs/sllmctl-top] [--size 120x36]

Needs the SmolLM2 checkpoint the tests cache (.cache/, made by `make test` or `make demo`).
"""
from __future__ import annotations

import argparse
import asyncio
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from conftest import CACHE, make_tiny_model, smollm2_checkpoint_name  # noqa: E402
from daemon_helpers import DaemonProcess, remove_tree, short_tempdir  # noqa: E402
from test_inference import tiny_tokenizer  # noqa: E402

from sllmd import store  # noqa: E402
from sllmd.client import Client  # noqa: E402
from sllmtui.app import SllmTop  # noqa: E402
from sllmtui.host import HostProbe  # noqa: E402


async def capture(socket: str, size: tuple[int, int], out: Path) -> bool:
    probe = HostProbe()
    app = SllmTop(socket=socket, interval_s=0.1, probe=probe)
    shot = None
    async with app.run_test(size=size) as pilot:
        while app.view.updates < 5:
            await pilot.pause(0.1)
        loading = threading.Event()

        def talk() -> None:   # requests on the tiny model until the load is over (each may stop early)
            with Client(socket, timeout=120) as t:
                while not loading.is_set():
                    t.generate("tiny", "Tell me a long story about tiers of memory.", max_tokens=400,
                               temperature=1.0)
        with Client(socket, timeout=120) as c:
            talker = threading.Thread(target=talk, daemon=True)
            talker.start()
            await pilot.pause(1.0)
            load = threading.Thread(target=c.load, args=("smol",), daemon=True)
            load.start()
            deadline = time.monotonic() + 120
            while load.is_alive() and time.monotonic() < deadline:
                await pilot.pause(0.1)
                going = [ld for ld in app.view.loads.values() if ld.total and ld.done < 0.9 * ld.total]
                if going and max(app.view.h2d) > 0:   # mid-load, with bytes moved so far
                    shot = app.export_screenshot(title="sllmctl top")
            load.join()
            loading.set()
            talker.join(60)
        if shot is None:   # a load faster than two updates: the screen just after it
            await pilot.pause(0.3)
            shot = app.export_screenshot(title="sllmctl top")
    probe.close()
    out.with_suffix(".svg").write_text(shot)
    try:
        import cairosvg
    except ImportError:
        print("cairosvg is not installed: SVG only", file=sys.stderr)
        return False
    cairosvg.svg2png(bytestring=shot.encode(), write_to=str(out.with_suffix(".png")))
    return True


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(REPO / "docs" / "sllmctl-top"), help="path without suffix")
    ap.add_argument("--size", default="120x36", help="terminal size COLSxROWS")
    args = ap.parse_args()
    cols, rows = (int(x) for x in args.size.split("x"))
    smol = CACHE / smollm2_checkpoint_name()
    if not smol.exists():
        print(f"no SmolLM2 checkpoint at {smol}: run `make test` or `make demo` first", file=sys.stderr)
        return 1
    root = short_tempdir("sllm-shot-")
    try:
        tok = tiny_tokenizer()
        store.save_model(make_tiny_model("llama", vocab_size=len(tok)), root / "tiny", tokenizer=tok)
        with DaemonProcess(root, "--node-name", "demo", dram="1GiB", device_memory="2GiB") as d:
            with Client(d.socket, timeout=300) as c:
                c.import_model("smol", smol)
                c.import_model("tiny", root / "tiny")
                c.load("tiny")
            out = Path(args.out)
            out.parent.mkdir(parents=True, exist_ok=True)
            png = asyncio.run(capture(d.socket, (cols, rows), out))
            print(f"wrote {out.with_suffix('.svg')}" + (f" and {out.with_suffix('.png')}" if png else ""))
    finally:
        remove_tree(root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
