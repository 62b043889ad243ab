"""The daemon's Prometheus metrics, in one registry: GET /metrics and `sllmctl metrics`.

Names are prefixed `sllmd_`, in base units (seconds, bytes), counters end in
`_total`. Each daemon has its own `Metrics` (its own CollectorRegistry, not
prometheus_client's global one), so several in one process do not collide; the
daemon makes one and hands it to the IPC server and the HTTP front end.
Two kinds of metric live here: the HTTP front end's own counters (sllmd_http_*,
incremented as HTTP requests pass), and the node's metrics, read from the node
when scraped (sllmd.observability.collector), which are true whichever front
end (IPC, HTTP, a peer's forwarded request) caused them.
"""
from __future__ import annotations

from typing import Any

from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics,
                               generate_latest)

from sllmd.observability.counters import TTFT_BUCKETS


class Metrics:
    """The registry and the metrics the front ends update."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, node: Any = None, cluster: Any = None):
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
            from sllmd.observability.collector import NodeCollector
            r.register(NodeCollector(node, cluster))

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
        """The Prometheus text exposition of every metric, read now."""
        return generate_latest(self.registry)
