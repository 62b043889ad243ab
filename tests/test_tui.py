"""sllmtui (sllmctl top) against a real sllmd: Textual pilots (App.run_test) watch the daemon's
pushed updates, press the keys, see the daemon stop; screen snapshots from fixed updates
(tests/tui_updates.py, no daemon) at 80x24 and 160x48."""
from __future__ import annotations

import asyncio
import time

import pytest

pytest.importorskip("textual")

import tui_updates  # noqa: E402
from daemon_helpers import DaemonProcess, remove_tree, short_tempdir, sllmctl  # noqa: E402
from sllmd.client import Client  # noqa: E402
from sllmtui.app import SllmTop  # noqa: E402
from sllmtui.rows import render_text  # noqa: E402
from sllmtui.state import View  # noqa: E402
from sllmtui.widgets import ModelsTable, StatusLine, TierBars  # noqa: E402

INTERVAL = 0.2


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A llama of ~12 MiB with a tokenizer: big enough that its load moves measurable bytes."""
    from conftest import make_tiny_model
    from sllmd import store
    from test_inference import tiny_tokenizer
    path = tmp_path_factory.mktemp("tui") / "ckpt"
    tok = tiny_tokenizer()
    store.save_model(make_tiny_model("llama", vocab_size=len(tok), hidden_size=256, intermediate_size=1024,
                                     num_hidden_layers=4), path, tokenizer=tok)
    return path


@pytest.fixture(scope="module")
def daemon(checkpoint):
    root = short_tempdir()
    proc = DaemonProcess(root).start()
    try:
        with Client(proc.socket, timeout=120) as c:
            c.import_model("tiny", checkpoint)
        yield proc
    finally:
        proc.close()
        remove_tree(root)


async def until(pilot, what: str, check, timeout: float = 20.0):
    """Lets the app run until check() is true (the daemon pushes every INTERVAL)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        await pilot.pause(0.05)
    raise AssertionError(f"timed out waiting for: {what}")


def device_bar(app: SllmTop) -> int:
    """Bytes the device tier's bar shows as used."""
    rows = {label: used for label, used, _ in app.query_one(TierBars).rows}
    return rows.get("device", -1)


def tiers_of(app: SllmTop, name: str) -> list[str]:
    model = next((m for m in app.view.node_view().models if m.get("name") == name), None)
    return list(model.get("tiers") or []) if model else []


def run(coro):
    asyncio.run(coro)


# --- against a real daemon ---------------------------------------------------------------------------
def test_bars_move_on_load_and_evict_and_the_load_shows_throughput(daemon):
    async def go():
        app = SllmTop(socket=daemon.socket, interval_s=INTERVAL)
        async with app.run_test(size=(100, 30)) as pilot:
            await until(pilot, "the model listed", lambda: "tiny" in app.query_one(ModelsTable)._keys)
            assert device_bar(app) == 0
            before = app.view.updates
            with Client(daemon.socket, timeout=120) as c:
                await asyncio.to_thread(c.load, "tiny")
                loaded = await until(pilot, "the device bar grows", lambda: device_bar(app) > 0 and device_bar(app))
                # the load's bytes appear as a point of the host->device graph (differences of the counters)
                await until(pilot, "a throughput point", lambda: max(app.view.h2d) > 0)
                assert app.view.updates > before
                kinds = lambda: {e.get("kind") for e in app.view.events}  # noqa: E731
                await until(pilot, "the load's events", lambda: {"load_started", "load_finished"} <= kinds())
                assert "device" in tiers_of(app, "tiny")
                await asyncio.to_thread(c.evict, "tiny", "device")
                await until(pilot, "the device bar shrinks", lambda: device_bar(app) < loaded)
                assert "device" not in tiers_of(app, "tiny")
                await until(pilot, "the eviction's event", lambda: "evicted" in kinds())
            text = str(app.query_one("#h2d").query_one("Label").render())
            assert text.startswith("host->device")
    run(go())


def test_keys_load_pin_and_evict_the_selected_model(daemon):
    async def go():
        app = SllmTop(socket=daemon.socket, interval_s=INTERVAL)
        async with app.run_test(size=(80, 24)) as pilot:
            await until(pilot, "the model listed", lambda: app.query_one(ModelsTable).selected_key == "tiny")
            await pilot.press("l")          # asks first
            assert type(app.screen).__name__ == "ConfirmScreen"
            await pilot.press("y")
            await until(pilot, "loaded by the key", lambda: "device" in tiers_of(app, "tiny"))
            await pilot.press("p")
            with Client(daemon.socket) as c:
                await until(pilot, "pinned by the key", lambda: c.show("tiny").get("pinned"))
                await until(pilot, "the pin shown", lambda: app.query_one(ModelsTable)._cells[0][-1] == "yes")
                await pilot.press("p")
                await until(pilot, "unpinned by the key", lambda: not c.show("tiny").get("pinned"))
                await pilot.press("e", "n")     # said no: nothing happens
                await pilot.pause(3 * INTERVAL)
                assert "device" in (c.show("tiny").get("tiers") or [])
                await pilot.press("e")
                await pilot.press("y")
                await until(pilot, "evicted by the key", lambda: "device" not in (c.show("tiny").get("tiers") or []))
                await until(pilot, "shown evicted", lambda: "device" not in tiers_of(app, "tiny"))
    run(go())


def test_once_prints_a_plain_snapshot(daemon):
    for cmd in (["-m", "sllmtui", "--once", "--interval", "0.2"], ["-m", "sllmctl", "top", "--once"]):
        import subprocess
        import sys
        out = subprocess.run([sys.executable, *cmd, "--socket", daemon.socket], capture_output=True, text=True,
                             timeout=120)
        assert out.returncode == 0, out.stderr
        assert "models:" in out.stdout and "tiny" in out.stdout and "host->device" in out.stdout, out.stdout
        assert "\x1b[" not in out.stdout   # plain text
        nodes = out.stdout.split("nodes:")[1]
        assert " * " in nodes and "alive" in nodes   # no cluster: the node itself
    bad = sllmctl("top", "--once", "--interval", "0", socket_path=daemon.socket)
    assert bad.returncode == 2 and "--interval" in bad.stderr
    gone = sllmctl("top", "--once", socket_path="/tmp/sllm-no-such-daemon.sock")
    assert gone.returncode == 69 and "daemon unreachable" in gone.stderr and "Traceback" not in gone.stderr


def test_daemon_unreachable_then_back(checkpoint):
    root = short_tempdir()
    proc = DaemonProcess(root).start()

    async def go():
        app = SllmTop(socket=proc.socket, interval_s=INTERVAL)
        async with app.run_test(size=(80, 24)) as pilot:
            line = app.query_one(StatusLine)
            await until(pilot, "connected", lambda: app.view.updates > 0)
            await asyncio.to_thread(proc.stop)
            await until(pilot, "unreachable shown", lambda: "daemon unreachable, retrying" in str(line.render()))
            assert line.has_class("-unreachable")
            await asyncio.to_thread(proc.start)
            seen = app.view.updates
            await until(pilot, "reconnected", lambda: app.view.updates > seen, timeout=30)
            await until(pilot, "the line cleared", lambda: "unreachable" not in str(line.render()))
    try:
        run(go())
    finally:
        proc.close()
        remove_tree(root)


def test_no_daemon_at_start_says_so():
    async def go():
        app = SllmTop(socket="/tmp/sllm-no-such-daemon.sock", interval_s=INTERVAL)
        async with app.run_test(size=(80, 24)) as pilot:
            line = app.query_one(StatusLine)
            await until(pilot, "unreachable shown", lambda: "daemon unreachable, retrying" in str(line.render()))
            await until(pilot, "still retrying", lambda: "attempt 2" in str(line.render()), timeout=10)
    run(go())


# --- fixed updates: no daemon ------------------------------------------------------------------------
def fixed_app() -> SllmTop:
    return SllmTop(watch=False, clock=lambda: tui_updates.T0 + 12)


async def feed_fixed(pilot) -> None:
    for u in tui_updates.updates():
        pilot.app.feed(u, tui_updates.HOST)
    await pilot.pause()


@pytest.fixture
def utc(monkeypatch):
    """Event times print in local time: the snapshots are taken in UTC."""
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


@pytest.mark.parametrize("size", [(80, 24), (160, 48)], ids=["80x24", "160x48"])
def test_main_screen_snapshot(snap_compare, utc, size):
    assert snap_compare(fixed_app(), terminal_size=size, run_before=feed_fixed)


def test_gpu_panel_snapshot(snap_compare, utc):
    """A GPU host (NVML's figures given): the GPU panel beside the throughput, still at 80x24."""
    async def feed(pilot):
        for u in tui_updates.updates():
            pilot.app.feed(u, tui_updates.GPU_HOST)
        await pilot.pause()
    assert snap_compare(fixed_app(), terminal_size=(80, 24), run_before=feed)


def test_view_rates_from_counter_differences():
    view = View(history=8)
    for u in tui_updates.updates(8):
        view.apply(u)
    # the last step moved (40 + 25 * (7 % 7)) MiB in 0.5 s
    assert view.h2d[-1] == pytest.approx(80 * tui_updates.MiB)
    assert view.token_rates["3f2a9c1e77aa"] == pytest.approx(24.0)
    assert 0 < view.loads["qwen-0.5b"].done < view.loads["qwen-0.5b"].total
    restarted = tui_updates.update(9, 0, 0, 0)   # a restarted daemon's counters start again at 0
    view.apply(restarted)
    assert view.h2d[-1] == 0 and min(view.h2d) >= 0


def test_node_switch_shows_another_node(utc):
    async def go():
        app = fixed_app()
        async with app.run_test(size=(80, 24)) as pilot:
            await feed_fixed(pilot)
            assert app.view.node_view().name == "a"
            await pilot.press("n")
            node = app.view.node_view()
            assert node.name == "b" and not node.local
            assert app.query_one(TierBars).border_title == "tiers · b"
            await pilot.press("e")             # acts on the local node only: refused, no modal
            assert type(app.screen).__name__ != "ConfirmScreen"
            await pilot.press("n", "n")        # c (failed, no state), then back to a
            assert app.view.node_view().name == "a"
    run(go())


def test_render_text_has_every_section():
    view = View()
    for u in tui_updates.updates():
        view.apply(u)
    text = render_text(view, tui_updates.HOST, now=tui_updates.T0 + 12)
    for part in ("device", "DRAM", "SSD", "host RAM", "host->device", "loading qwen-0.5b from ssd 61%",
                 "models:", "instances:", "requests:", "nodes:", "failed", "2/8"):
        assert part in text, part


# --- a loopback cluster ------------------------------------------------------------------------------
def test_cluster_panel_lists_three_nodes_and_marks_a_killed_one_failed():
    from cluster_helpers import close_all, make_nodes, start_all
    from sllmtui.widgets import NodesTable
    root = short_tempdir("sllm-tui-cl-")
    nodes = make_nodes(root, ["A", "B", "C"])

    def status_of(app, name):
        row = next((cells for key, cells in zip(app.query_one(NodesTable)._keys, app.query_one(NodesTable)._cells)
                    if key == name), None)
        return row[1] if row else None

    async def go():
        app = SllmTop(socket=nodes[0].socket, interval_s=0.5)
        async with app.run_test(size=(160, 48)) as pilot:
            await until(pilot, "three nodes alive",
                        lambda: all(status_of(app, n) == "alive" for n in ("A", "B", "C")), timeout=60)
            assert app.query_one(NodesTable)._cells[[*app.query_one(NodesTable)._keys].index("A")][0] == "A *"
            await asyncio.to_thread(nodes[2].kill9)
            await until(pilot, "C shown failed", lambda: status_of(app, "C") == "failed", timeout=45)
            assert status_of(app, "B") == "alive"
            await pilot.press("n")      # B's panels, from the cluster rows
            assert app.view.node_view().name == "B"
    try:
        start_all(nodes)
        run(go())
    finally:
        close_all(nodes)
        remove_tree(root)
