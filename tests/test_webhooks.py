"""Webhooks (`handler.webhooks`, `handler.store.outbox`): the outbox rows written with the
changes on every backend, delivery to a real HTTP receiver on 127.0.0.1 (signatures, retries
through an outage, a hanging endpoint, two nodes), the unread scan, and the upgrade to schema 7.

Delivery runs with short timings (`FAST`): the same schedule in milliseconds.
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, Final

import psycopg
import pytest
import trio
from scale_support import database_url, fresh_schema
from test_store_contract import TIMEOUT_S, open_handing, send
from webhook_support import Receiver, until

from handler.config import StorageConfig, WebhookEndpoint, WebhooksConfig
from handler.metrics import Metrics
from handler.protocol import Chat, ChatView
from handler.store import Store, open_store
from handler.store.schema import POSTGRES_MIGRATIONS, SQLITE_MIGRATIONS
from handler.webhooks import events
from handler.webhooks.backoff import Backoff
from handler.webhooks.delivery import DeliveryOptions, WebhookService
from handler.webhooks.queue import OutboxQueue

SECRET: Final = "webhook-secret-0123456789"
FAST: Final = DeliveryOptions(
    poll_s=0.02,
    timeout_s=0.5,
    stats_s=0.05,
    scan_s=0.05,
    backoff=Backoff(first_s=0.05, max_s=0.2, give_up_s=60.0),
)


# --------------------------------------------------------------------------- pure parts


def test_the_signature_is_the_hmac_of_the_raw_body() -> None:
    body = events.encode_event("evt_1", events.MESSAGE_CREATED, 0, {"content": "hi"})
    signature = events.sign(SECRET, body)
    assert signature.startswith("sha256=")
    assert len(signature) == 7 + 64
    assert events.verify(SECRET, body, signature)
    assert not events.verify(SECRET, body + b" ", signature)
    assert not events.verify("another-secret-0123456789", body, signature)


def test_backoff_doubles_from_one_second_to_an_hour_and_gives_up_after_a_day() -> None:
    backoff = Backoff()
    assert [backoff.delay_s(n) for n in (1, 2, 3, 4)] == [1.0, 2.0, 4.0, 8.0]
    assert backoff.delay_s(12) == 2048.0
    assert backoff.delay_s(13) == backoff.delay_s(40) == 3600.0
    day_ms = 24 * 3600 * 1000
    assert backoff.next_at_ms(1, 0, 1000) == 2000
    assert backoff.next_at_ms(20, 0, day_ms - 3_600_000) == day_ms
    assert backoff.next_at_ms(20, 0, day_ms - 3_599_999) is None


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.scale)])
def storage_config(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StorageConfig]:
    if request.param == "sqlite":
        yield StorageConfig(backend="sqlite", path=tmp_path / "chat.db")
        return
    with fresh_schema(database_url()) as dsn:
        yield StorageConfig(backend="postgres", dsn=dsn, pool_size=2)


def hooks(*urls: str, delay_s: float = 30.0, **events_of: list[str]) -> WebhooksConfig:
    return WebhooksConfig(
        tuple(
            WebhookEndpoint(url, SECRET, frozenset(events_of.get(f"e{i}", config_events())))
            for i, url in enumerate(urls)
        ),
        unread_delay_s=delay_s,
    )


def config_events() -> list[str]:
    return [events.CHAT_CREATED, events.MESSAGE_CREATED, events.MESSAGE_UPDATED,
            events.MESSAGE_READ, events.MESSAGE_UNREAD]  # fmt: skip


@pytest.fixture
async def stores(nursery: trio.Nursery) -> AsyncIterator[list[Store]]:
    opened: list[Store] = []
    yield opened
    for store in opened:
        await store.aclose()


async def open_with(
    config: StorageConfig, webhooks: WebhooksConfig, nursery: trio.Nursery, stores: list[Store]
) -> Store:
    store = open_store(config, webhooks)
    await open_handing(store, nursery)
    stores.append(store)
    return store


def outbox_rows(config: StorageConfig) -> list[tuple[Any, ...]]:
    sql = "SELECT event_id, endpoint, body FROM webhook_outbox ORDER BY id"
    if config.backend == "sqlite":
        db = sqlite3.connect(config.path)
        try:
            return [tuple(row) for row in db.execute(sql)]
        finally:
            db.close()
    with psycopg.connect(config.dsn, autocommit=True) as connection:
        return [tuple(row) for row in connection.execute(sql)]


async def start_service(
    nursery: trio.Nursery,
    storage: StorageConfig,
    webhooks: WebhooksConfig,
    options: DeliveryOptions = FAST,
) -> tuple[WebhookService, Metrics]:
    metrics = Metrics()
    service = WebhookService(webhooks, OutboxQueue.of(storage), metrics, options)
    await nursery.start(service.run)
    return service, metrics


async def wait_for(receiver: Receiver, count: int, timeout: float = TIMEOUT_S) -> None:
    with trio.fail_after(timeout):
        await until(lambda: len(set(receiver.event_ids())) >= count)


# --------------------------------------------------------------------------- the outbox


async def test_every_change_writes_its_event_in_its_transaction(
    storage_config: StorageConfig, nursery: trio.Nursery, stores: list[Store]
) -> None:
    store = await open_with(
        storage_config, hooks("http://a.invalid/", "http://b.invalid/", e1=["message.read"]),
        nursery, stores,
    )  # fmt: skip
    with trio.fail_after(TIMEOUT_S):
        chat, _ = await store.create_chat("alice", "bob")
        message = await send(store, chat, "alice", "hello")
        edited = await store.edit_message(chat, "alice", message.message_id, "hello!")
        receipt, _ = await store.mark_read(chat, "bob", message.message_id)
        group = await store.create_group("alice", "Team", ["bob", "carol"])
        await store.set_block("alice", "dave", True, 10)  # not an event
        await store.flush()
    rows = outbox_rows(storage_config)
    to_a = [events_of(body) for _, url, body in rows if url == "http://a.invalid/"]
    assert [(event["type"], event["data"]) for event in to_a] == [
        ("chat.created", ChatView.fresh(chat).to_wire()),
        ("message.created", message.to_wire()),
        ("message.updated", edited.to_wire()),
        ("message.read", {"chat_id": chat.chat_id, "user_id": "bob", "seq": 1,
                          "message_id": message.message_id, "timestamp": receipt.timestamp}),
        ("chat.created", ChatView.fresh(group).to_wire()),
    ]  # fmt: skip
    assert edited.to_wire()["edited_at"]
    # The other endpoint asked for reads only: the same event, the same id.
    to_b = [
        (event_id, events_of(body)) for event_id, url, body in rows if url != "http://a.invalid/"
    ]
    assert [event["type"] for _, event in to_b] == ["message.read"]
    assert to_b[0][0] == to_b[0][1]["id"] == to_a[3]["id"]
    assert len({event["id"] for event in to_a}) == 5


def events_of(body: bytes) -> dict[str, Any]:
    import orjson

    event: dict[str, Any] = orjson.loads(bytes(body))
    assert set(event) == {"id", "type", "created_at", "data"}
    return event


async def test_without_webhooks_nothing_is_written(
    storage_config: StorageConfig, nursery: trio.Nursery, stores: list[Store]
) -> None:
    store = await open_with(storage_config, WebhooksConfig(), nursery, stores)
    with trio.fail_after(TIMEOUT_S):
        chat, _ = await store.create_chat("alice", "bob")
        await send(store, chat, "alice", "hello")
    assert outbox_rows(storage_config) == []


# --------------------------------------------------------------------------- delivery


async def test_a_receiver_down_then_failing_then_back_gets_every_event_signed(
    storage_config: StorageConfig, nursery: trio.Nursery, stores: list[Store]
) -> None:
    receiver = Receiver()
    await receiver.start(nursery)
    receiver.stop()  # down: connections refused
    webhooks = hooks(receiver.url)
    store = await open_with(storage_config, webhooks, nursery, stores)
    _, metrics = await start_service(nursery, storage_config, webhooks)
    with trio.fail_after(TIMEOUT_S):
        chat, _ = await store.create_chat("alice", "bob")
        sent = [await send(store, chat, "alice", f"m{i}") for i in range(10)]
        await trio.sleep(0.3)
        receiver.mode = "error"
        await receiver.start(nursery)
        await until(lambda: receiver.attempts >= 11)
        receiver.mode = "ok"
        await wait_for(receiver, 11)
    ids = receiver.event_ids()
    assert all(ids.count(event_id) <= 3 for event_id in ids)
    created = [r.event["data"] for r in receiver.received if r.event["type"] == "message.created"]
    assert sorted(m["message_id"] for m in created) == sorted(m.message_id for m in sent)  # type: ignore[index]
    for request in receiver.received:
        assert request.headers["x-chat-event-id"] == request.event["id"]
        assert events.verify(SECRET, request.body, request.headers["x-chat-signature"])
        assert request.headers["content-type"] == "application/json"
    with trio.fail_after(TIMEOUT_S):
        await until(lambda: not outbox_rows(storage_config))
    samples = metrics.registry.get_sample_value
    assert samples("chat_webhook_deliveries_total", {"outcome": "delivered"}) == len(ids)
    assert (samples("chat_webhook_deliveries_total", {"outcome": "failed"}) or 0) >= 11


async def test_a_hanging_endpoint_does_not_hold_up_another(
    tmp_path: Path, nursery: trio.Nursery, stores: list[Store]
) -> None:
    storage = StorageConfig(backend="sqlite", path=tmp_path / "chat.db")
    hanging, healthy = Receiver(mode="hang"), Receiver()
    await hanging.start(nursery)
    await healthy.start(nursery)
    webhooks = hooks(hanging.url, healthy.url)
    store = await open_with(storage, webhooks, nursery, stores)
    slow = DeliveryOptions(poll_s=0.02, timeout_s=30.0, stats_s=0.05, scan_s=0.05)
    await start_service(nursery, storage, webhooks, slow)
    with trio.fail_after(5):  # far less than the hanging endpoint's 30 s timeout
        chat, _ = await store.create_chat("alice", "bob")
        for i in range(20):
            await send(store, chat, "alice", f"m{i}")
        await wait_for(healthy, 21)
    assert hanging.attempts >= 1
    assert hanging.received == []


@pytest.mark.scale
async def test_two_nodes_deliver_each_event_once(
    nursery: trio.Nursery, stores: list[Store]
) -> None:
    with fresh_schema(database_url()) as dsn:
        storage = StorageConfig(backend="postgres", dsn=dsn, pool_size=2)
        receiver = Receiver()
        await receiver.start(nursery)
        webhooks = hooks(receiver.url)
        store = await open_with(storage, webhooks, nursery, stores)
        one, _ = await start_service(nursery, storage, webhooks)
        two, _ = await start_service(nursery, storage, webhooks)
        with trio.fail_after(TIMEOUT_S):
            chat, _ = await store.create_chat("alice", "bob")
            for i in range(60):
                await send(store, chat, "alice", f"m{i}")
            await wait_for(receiver, 61)
            await trio.sleep(0.2)
        ids = receiver.event_ids()
        assert len(ids) == len(set(ids)) == 61
        await one.stop()
        await two.stop()
        for store in stores:
            await store.aclose()
        stores.clear()


# --------------------------------------------------------------------------- unread


async def test_unread_fires_for_an_offline_recipient_after_the_delay_only(
    storage_config: StorageConfig, nursery: trio.Nursery, stores: list[Store]
) -> None:
    from test_store_contract import deliver, live

    receiver = Receiver()
    await receiver.start(nursery)
    webhooks = hooks(receiver.url, delay_s=0.5)
    store = await open_with(storage_config, webhooks, nursery, stores)
    with trio.fail_after(TIMEOUT_S):
        group = await store.create_group("alice", "Team", ["bob", "carol"])
        message = await send(store, group, "alice", "anyone?")
        await deliver(store, "carol", live(message), chat_ids=[group.chat_id])  # carol got it
        await start_service(nursery, storage_config, webhooks)
        with trio.fail_after(3):  # the delay is 0.5 s
            await until(lambda: any(r.event["type"] == "message.unread" for r in receiver.received))
        await trio.sleep(0.3)  # more scans: nothing more
    unread = [r.event for r in receiver.received if r.event["type"] == "message.unread"]
    assert [event["data"] for event in unread] == [{"user_id": "bob", "message": message.to_wire()}]
    assert sorted(r.event["type"] for r in receiver.received) == [
        "chat.created", "message.created", "message.unread"
    ]  # fmt: skip


async def test_no_unread_before_the_delay(
    tmp_path: Path, nursery: trio.Nursery, stores: list[Store]
) -> None:
    storage = StorageConfig(backend="sqlite", path=tmp_path / "chat.db")
    receiver = Receiver()
    await receiver.start(nursery)
    webhooks = hooks(receiver.url, delay_s=60.0)
    store = await open_with(storage, webhooks, nursery, stores)
    await start_service(nursery, storage, webhooks)
    with trio.fail_after(TIMEOUT_S):
        chat, _ = await store.create_chat("alice", "bob")
        await send(store, chat, "alice", "hi")
        await wait_for(receiver, 2)
        await trio.sleep(0.3)
    # (Delivery is concurrent: events may arrive in any order.)
    assert sorted(r.event["type"] for r in receiver.received) == ["chat.created", "message.created"]


# --------------------------------------------------------------------------- upgrade from 6


def _write_v6(storage: StorageConfig) -> None:
    """Schema 6 with one chat, one message and both members' rows."""
    inserts = (
        "INSERT INTO chats (user_a, user_b, created_by, created_at_ms, last_activity_ms,"
        " last_message_ms, last_seq, version) VALUES ('alice', 'bob', 'alice', 1, 2, 2, 1, 1)",
        "INSERT INTO members (chat_id, user_id, chat_delivered, delivered_seq, read_seq)"
        " VALUES (1, 'alice', 1, 1, 1), (1, 'bob', 0, 0, 0)",
    )
    if storage.backend == "sqlite":
        db = sqlite3.connect(storage.path, isolation_level=None)
        try:
            db.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
            for version, statements in enumerate(SQLITE_MIGRATIONS[:6], start=1):
                for statement in statements:
                    db.execute(statement)
                db.execute("INSERT INTO schema_version (version) VALUES (?)", (version,))
            db.execute(inserts[0])
            db.execute(
                "INSERT INTO messages (chat_id, sender_id, recipient_id, content, created_at_ms,"
                " seq, version) VALUES (1, 'alice', 'bob', 'old', 2, 1, 1)"
            )
            db.execute(inserts[1])
        finally:
            db.close()
        return
    with psycopg.connect(storage.dsn, autocommit=True) as pg:
        pg.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        for version, statements in enumerate(POSTGRES_MIGRATIONS[:6], start=1):
            for statement in statements:
                pg.execute(statement)
            pg.execute("INSERT INTO schema_version (version) VALUES (%s)", (version,))
        pg.execute(inserts[0])
        pg.execute(
            "INSERT INTO messages (chat_id, sender_id, recipient_id, content, created_at_ms,"
            " seq, version) VALUES (1, 'alice', 'bob', 'old'::bytea, 2, 1, 1)"
        )
        pg.execute(inserts[1])


async def test_upgrade_from_version_6_keeps_the_data_and_reports_no_old_news(
    storage_config: StorageConfig, nursery: trio.Nursery, stores: list[Store]
) -> None:
    _write_v6(storage_config)
    receiver = Receiver()
    await receiver.start(nursery)
    webhooks = hooks(receiver.url, delay_s=0.1)
    store = await open_with(storage_config, webhooks, nursery, stores)
    await start_service(nursery, storage_config, webhooks)
    with trio.fail_after(TIMEOUT_S):
        chat = await store.get_chat("1")
        assert chat == Chat("1", ("alice", "bob"), "alice", "1970-01-01T00:00:00.001Z")
        backlog = await store.backlog("bob")
        assert [m.content for _, batch in backlog.messages for m in batch] == ["old"]
        new = await send(store, chat, "alice", "new")
        assert new.seq == 2
        await wait_for(receiver, 2)  # the new message, then its unread
        await trio.sleep(0.3)
    kinds = sorted(((r.event["type"], r.event["data"]) for r in receiver.received), key=str)
    assert kinds == [
        ("message.created", new.to_wire()),
        ("message.unread", {"user_id": "bob", "message": new.to_wire()}),
    ]  # the message of 1970 is older than a day: no event


# --------------------------------------------------------------------------- kill -9


@pytest.mark.slow
async def test_events_pending_at_a_kill_are_delivered_after_the_restart(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    """`python -m handler` with the production timings, killed with SIGKILL while its receiver
    answers 500: the restarted process delivers every event."""
    import sys

    from test_cluster_process import _environment, _write_config, running

    receiver = Receiver(mode="error")
    await receiver.start(nursery)
    config_path = _write_config(
        tmp_path,
        storage={"backend": "sqlite", "path": str(tmp_path / "chat.db")},
        webhooks={"endpoints": [{"url": receiver.url, "secret": SECRET}], "unread_delay_s": 600},
    )
    command = [sys.executable, "-m", "handler", "--config", str(config_path)]
    env = _environment()
    async with running(command, env, tmp_path) as first:
        async with first.server.connect("alice") as alice:
            chat = await alice.create_chat("bob")
            for i in range(5):
                await alice.send_message(chat["chat_id"], "bob", f"m{i}")
        with trio.fail_after(TIMEOUT_S):
            await until(lambda: receiver.attempts >= 6)  # every event tried once, and refused
        first.process.kill()
        with trio.fail_after(5):
            await first.process.wait()
    receiver.mode = "ok"
    async with running(command, env, tmp_path) as second:
        await wait_for(receiver, 6, timeout=20)
        second.process.kill()
    types = sorted(str(r.event["type"]) for r in receiver.received)
    assert types == ["chat.created"] + ["message.created"] * 5


# --------------------------------------------------------------------------- config


def test_the_webhooks_section_is_checked_and_its_secrets_never_shown() -> None:
    from handler.config import parse_config
    from handler.errors import ConfigError

    def parse(webhooks: Any) -> WebhooksConfig:
        raw = {"handler_url": "127.0.0.1:0", "auth": {"dev_tokens": True}, "webhooks": webhooks}
        return parse_config(raw, base_dir=Path("."), environ={}).webhooks

    parsed = parse({"endpoints": [{"url": "http://h/x", "secret": SECRET}], "unread_delay_s": 2})
    assert parsed.endpoints[0].events == frozenset(config_events())
    assert parsed.unread_delay_s == 2
    assert SECRET not in repr(parsed)
    assert not parse({}).enabled
    for bad, key in (
        ({"endpoints": [{"url": "ftp://h", "secret": SECRET}]}, "url"),
        ({"endpoints": [{"url": "http://h", "secret": "short-secret"}]}, "secret"),
        ({"endpoints": [{"url": "http://h", "secret": SECRET, "events": ["x"]}]}, "events"),
        ({"endpoints": [{"url": "http://h", "secret": SECRET, "other": 1}]}, "other"),
        ({"unread_delay_s": 0}, "unread_delay_s"),
    ):
        with pytest.raises(ConfigError) as caught:
            parse(bad)
        assert key in str(caught.value)
        assert "short-secret" not in str(caught.value)
