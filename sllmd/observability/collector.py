"""NodeCollector: the node's Prometheus metrics, read when scraped.

Nothing samples in the background: each scrape reads NodeStats (counted where requests,
loads, evictions and migrations end), the tiers' used and capacity bytes, the native loader's
process-wide byte counters and the instances' running and queued requests, under the locks
those already take (each a short read). Names are prefixed `sllmd_`, in base units
(seconds, bytes), counters end in `_total`, and every metric has help text.

Where a figure has no source on this host it is still exported with its meaning said in the
help: `sllmd_host_to_device_bytes_total` is the loader's host->device copies on CUDA; on a
CPU-only host (the device tier is host memory) it is the checkpoint bytes each finished load
put into device-tier buffers. An SSD tier without --ssd-capacity reports as its capacity what
the store holds plus the free space of its filesystem.
"""
from __future__ import annotations

import logging
import shutil
from typing import Any, Iterable

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from .counters import sorted_items

log = logging.getLogger(__name__)

TIERS = ("device", "dram", "ssd")
MEMBER_STATUSES = ("alive", "suspect", "failed", "left")


def _counter(name: str, doc: str, labels: list[str], items) -> CounterMetricFamily:
    m = CounterMetricFamily(name, doc, labels=labels)
    for key, value in items:
        m.add_metric(list(key) if isinstance(key, tuple) else [key], value)
    return m


def _histogram(name: str, doc: str, labels: list[str], items) -> HistogramMetricFamily:
    m = HistogramMetricFamily(name, doc, labels=labels)
    for key, b in items:
        m.add_metric(list(key) if isinstance(key, tuple) else [key], b.cumulative(), sum_value=b.sum)
    return m


class NodeCollector(Collector):
    """Reads `node` (a sllmd.node.Node) and, with a cluster, its members' statuses."""

    def __init__(self, node: Any, cluster: Any = None):
        self.node, self.cluster = node, cluster

    def collect(self) -> Iterable:
        node = self.node
        stats = getattr(node, "stats", None)
        snap = stats.snapshot() if stats is not None else None
        if snap is not None:
            yield from self._counted(snap)
        try:
            yield from self._tiers()
            yield from self._loader(snap)
            yield from self._instances()
        except Exception as e:   # a node that stops mid-scrape: the rest of this scrape goes without it
            log.debug("metrics: reading the node failed: %s", e)
        yield self._cluster_nodes()

    # --- counted where things end (NodeStats) --------------------------------------------------
    def _counted(self, s: dict) -> Iterable:
        yield _counter("sllmd_requests", "Inference requests that ended on this node, by model and outcome (ok, "
                       "migrated, cancelled, or the error code); a forwarded request counts where it ran",
                       ["model", "outcome"], sorted_items(s["requests"]))
        yield _counter("sllmd_prompt_tokens", "Prompt tokens of requests that finished on this node",
                       ["model"], sorted_items(s["prompt_tokens"]))
        yield _counter("sllmd_generation_tokens", "Tokens generated and streamed by requests on this node",
                       ["model"], sorted_items(s["generation_tokens"]))
        yield _histogram("sllmd_time_to_first_token_seconds", "From a request's arrival at this node to its first "
                         "token, by the tier its model came from (device: already loaded; dram, ssd: loaded for it)",
                         ["model", "load_tier"], sorted_items(s["ttft"]))
        yield _histogram("sllmd_load_seconds", "Model loads onto the device, by the tier the weights were read from",
                         ["tier"], sorted_items(s["load_seconds"]))
        yield _counter("sllmd_evictions", "Models evicted from a tier, by tier and reason (lru, idle, manual, "
                       "pressure, failed)", ["tier", "reason"], sorted_items(s["evictions"]))
        yield _counter("sllmd_migrations", "Live migrations of a running request started on this node, by outcome "
                       "(ok: it moved; fallback: it resumed here; failed)", ["outcome"],
                       sorted_items(s["migrations"]))
        yield CounterMetricFamily("sllmd_forwarded_requests", "Requests this node placed on a peer (counted in "
                                  "sllmd_requests_total where they ran)", value=s["forwarded"])

    # --- read from the tiers now -----------------------------------------------------------------
    def _tiers(self) -> Iterable:
        node = self.node
        used = GaugeMetricFamily("sllmd_tier_used_bytes", "Bytes a tier holds now (device: instances and their "
                                 "KV cache; dram: chunk-pool copies; ssd: the checkpoint store)", labels=["tier"])
        cap = GaugeMetricFamily("sllmd_tier_capacity_bytes", "A tier's capacity (ssd without --ssd-capacity: the "
                                "store's bytes plus its filesystem's free space)", labels=["tier"])
        d = node.device.stats()
        used.add_metric(["device"], d["used_bytes"])
        cap.add_metric(["device"], d["capacity_bytes"])
        dram = node.dram.stats() if getattr(node, "dram", None) is not None else {"used_bytes": 0,
                                                                                 "capacity_bytes": 0}
        used.add_metric(["dram"], dram["used_bytes"])
        cap.add_metric(["dram"], dram["capacity_bytes"])
        s = node.ssd.stats()
        used.add_metric(["ssd"], s["used_bytes"])
        capacity = s["capacity_bytes"]
        if capacity is None:
            try:
                capacity = s["used_bytes"] + shutil.disk_usage(s["root"]).free
            except OSError:
                capacity = float("nan")
        cap.add_metric(["ssd"], capacity)
        yield used
        yield cap
        loads = node.loads.counts()
        in_flight = loads.pop("in_flight", 0)
        yield _counter("sllmd_loads", "Model loads that ended, by outcome (ok; failed; busy: no device room; "
                       "cancelled)", ["outcome"], sorted_items(loads))
        yield GaugeMetricFamily("sllmd_loads_in_flight", "Model loads running now", value=in_flight)

    def _loader(self, snap: dict | None) -> Iterable:
        from sllmd import _native
        c = _native.counters()
        read = CounterMetricFamily("sllmd_loader_read_bytes", "Checkpoint bytes the loader read, by source (disk: "
                                   "O_DIRECT reads; page_cache: buffered reads of pages already cached)",
                                   labels=["source"])
        read.add_metric(["disk"], c["bytes_direct"])
        read.add_metric(["page_cache"], c["bytes_cached"])
        yield read
        yield CounterMetricFamily("sllmd_loader_dram_bytes", "Checkpoint bytes served from the DRAM tier (chunk "
                                  "pool) instead of storage", value=c["bytes_dram"])
        if str(self.node.config.device).startswith("cuda"):
            h2d = c["bytes_h2d"]
            how = "the loader's host->device copies"
        else:
            h2d = sum((snap or {}).get("load_bytes", {}).values())
            how = "on this CPU-only host, the checkpoint bytes each finished load put into device-tier buffers"
        yield CounterMetricFamily("sllmd_host_to_device_bytes", f"Bytes moved from host memory onto the device ({how})",
                                  value=h2d)

    def _instances(self) -> Iterable:
        running = GaugeMetricFamily("sllmd_requests_running", "Requests in an instance's batch now (prefilling or "
                                    "decoding), by model", labels=["model"])
        queued = GaugeMetricFamily("sllmd_requests_queued", "Requests waiting in an instance's queue now, by model",
                                   labels=["model"])
        loaded = 0
        for slot in sorted(self.node.device.slots(), key=lambda s: s.name):
            inst = slot.instance
            if inst is None:
                continue
            loaded += 1
            running.add_metric([slot.name], inst.active)
            queued.add_metric([slot.name], inst.queued)
        yield running
        yield queued
        yield GaugeMetricFamily("sllmd_models_loaded", "Model instances loaded on the device", value=loaded)
        states = GaugeMetricFamily("sllmd_models", "Models in this node's store, by state", labels=["state"])
        for state, n in sorted(self.node.model_states().items()):
            states.add_metric([state], n)
        yield states

    def _cluster_nodes(self) -> GaugeMetricFamily:
        m = GaugeMetricFamily("sllmd_cluster_nodes", "The cluster's members as this node sees them, by status (a "
                              "node without a cluster counts itself alive)", labels=["status"])
        counts = {s: 0 for s in MEMBER_STATUSES}
        if self.cluster is None:
            counts["alive"] = 1
        else:
            try:
                for status, n in self.cluster.member_statuses().items():
                    counts[status] = counts.get(status, 0) + n
            except Exception as e:
                log.debug("metrics: reading the members failed: %s", e)
        for status, n in sorted(counts.items()):
            m.add_metric([status], n)
        return m
