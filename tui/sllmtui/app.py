"""sllm top: the Textual app. Panels fed by pushed `watch` updates (source.py), keys that act
on the selected model through the ordinary client.

Keys: e evict (device, else DRAM; confirmed), p pin/unpin, l load (confirmed), n next node,
q quit. Tab moves between the tables.
"""
from __future__ import annotations

import time

from textual import work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.css.query import NoMatches
from textual.widgets import Footer

from sllmd.client import DEFAULT_TIMEOUT, Client
from sllmd.errors import SllmError

from . import rows
from .source import DaemonUnreachable, WatchSource, WatchUpdate
from .state import View
from .widgets import (ConfirmScreen, EventLog, GpuPanel, InstancesTable, ModelsTable, NodesTable, RequestsTable,
                      StatusLine, ThroughputPanel, TierBars)


NARROW = 120   # columns below which the event log is hidden (80x24 keeps every table)


class SllmTop(App):
    CSS_PATH = "sllmtui.tcss"
    TITLE = "sllm top"
    BINDINGS = [
        Binding("e", "evict", "evict"),
        Binding("p", "pin", "pin/unpin"),
        Binding("l", "load", "load"),
        Binding("n", "next_node", "node"),
        Binding("q", "quit", "quit"),
    ]

    def __init__(self, socket: str | None = None, timeout: float = DEFAULT_TIMEOUT, interval_s: float = 0.5,
                 watch: bool = True, probe=None, clock=time.time):
        """watch False: no daemon connection; updates come from `feed` (tests, snapshots).
        probe: a host.HostProbe (None: no host figures); clock: what "now" is for ages and expiries."""
        super().__init__()
        self.socket, self.timeout, self.interval_s = socket, timeout, interval_s
        self.view = View()
        self.host: dict | None = None
        self.clock = clock
        self.unreachable: str | None = None
        self._source = WatchSource(self.post_message, socket, timeout, interval_s, probe=probe) if watch else None

    def compose(self) -> ComposeResult:
        yield StatusLine("connecting to sllmd...", id="status")
        with Horizontal(id="top"):
            yield TierBars(id="tiers")
            yield ThroughputPanel(id="throughput")
            yield GpuPanel(id="gpu")
        yield ModelsTable(id="models")
        with Horizontal(id="work"):
            yield InstancesTable(id="instances")
            yield RequestsTable(id="requests")
        with Horizontal(id="cluster"):
            yield NodesTable(id="nodes")
            yield EventLog(id="events")
        yield Footer()

    def on_mount(self) -> None:
        titles = {"#tiers": "tiers", "#throughput": "throughput", "#gpu": "GPU", "#models": "models",
                  "#instances": "instances", "#requests": "requests", "#nodes": "nodes", "#events": "events"}
        for sel, title in titles.items():
            self.query_one(sel).border_title = title
        self.query_one("#gpu").display = False
        self.query_one(ModelsTable).focus()
        if self._source is not None:
            self._watch()

    def on_resize(self, event) -> None:
        self.set_class(event.size.width < NARROW, "-narrow")

    @work(thread=True, exclusive=True, group="watch")
    def _watch(self) -> None:
        self._source.run()

    def on_unmount(self) -> None:
        if self._source is not None:   # the reading thread ends at its next update (or retry)
            self._source.stop()

    # --- updates -----------------------------------------------------------------------------------
    def feed(self, update: dict, host: dict | None = None) -> None:
        """Applies one update as if it had come from the daemon (on the app's thread)."""
        self.on_watch_update(WatchUpdate(update, host))

    def on_watch_update(self, message: WatchUpdate) -> None:
        self.unreachable = None
        self.remove_class("-stale")
        self.view.apply(message.update)
        if message.host is not None:
            self.host = message.host
        try:
            self.query_one(EventLog).add(message.update.get("events") or [])
            self.refresh_panels()
        except NoMatches:   # an update that arrived while the app shuts down
            pass

    def on_daemon_unreachable(self, message: DaemonUnreachable) -> None:
        self.unreachable = message.reason
        self.add_class("-stale")
        self.query_one(StatusLine).show_unreachable(message.reason, message.attempt)

    def refresh_panels(self) -> None:
        view, now = self.view, self.clock()
        node = view.node_view()
        if self.unreachable is None:
            self.query_one(StatusLine).show_daemon(rows.header_line(view))
        usage = rows.tier_usage(node, self.host)
        if self.host:
            usage.append(("host RAM", self.host["memory_used_bytes"], self.host["memory_total_bytes"]))
        tiers = self.query_one(TierBars)
        tiers.border_title = f"tiers · {node.name}"
        tiers.set_usage(usage)
        self.query_one(ThroughputPanel).show(view, self.host)
        gpu = self.query_one(GpuPanel)
        gpu.display = gpu.show((self.host or {}).get("gpus"), node.device) if node.local else False
        self.query_one(ModelsTable).set_rows(rows.model_rows(node))
        self.query_one(InstancesTable).set_rows(rows.instance_rows(node, now))
        self.query_one(RequestsTable).set_rows(rows.request_rows(node, view))
        nodes = self.query_one(NodesTable)
        nodes.border_title = "nodes" if view.nodes else "nodes (not in a cluster)"
        nodes.set_rows(rows.node_rows(view, now))

    # --- keys --------------------------------------------------------------------------------------
    def _selected_model(self) -> dict | None:
        node = self.view.node_view()
        if not node.local:
            self.notify(f"{node.name} is another node: evict, pin and load act on the local node "
                        "(run sllmctl top there)", severity="warning")
            return None
        key = self.query_one(ModelsTable).selected_key
        model = next((m for m in node.models if m.get("name") == key), None)
        if model is None:
            self.notify("no model selected", severity="warning")
        return model

    def action_evict(self) -> None:
        model = self._selected_model()
        if model is None:
            return
        tiers = model.get("tiers") or []
        tier = "device" if "device" in tiers else "dram" if "dram" in tiers else None
        if tier is None:
            self.notify(f"{model['name']} is only on the SSD; `sllmctl rm` removes it", severity="warning")
            return
        self.push_screen(ConfirmScreen(f"Evict {model['name']} from {tier}?"),
                         lambda yes: yes and self._act("evict", model["name"], tier))

    def action_load(self) -> None:
        model = self._selected_model()
        if model is not None:
            self.push_screen(ConfirmScreen(f"Load {model['name']} onto the device?"),
                             lambda yes: yes and self._act("load", model["name"]))

    def action_pin(self) -> None:
        model = self._selected_model()
        if model is not None:
            self._act("unpin" if model.get("pinned") else "pin", model["name"])

    def action_next_node(self) -> None:
        name = self.view.next_node()
        self.notify(f"showing node {name or 'local'}", timeout=2)
        self.refresh_panels()

    @work(thread=True, group="actions")
    def _act(self, verb: str, name: str, tier: str | None = None) -> None:
        """Runs one client call on its own connection (a Client is one thread's)."""
        try:
            with Client(self.socket, timeout=self.timeout, client_name=f"sllmtui {verb}") as c:
                if verb == "evict":
                    c.evict(name, tier=tier)
                    text = f"evicted {name} from {tier}"
                elif verb == "load":
                    info = c.load(name)
                    src = f" from {info['load_tier']} in {info['load_s']:.2f}s" if info.get("load_tier") else ""
                    text = f"loaded {name}{src}"
                else:
                    getattr(c, verb)(name)
                    text = f"{verb}ned {name}"
            self.call_from_thread(self.notify, text, timeout=3)
        except SllmError as e:
            self.call_from_thread(self.notify, f"{verb} {name}: {e}", severity="error", timeout=6)
