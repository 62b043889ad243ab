"""Running and queued requests with their tokens per second."""
from __future__ import annotations

from ..rows import REQUEST_COLUMNS
from .rows_table import RowsTable


class RequestsTable(RowsTable):
    COLUMNS = REQUEST_COLUMNS
