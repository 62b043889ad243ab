"""A DataTable refilled from rows on every update, keeping the selected row (by key)."""
from __future__ import annotations

from textual.widgets import DataTable


class RowsTable(DataTable):
    COLUMNS: tuple[str, ...] = ()

    def __init__(self, **kwargs):
        super().__init__(cursor_type="row", zebra_stripes=False, **kwargs)
        self._keys: list[str] = []
        self._cells: list[list[str]] = []   # as last shown (before the first update: nothing)

    def on_mount(self) -> None:
        self.add_columns(*self.COLUMNS)

    @property
    def selected_key(self) -> str | None:
        if not self._keys or self.cursor_row is None or not 0 <= self.cursor_row < len(self._keys):
            return None
        return self._keys[self.cursor_row]

    def set_rows(self, rows: list[tuple[str, list[str]]]) -> None:
        keep = self.selected_key
        keys = [k for k, _ in rows]
        cells = [c for _, c in rows]
        if keys == self._keys and cells == self._cells:
            return   # nothing changed: no flicker, no lost scroll
        self.clear()
        for key, row in rows:
            self.add_row(*row, key=key)
        self._keys, self._cells = keys, cells
        if keep in keys:
            self.move_cursor(row=keys.index(keep), scroll=False)
