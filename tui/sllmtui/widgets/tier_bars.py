"""Occupancy bars: used / capacity per tier (device, DRAM, SSD) of the shown node, and this
host's memory."""
from __future__ import annotations

from rich.text import Text
from textual.widget import Widget

from ..rows import fmt_short

LABEL = 9   # 'host RAM' and a space


def bar_line(label: str, used: int, cap: int | None, width: int) -> Text:
    """'device   ████░░░░ 564M/4.0G  14%' fitted to `width` columns."""
    figures = f" {fmt_short(used)}/{fmt_short(cap) if cap else 'no limit'}"
    pct = f"{100 * used / cap:4.0f}%" if cap else "    -"
    if width - LABEL - len(figures) - len(pct) - 1 < 6:   # a narrow panel keeps the bar, drops the figures
        figures = ""
    bar_w = max(4, width - LABEL - len(figures) - len(pct) - 1)
    frac = min(1.0, used / cap) if cap else 0.0
    filled = round(frac * bar_w)
    style = "red" if frac > 0.9 else "yellow" if frac > 0.7 else "green"
    text = Text(label.ljust(LABEL)[:LABEL])
    text.append("█" * filled, style=style)
    text.append("░" * (bar_w - filled), style="grey37")
    text.append(figures + " " + pct)
    return text


class TierBars(Widget):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.rows: list[tuple[str, int, int | None]] = []

    def set_usage(self, rows: list[tuple[str, int, int | None]]) -> None:
        self.rows = rows
        self.refresh()

    def render(self) -> Text:
        if not self.rows:
            return Text("waiting for the daemon...", style="italic")
        width = self.content_region.width or 40
        return Text("\n").join(bar_line(label, used, cap, width) for label, used, cap in self.rows)
