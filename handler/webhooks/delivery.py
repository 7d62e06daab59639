"""The webhook service: POSTs the outbox's events to their endpoints, at least once.

Theory of operation:
- One task per endpoint, each with its own HTTP client (httpx, its own connection pool): it
  claims a batch of that endpoint's due rows (`queue.OutboxQueue.claim`, a lease), POSTs them
  `concurrency` at a time, each under `timeout_s`, then settles each row: 2xx deletes it,
  anything else (an error status, a refused connection, a timeout) schedules the next attempt
  (`backoff.Backoff`), and past the give-up age the row is deleted as dead. An endpoint that
  hangs therefore holds up only its own task, at most `timeout_s` per event; the WebSocket
  traffic never waits for any of this (the writer only inserted the rows).
- Nothing is deleted before its endpoint answered 2xx, so an event survives a crash or a
  restart; what a crashed node had claimed is delivered again when its lease runs out (on
  SQLite at once, at the next start). Receivers deduplicate by `id`.
- The unread scan (`unread.scan`) and the statistics (queue depth, oldest event) run as two
  more tasks. Every failure of the database is logged and retried after `poll_s`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Final

import attrs
import httpx
import trio

from handler.config import WebhookEndpoint, WebhooksConfig
from handler.metrics import Metrics
from handler.store.outbox import Outbox
from handler.timefmt import now_ms
from handler.webhooks import events, unread
from handler.webhooks.backoff import Backoff
from handler.webhooks.queue import Due, OutboxQueue

log = logging.getLogger("handler.webhooks")

DELIVERED: Final = "delivered"
FAILED: Final = "failed"  # to be retried
DEAD: Final = "dead"  # given up


@attrs.frozen
class DeliveryOptions:
    """The service's pace; the defaults are production's, tests shorten them."""

    poll_s: float = 0.5
    batch: int = 32
    concurrency: int = 4  # requests in flight per endpoint
    timeout_s: float = 10.0
    backoff: Backoff = attrs.field(factory=Backoff)
    stats_s: float = 5.0
    scan_s: float | None = None  # None: a third of `unread_delay_s`, at most 5 s

    @property
    def lease_ms(self) -> int:
        """Longer than a batch can take: every event of it in turn under its timeout."""
        rounds = -(-self.batch // self.concurrency)
        return round((rounds + 1) * self.timeout_s * 2 * 1000)


class WebhookService:
    """Start `run` with `nursery.start`; `stop` ends it (see the module docstring)."""

    def __init__(
        self,
        config: WebhooksConfig,
        queue: OutboxQueue,
        metrics: Metrics,
        options: DeliveryOptions = DeliveryOptions(),
    ) -> None:
        outbox = Outbox.of(config)
        assert outbox is not None, "a WebhookService needs at least one endpoint"
        self._config = config
        self._outbox = outbox
        self._queue = queue
        self._metrics = metrics
        self._options = options
        self._scope = trio.CancelScope()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with self._scope:
            if self._queue.single_process:
                await self._release_leases()
            try:
                async with trio.open_nursery() as nursery:
                    for endpoint in self._config.endpoints:
                        nursery.start_soon(self._endpoint_loop, endpoint)
                    if any(events.MESSAGE_UNREAD in e.events for e in self._config.endpoints):
                        nursery.start_soon(self._scan_loop)
                    nursery.start_soon(self._stats_loop)
                    task_status.started()
            finally:
                with trio.CancelScope(shield=True):
                    await self._queue.aclose()

    async def stop(self) -> None:
        """Cancel the tasks: an event POSTed but not settled is sent again later."""
        self._scope.cancel()

    async def _release_leases(self) -> None:
        try:
            await self._queue.release_leases()
        except Exception:
            log.exception("webhooks: could not release the leases of a previous run")

    # ------------------------------------------------------------------ delivery

    async def _endpoint_loop(self, endpoint: WebhookEndpoint) -> None:
        options = self._options
        limits = httpx.Limits(max_connections=options.concurrency)
        async with httpx.AsyncClient(timeout=options.timeout_s, limits=limits) as client:
            while True:
                try:
                    due = await self._queue.claim(
                        endpoint.url, options.batch, now_ms(), options.lease_ms
                    )
                except Exception:
                    log.exception("webhooks: claiming events failed; retrying")
                    due = []
                if not due:
                    await trio.sleep(options.poll_s)
                    continue
                await self._deliver_batch(client, endpoint, due)

    async def _deliver_batch(
        self, client: httpx.AsyncClient, endpoint: WebhookEndpoint, due: Sequence[Due]
    ) -> None:
        pending = iter(due)

        async def worker() -> None:
            for item in pending:  # the workers share one iterator: each item once
                await self._deliver(client, endpoint, item)

        async with trio.open_nursery() as nursery:
            for _ in range(min(self._options.concurrency, len(due))):
                nursery.start_soon(worker)

    async def _deliver(
        self, client: httpx.AsyncClient, endpoint: WebhookEndpoint, item: Due
    ) -> None:
        ok = await self._post(client, endpoint, item)
        try:
            if ok:
                await self._queue.delivered(item.row_id)
                self._metrics.webhook_deliveries.labels(DELIVERED).inc()
                return
            failures = item.attempts + 1
            at = self._options.backoff.next_at_ms(failures, item.created_at_ms, now_ms())
            if at is None:
                await self._queue.delivered(item.row_id)
                self._metrics.webhook_deliveries.labels(DEAD).inc()
                log.warning(
                    "webhooks: gave up event %s for %s after %d attempts",
                    item.event_id,
                    endpoint.url,
                    failures,
                )
                return
            await self._queue.retry(item.row_id, failures, at)
            self._metrics.webhook_deliveries.labels(FAILED).inc()
        except Exception:
            # Its lease runs out and it is delivered (again) later: at least once.
            log.exception("webhooks: settling event %s failed", item.event_id)

    async def _post(self, client: httpx.AsyncClient, endpoint: WebhookEndpoint, item: Due) -> bool:
        headers = {
            "Content-Type": "application/json",
            events.EVENT_ID_HEADER: item.event_id,
            events.SIGNATURE_HEADER: events.sign(endpoint.secret, item.body),
        }
        # httpx bounds each phase; this bounds the whole (a receiver that trickles bytes).
        with trio.move_on_after(self._options.timeout_s):
            try:
                response = await client.post(endpoint.url, content=item.body, headers=headers)
            except httpx.HTTPError as error:
                log.info("webhooks: %s for event %s: %r", endpoint.url, item.event_id, error)
                return False
            return 200 <= response.status_code < 300
        log.info("webhooks: %s timed out for event %s", endpoint.url, item.event_id)
        return False

    # ------------------------------------------------------------------ unread, statistics

    async def _scan_loop(self) -> None:
        delay_s = self._config.unread_delay_s
        interval = self._options.scan_s or min(delay_s / 3, 5.0)
        while True:
            full = False
            try:
                _, full = await unread.scan(
                    self._queue,
                    self._outbox,
                    now_ms=now_ms(),
                    delay_ms=round(delay_s * 1000),
                    max_age_ms=round(self._options.backoff.give_up_s * 1000),
                )
            except Exception:
                log.exception("webhooks: the unread scan failed; retrying")
            if not full:
                await trio.sleep(interval)

    async def _stats_loop(self) -> None:
        while True:
            try:
                count, oldest = await self._queue.depth()
            except Exception:
                log.exception("webhooks: reading the queue depth failed")
            else:
                self._metrics.webhook_pending.set(count)
                age = 0.0 if oldest is None else max(now_ms() - oldest, 0) / 1000
                self._metrics.webhook_oldest_age.set(age)
            await trio.sleep(self._options.stats_s)


__all__ = ["DEAD", "DELIVERED", "FAILED", "DeliveryOptions", "WebhookService"]
