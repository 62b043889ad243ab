"""A throughput as a moving graph: a label with the latest rate over a Sparkline of the last points."""
from __future__ import annotations

from textual.app import ComposeResult
from textual.widget import Widget
from textual.widgets import Label, Sparkline


class RateGraph(Widget):
    DEFAULT_CSS = "RateGraph { height: 2; } RateGraph Sparkline { height: 1; }"

    def __init__(self, title: str, **kwargs):
        super().__init__(**kwargs)
        self.title = title
        self.points: list[float] = []

    def compose(self) -> ComposeResult:
        yield Label(self.title, classes="rate-label")
        yield Sparkline([0.0], summary_function=max)

    def set_points(self, points, text: str) -> None:
        self.points = list(points)
        self.query_one(Label).update(f"{self.title} {text}")
        self.query_one(Sparkline).data = self.points or [0.0]
