"""Prometheus metrics, one registry per app so several apps (tests) never collide."""

from __future__ import annotations

import attrs
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


@attrs.define
class Metrics:
    registry: CollectorRegistry = attrs.field(factory=CollectorRegistry)
    connections: Gauge = attrs.field(init=False)
    bound_users: Gauge = attrs.field(init=False)
    frames_in: Counter = attrs.field(init=False)
    frames_out: Counter = attrs.field(init=False)
    errors: Counter = attrs.field(init=False)
    closes: Counter = attrs.field(init=False)
    commit_latency: Histogram = attrs.field(init=False)
    deliver_latency: Histogram = attrs.field(init=False)
    slow_consumers: Counter = attrs.field(init=False)
    _in_children: dict[str, Counter] = attrs.field(init=False, factory=dict)
    _out_children: dict[str, Counter] = attrs.field(init=False, factory=dict)

    def __attrs_post_init__(self) -> None:
        registry = self.registry
        self.connections = Gauge(
            "chat_connections", "Open WebSocket connections", registry=registry
        )
        self.bound_users = Gauge(
            "chat_bound_users", "Users with at least one bound connection here", registry=registry
        )
        self.frames_in = Counter(
            "chat_frames_in", "Client frames received, by type", ["type"], registry=registry
        )
        self.frames_out = Counter(
            "chat_frames_out", "Server frames sent, by type", ["type"], registry=registry
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
        self.commit_latency = Histogram(
            "chat_commit_seconds",
            "send_message: from frame to COMMIT",
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.deliver_latency = Histogram(
            "chat_publish_to_deliver_seconds",
            "From commit (publish) to the frame written to a recipient's socket",
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.slow_consumers = Counter(
            "chat_slow_consumers_dropped", "Connections dropped for not reading", registry=registry
        )

    def count_in(self, frame_type: str) -> None:
        """Hot path: the labelled child is looked up once per type, not once per frame."""
        child = self._in_children.get(frame_type)
        if child is None:
            child = self._in_children[frame_type] = self.frames_in.labels(frame_type)
        child.inc()

    def count_out(self, frame_type: str) -> None:
        child = self._out_children.get(frame_type)
        if child is None:
            child = self._out_children[frame_type] = self.frames_out.labels(frame_type)
        child.inc()

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
