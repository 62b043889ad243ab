"""The models of the shown node: fastest tier, state and bytes per tier (per-model occupancy)."""
from __future__ import annotations

from ..rows import MODEL_COLUMNS
from .rows_table import RowsTable


class ModelsTable(RowsTable):
    COLUMNS = MODEL_COLUMNS
