"""Host->device and disk read throughput (from the loader's counters); on the bottom edge the
loads in flight, else this host's disk reads."""
from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Vertical

from ..rows import fmt_rate
from ..state import View
from .rate_graph import RateGraph


class ThroughputPanel(Vertical):
    def compose(self) -> ComposeResult:
        yield RateGraph("host->device", id="h2d")
        yield RateGraph("disk read", id="disk")

    def show(self, view: View, host: dict | None) -> None:
        rate = view.rate_now()
        self.query_one("#h2d", RateGraph).set_points(view.h2d, fmt_rate(rate["h2d"]))
        disk = [a + b for a, b in zip(view.disk_direct, view.disk_cached)]
        direct = f", {100 * rate['disk_direct'] / disk[-1]:.0f}% direct" if disk[-1] else ""
        self.query_one("#disk", RateGraph).set_points(disk, fmt_rate(disk[-1]) + direct)
        notes = []
        for load in view.loads.values():
            pct = f" {100 * load.done / load.total:.0f}%" if load.total else ""
            notes.append(f"loading {load.name}{' from ' + load.tier if load.tier else ''}{pct}")
        if not notes and host and host.get("disk_read_bytes_per_s") is not None:
            notes.append(f"host disks read {fmt_rate(host['disk_read_bytes_per_s'])}")
        self.border_subtitle = "; ".join(notes)   # on the panel's bottom edge
