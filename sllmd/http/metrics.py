"""The daemon's Prometheus metrics, in one registry (GET /metrics).

Names are prefixed `sllmd_`, in base units (seconds, bytes), counters end in
`_total`. Each daemon has its own `Metrics` (its own CollectorRegistry, not
prometheus_client's global one), so several in one process do not collide.
Two kinds of metric live here: counters the HTTP front end increments as
requests pass, and gauges read from the node when scraped (NodeCollector),
which are true whichever front end (IPC or HTTP) caused them. More metrics
(the loader's bytes, tier occupancy ...) join by adding to this module.
"""
from __future__ import annotations

import logging
from typing import Any, Iterable

from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics,
                               generate_latest)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class NodeCollector(Collector):
    """Gauges read from the node at scrape time: models by state, instances on the device."""

    def __init__(self, node: Any):
        self.node = node

    def collect(self) -> Iterable[GaugeMetricFamily]:
        try:
            models = self.node.models()
            instances = self.node.ps()
        except Exception as e:   # a stopping node: no node gauges in this scrape
            log.debug("metrics: the node did not answer: %s", e)
            return
        by_state = GaugeMetricFamily("sllmd_models", "Models in this node's store, by state", labels=["state"])
        counts: dict[str, int] = {}
        for m in models:
            counts[m.get("state") or "unknown"] = counts.get(m.get("state") or "unknown", 0) + 1
        for state, n in sorted(counts.items()):
            by_state.add_metric([state], n)
        yield by_state
        loaded = [i for i in instances if i.get("state") == "loaded"]
        yield GaugeMetricFamily("sllmd_models_loaded", "Model instances loaded on the device", value=len(loaded))
        yield GaugeMetricFamily("sllmd_requests_running", "Requests decoding on this node's instances",
                                value=sum(int(i.get("active_requests") or 0) for i in instances))
        yield GaugeMetricFamily("sllmd_requests_queued", "Requests queued on this node's instances",
                                value=sum(int(i.get("queued") or 0) for i in instances))


class Metrics:
    """The registry and the metrics the front ends update."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, node: Any = None):
        disable_created_metrics()   # no *_created series: a scrape carries only what is measured
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.http_requests = Counter("sllmd_http_requests", "HTTP requests answered, by route and status",
                                     ["route", "status"], registry=r)
        self.http_in_flight = Gauge("sllmd_http_requests_in_flight", "HTTP completion requests running now",
                                    registry=r)
        self.prompt_tokens = Counter("sllmd_http_prompt_tokens", "Prompt tokens of finished HTTP completions",
                                     ["model"], registry=r)
        self.generated_tokens = Counter("sllmd_http_generated_tokens", "Tokens generated for HTTP completions",
                                        ["model"], registry=r)
        self.ttft = Histogram("sllmd_http_time_to_first_token_seconds",
                              "From a completion's arrival at the node to its first token (the engine's ttft_s, "
                              "a model load included)", ["model"], buckets=TTFT_BUCKETS, registry=r)
        if node is not None:
            r.register(NodeCollector(node))

    def request(self, route: str, status: int) -> None:
        self.http_requests.labels(route=route, status=str(status)).inc()

    def completion(self, model: str, stats: dict | None) -> None:
        """A finished completion's token counts and time to first token (from its done stats)."""
        if not stats:
            return
        self.prompt_tokens.labels(model=model).inc(int(stats.get("prompt_tokens") or 0))
        self.generated_tokens.labels(model=model).inc(int(stats.get("tokens") or 0))
        ttft = stats.get("ttft_s")
        if isinstance(ttft, (int, float)) and ttft >= 0:
            self.ttft.labels(model=model).observe(ttft)

    def render(self) -> bytes:
        return generate_latest(self.registry)
