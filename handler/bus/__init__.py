"""Fan-out backends behind one contract (`handler.bus.base.Bus`)."""

from __future__ import annotations

from handler.bus.base import Bus, Delivery, DeliverySink
from handler.config import BusConfig
from handler.presence.link import LocalPresenceLink, PresenceLink

__all__ = ["Bus", "Delivery", "DeliverySink", "open_bus", "open_presence_link"]


def open_bus(config: BusConfig) -> Bus:
    """Build the configured backend; run it with `await nursery.start(bus.run, sink)`."""
    if config.backend == "redis":
        from handler.bus.redis import RedisBus

        return RedisBus(config, prefix=config.prefix)
    from handler.bus.local import LocalBus

    return LocalBus()


def open_presence_link(config: BusConfig) -> PresenceLink:
    """How this node's presence reaches the others: through Redis with the Redis bus."""
    if config.backend == "redis":
        from handler.bus.redis_presence import RedisPresenceLink

        return RedisPresenceLink(config.url, prefix=config.prefix)
    return LocalPresenceLink()
