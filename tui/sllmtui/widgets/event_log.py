"""The daemon's events as they come: loads, evictions, requests, migrations, nodes."""
from __future__ import annotations

from textual.widgets import RichLog

from ..rows import event_line

QUIET = {"load_progress", "import_progress"}   # many per load; the throughput panel shows them


class EventLog(RichLog):
    def __init__(self, **kwargs):
        super().__init__(max_lines=500, wrap=False, markup=False, **kwargs)

    def add(self, events: list[dict]) -> None:
        for ev in events:
            if ev.get("kind") not in QUIET:
                self.write(event_line(ev))
