"""Prometheus metrics, served on their own HTTP port (``--metrics-port``).

A private registry keeps these apart from vLLM's own metrics in the default registry.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24)
TOKEN_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
STAGES = ("queue", "engine", "heads", "total")


class Metrics:
    """The server's metrics; ``stage`` splits latency into queue / engine / heads / total."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.calls = Counter(
            "probeserve_calls", "RPC calls by method and final status code", ["rpc", "code"], registry=r
        )
        # bundle: the loaded bundle that answered, or "" when none did (unknown name, refused early).
        self.items = Counter(
            "probeserve_items", "Extraction items (unary, batch or stream) by bundle and status code",
            ["rpc", "bundle", "code"], registry=r,
        )  # fmt: skip
        self.latency = Histogram(
            "probeserve_item_latency_seconds", "Per-item latency by stage and bundle", ["stage", "bundle"],
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self._stages: dict[str, dict[str, Any]] = {}
        self.in_flight = Gauge(
            "probeserve_in_flight_items", "Items admitted and not yet answered", registry=r
        )
        self.in_flight_limit = Gauge("probeserve_in_flight_limit", "The admission limit", registry=r)
        self.prompt_tokens = Histogram(
            "probeserve_prompt_tokens", "Prompt tokens per item", buckets=TOKEN_BUCKETS, registry=r
        )
        self.engine_unfinished = Gauge(
            "probeserve_engine_unfinished_requests", "Requests the engine still holds", registry=r
        )
        self.engine_up = Gauge("probeserve_engine_up", "1 while the engine is ready and alive", registry=r)

    def stage_latency(self, bundle: str) -> dict[str, Any]:
        """The four stage histograms of a bundle, resolved once: every answer observes all four."""
        stages = self._stages.get(bundle)
        if stages is None:
            stages = self._stages[bundle] = {stage: self.latency.labels(stage, bundle) for stage in STAGES}
        return stages

    def watch_engine(self, unfinished: Callable[[], int], up: Callable[[], bool]) -> None:
        """Read the engine's own counters at scrape time."""
        self.engine_unfinished.set_function(lambda: float(unfinished()))
        self.engine_up.set_function(lambda: 1.0 if up() else 0.0)

    def serve(self, host: str, port: int) -> int:
        """Start the HTTP endpoint in a thread; returns the bound port."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return int(server.server_port)
