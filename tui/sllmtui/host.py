"""This host's own figures, beside the daemon's: memory and disk I/O (psutil), and on a host
with NVIDIA drivers each GPU's memory and PCIe TX/RX (NVML via nvidia-ml-py).

NVML is optional: without the package, the driver or a GPU, `gpus` is None and the TUI
has no GPU panel. A sample is a plain dict, so a test can hand the app a fixed one.
"""
from __future__ import annotations

import logging
import shutil
import time

log = logging.getLogger(__name__)


class Nvml:
    """The GPUs NVML sees; `available` False when there is none (any NVML failure counts as none)."""

    def __init__(self):
        self.handles: list = []
        self._nvml = None
        try:
            import pynvml
            pynvml.nvmlInit()
            self._nvml = pynvml
            self.handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        except Exception as e:   # no package, no driver (NVMLError_LibraryNotFound), no device
            log.debug("no NVML: %s", e)
            self.handles = []

    @property
    def available(self) -> bool:
        return bool(self.handles)

    def sample(self) -> list[dict] | None:
        if not self.handles:
            return None
        nv, out = self._nvml, []
        for i, h in enumerate(self.handles):
            try:
                mem = nv.nvmlDeviceGetMemoryInfo(h)
                name = nv.nvmlDeviceGetName(h)
                # KB/s over NVML's own 20 ms sampling window
                tx = nv.nvmlDeviceGetPcieThroughput(h, nv.NVML_PCIE_UTIL_TX_BYTES) * 1024
                rx = nv.nvmlDeviceGetPcieThroughput(h, nv.NVML_PCIE_UTIL_RX_BYTES) * 1024
            except Exception as e:
                log.debug("NVML sample of GPU %d failed: %s", i, e)
                continue
            out.append({"index": i, "name": name.decode() if isinstance(name, bytes) else str(name),
                        "memory_used_bytes": int(mem.used), "memory_total_bytes": int(mem.total),
                        "pcie_tx_bytes_per_s": float(tx), "pcie_rx_bytes_per_s": float(rx)})
        return out or None

    def close(self) -> None:
        if self._nvml is not None and self.handles:
            try:
                self._nvml.nvmlShutdown()
            except Exception:
                pass
        self.handles = []


class HostProbe:
    """Samples memory, disk reads per second (system-wide, between two samples) and the GPUs."""

    def __init__(self, nvml: bool = True):
        import psutil
        self._psutil = psutil
        self._nvml = Nvml() if nvml else None
        self._last_disk: tuple[float, int] | None = None

    def sample(self, store_root: str | None = None) -> dict:
        ps = self._psutil
        vm = ps.virtual_memory()
        out: dict = {"memory_used_bytes": int(vm.total - vm.available), "memory_total_bytes": int(vm.total),
                     "disk_read_bytes_per_s": None, "store_disk": None, "gpus": None}
        try:
            io = ps.disk_io_counters()
        except Exception:   # no disks visible (some containers)
            io = None
        if io is not None:
            now = time.monotonic()
            if self._last_disk is not None and now > self._last_disk[0]:
                out["disk_read_bytes_per_s"] = max(0, io.read_bytes - self._last_disk[1]) / (now - self._last_disk[0])
            self._last_disk = (now, io.read_bytes)
        if store_root:
            try:
                du = shutil.disk_usage(store_root)   # the SSD tier's limit when it has no capacity of its own
                out["store_disk"] = {"free_bytes": du.free, "total_bytes": du.total}
            except OSError:
                pass
        if self._nvml is not None:
            out["gpus"] = self._nvml.sample()
        return out

    def close(self) -> None:
        if self._nvml is not None:
            self._nvml.close()
