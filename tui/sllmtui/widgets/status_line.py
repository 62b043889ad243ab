"""The top line: which daemon and node, or "daemon unreachable, retrying"."""
from __future__ import annotations

from textual.widgets import Static


class StatusLine(Static):
    def show_daemon(self, text: str) -> None:
        self.remove_class("-unreachable")
        self.update(text)

    def show_unreachable(self, reason: str, attempt: int) -> None:
        self.add_class("-unreachable")
        self.update(f"daemon unreachable, retrying (attempt {attempt}): {reason}")
