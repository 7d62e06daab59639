"""Prometheus metrics, one registry per app so several apps (tests) never collide.

Per-frame figures (frames in/out, latencies) are kept in plain Python counters and exported by
a custom collector at scrape time: prometheus_client's own metric objects take a lock on every
update, which showed up in profiles of the saturated relay. Everything runs on the Trio thread,
so no lock is needed; rare events (connections, errors, closes) use the library's objects.
"""

from __future__ import annotations

import bisect
import collections
from collections.abc import Iterator, Sequence
from typing import Final

import attrs
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

LATENCY_BUCKETS: Final = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class FastHistogram:
    """A lock-free histogram for the Trio thread; exported by `_FastCollector`."""

    def __init__(self, name: str, documentation: str, buckets: Sequence[float]) -> None:
        self.name = name
        self.documentation = documentation
        self._bounds = tuple(buckets)
        self._counts = [0] * (len(self._bounds) + 1)
        self._sum = 0.0

    def observe(self, value: float) -> None:
        self._counts[bisect.bisect_left(self._bounds, value)] += 1
        self._sum += value

    def family(self) -> HistogramMetricFamily:
        cumulative = []
        running = 0
        for bound, count in zip((*self._bounds, float("inf")), self._counts, strict=True):
            running += count
            cumulative.append((_bound_label(bound), running))
        return HistogramMetricFamily(
            self.name, self.documentation, buckets=cumulative, sum_value=self._sum
        )


def _bound_label(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)


class _FastCollector(Collector):
    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        metrics = self._metrics
        for name, documentation, counts in (
            ("chat_frames_in", "Client frames received, by type", metrics.frames_in),
            ("chat_frames_out", "Server frames sent, by type", metrics.frames_out),
        ):
            family = CounterMetricFamily(name, documentation, labels=["type"])
            for frame_type, count in sorted(counts.items()):
                family.add_metric([frame_type], count)
            yield family
        yield metrics.commit_latency.family()
        yield metrics.deliver_latency.family()


@attrs.define
class Metrics:
    registry: CollectorRegistry = attrs.field(factory=CollectorRegistry)
    frames_in: collections.Counter[str] = attrs.field(factory=collections.Counter)
    frames_out: collections.Counter[str] = attrs.field(factory=collections.Counter)
    commit_latency: FastHistogram = attrs.field(
        factory=lambda: FastHistogram(
            "chat_commit_seconds", "send_message: from frame to COMMIT", LATENCY_BUCKETS
        )
    )
    deliver_latency: FastHistogram = attrs.field(
        factory=lambda: FastHistogram(
            "chat_publish_to_deliver_seconds",
            "From commit (publish) to the frame written to a recipient's socket",
            LATENCY_BUCKETS,
        )
    )
    connections: Gauge = attrs.field(init=False)
    bound_users: Gauge = attrs.field(init=False)
    errors: Counter = attrs.field(init=False)
    closes: Counter = attrs.field(init=False)
    slow_consumers: Counter = attrs.field(init=False)
    webhook_deliveries: Counter = attrs.field(init=False)
    webhook_pending: Gauge = attrs.field(init=False)
    webhook_oldest_age: Gauge = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        registry = self.registry
        self.connections = Gauge(
            "chat_connections", "Open WebSocket connections", registry=registry
        )
        self.bound_users = Gauge(
            "chat_bound_users", "Users with at least one bound connection here", registry=registry
        )
        self.errors = Counter(
            "chat_errors", "Error frames sent, by code", ["code"], registry=registry
        )
        self.closes = Counter(
            "chat_closes",
            "Connections closed by the server, by close code",
            ["code"],
            registry=registry,
        )
        self.slow_consumers = Counter(
            "chat_slow_consumers_dropped", "Connections dropped for not reading", registry=registry
        )
        self.webhook_deliveries = Counter(
            "chat_webhook_deliveries",
            "Webhook delivery attempts, by outcome (delivered, failed: retried later, dead:"
            " given up)",
            ["outcome"],
            registry=registry,
        )
        self.webhook_pending = Gauge(
            "chat_webhook_pending",
            "Webhook events not yet delivered (all endpoints)",
            registry=registry,
        )
        self.webhook_oldest_age = Gauge(
            "chat_webhook_oldest_pending_seconds",
            "Age of the oldest webhook event not yet delivered",
            registry=registry,
        )
        registry.register(_FastCollector(self))

    def count_in(self, frame_type: str) -> None:
        self.frames_in[frame_type] += 1

    def count_out(self, frame_type: str) -> None:
        self.frames_out[frame_type] += 1

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
