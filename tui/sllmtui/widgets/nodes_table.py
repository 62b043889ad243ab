"""The cluster's nodes and their status (alive, suspect, failed, left); * marks this one."""
from __future__ import annotations

from ..rows import NODE_COLUMNS
from .rows_table import RowsTable


class NodesTable(RowsTable):
    COLUMNS = NODE_COLUMNS
