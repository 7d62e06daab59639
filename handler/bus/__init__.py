"""Fan-out backends behind one contract (`handler.bus.base.Bus`)."""

from __future__ import annotations

from handler.bus.base import Bus, Delivery, DeliverySink
from handler.config import BusConfig

__all__ = ["Bus", "Delivery", "DeliverySink", "open_bus"]


def open_bus(config: BusConfig) -> Bus:
    """Build the configured backend; run it with `await nursery.start(bus.run, sink)`."""
    if config.backend == "redis":
        from handler.bus.redis import RedisBus

        return RedisBus(config, prefix=config.prefix)
    from handler.bus.local import LocalBus

    return LocalBus()
