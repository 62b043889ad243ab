"""The GPU the daemon uses, from NVML: PCIe RX/TX as moving graphs, memory on the bottom edge. Shown only on a
host where NVML sees a GPU."""
from __future__ import annotations

import collections

from textual.app import ComposeResult
from textual.containers import Vertical

from sllmctl.output import fmt_bytes

from ..rows import fmt_rate
from ..state import HISTORY
from .rate_graph import RateGraph


class GpuPanel(Vertical):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.rx = collections.deque([0.0] * HISTORY, maxlen=HISTORY)
        self.tx = collections.deque([0.0] * HISTORY, maxlen=HISTORY)

    def compose(self) -> ComposeResult:
        yield RateGraph("PCIe rx", id="pcie-rx")
        yield RateGraph("PCIe tx", id="pcie-tx")

    def show(self, gpus: list[dict] | None, device: str) -> bool:
        """Shows the daemon's GPU (cuda:N, else the first); False when there is none to show."""
        if not gpus:
            return False
        index = int(device.split(":")[1]) if device.startswith("cuda:") and device.split(":")[1].isdigit() else 0
        g = next((g for g in gpus if g["index"] == index), gpus[0])
        self.border_title = f"GPU {g['index']} {g['name']}"[:40]
        self.rx.append(g["pcie_rx_bytes_per_s"])
        self.tx.append(g["pcie_tx_bytes_per_s"])
        self.border_subtitle = f"memory {fmt_bytes(g['memory_used_bytes'])}/{fmt_bytes(g['memory_total_bytes'])}"
        self.query_one("#pcie-rx", RateGraph).set_points(self.rx, fmt_rate(self.rx[-1]))
        self.query_one("#pcie-tx", RateGraph).set_points(self.tx, fmt_rate(self.tx[-1]))
        return True
