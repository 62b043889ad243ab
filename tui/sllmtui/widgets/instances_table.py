"""The instances on the device: running and queued requests, batch size, KV cache, keep-alive."""
from __future__ import annotations

from ..rows import INSTANCE_COLUMNS
from .rows_table import RowsTable


class InstancesTable(RowsTable):
    COLUMNS = INSTANCE_COLUMNS
