"""The store contract (`handler.store.base`), checked on every backend.

Each test runs on SQLite and on PostgreSQL (the latter marked `scale`; it skips unless
`CHAT_TEST_DATABASE_URL` is set, and gets a fresh schema). Every store is opened with a
`commits` channel, and the tests read what the store handed to it (`Handed`). PostgreSQL-only
tests at the end cover what only a shared store has: several writers on one chat, concurrent
migrations, and an outage of a throwaway cluster.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import attrs
import psycopg
import pytest
import trio
import trio.lowlevel
from scale_support import ThrowawayPostgres, database_url, free_port, fresh_schema

from handler.config import StorageConfig
from handler.errors import StoreUnavailable
from handler.protocol import Chat, Message
from handler.store import Store, open_store
from handler.store.base import NO_ORIGIN, Committed, Origin
from handler.store.schema import POSTGRES_MIGRATIONS

TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
TIMEOUT_S = 20.0
# More than any test here writes to one store without reading what was handed over: a test
# that wrote more would hold the store's writer (backpressure) and time out, not pass.
COMMITS_CAPACITY = 4096

OpenStore = Callable[[], Awaitable[Store]]


@attrs.define
class Handed:
    """The receive end of the `commits` channel a store was opened with."""

    receive: trio.MemoryReceiveChannel[Committed]

    def drain(self) -> list[Committed]:
        """Everything handed over and not yet read, in the order it was handed over."""
        handed = []
        while True:
            try:
                handed.append(self.receive.receive_nowait())
            except (trio.WouldBlock, trio.EndOfChannel):
                return handed

    def drain_messages(self) -> list[tuple[Message, str | None]]:
        """`drain`, keeping the new messages, each with the id it named as its previous."""
        return [
            (commit.message, commit.previous_id)
            for commit in self.drain()
            if commit.message is not None
        ]


async def open_handing(store: Store, nursery: trio.Nursery) -> Handed:
    """Open `store` with a `commits` channel; returns its receive end."""
    send, receive = trio.open_memory_channel[Committed](COMMITS_CAPACITY)
    await store.open(nursery, send)
    return Handed(receive)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.scale)])
def storage_config(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StorageConfig]:
    if request.param == "sqlite":
        yield StorageConfig(backend="sqlite", path=tmp_path / "chat.db")
        return
    with fresh_schema(database_url()) as dsn:
        yield StorageConfig(backend="postgres", dsn=dsn, pool_size=4)


@pytest.fixture
def handed() -> dict[Store, Handed]:
    """What each store that `opener` opened handed over, by store."""
    return {}


@pytest.fixture
async def opener(
    storage_config: StorageConfig, nursery: trio.Nursery, handed: dict[Store, Handed]
) -> AsyncIterator[OpenStore]:
    """Opens stores on the test's database; several stores stand for several processes."""
    stores: list[Store] = []

    async def open_one() -> Store:
        store = open_store(storage_config)
        handed[store] = await open_handing(store, nursery)
        stores.append(store)
        return store

    yield open_one
    for store in stores:
        await store.aclose()


@pytest.fixture
async def store(opener: OpenStore) -> Store:
    return await opener()


def as_int(identifier: str) -> int:
    return int(identifier)


async def send(
    store: Store,
    chat: Chat,
    sender: str,
    content: str = "hi",
    client_message_id: str | None = None,
) -> Message:
    message, created = await store.add_message(chat, sender, content, client_message_id)
    assert created
    return message


async def pending_marks(
    store: Store, user_id: str, expect_chats: int, expect_messages: int
) -> None:
    """Delivery marks are fire-and-forget: wait (bounded) until the backlog reflects them."""
    with trio.fail_after(TIMEOUT_S):
        while True:
            backlog = await store.backlog(user_id)
            if (len(backlog.chats), len(backlog.message_ids)) == (expect_chats, expect_messages):
                return
            await trio.sleep(0.01)


# --------------------------------------------------------------------------- chats


async def test_create_chat_is_idempotent_and_tracks_delivery(store: Store) -> None:
    chat, created = await store.create_chat("bob", "alice")
    assert created
    assert chat.participants == ("alice", "bob")
    assert chat.created_by == "bob"
    assert TIMESTAMP.match(chat.created_at)

    again, created_again = await store.create_chat("alice", "bob")
    assert not created_again
    assert again == chat
    assert await store.get_chat(chat.chat_id) == chat

    # The creator's copy counts as delivered, the recipient's does not.
    assert (await store.backlog("bob")).chats == ()
    assert (await store.backlog("alice")).chats == (chat,)

    await store.mark_delivered("alice", [chat.chat_id], [])
    await pending_marks(store, "alice", 0, 0)


async def test_concurrent_create_chat_makes_one_chat(
    store: Store, handed: dict[Store, Handed]
) -> None:
    results: list[tuple[Chat, bool]] = []

    async def create(creator: str, recipient: str) -> None:
        results.append(await store.create_chat(creator, recipient))

    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            for index in range(20):
                pair = ("carol", "dave") if index % 2 else ("dave", "carol")
                nursery.start_soon(create, *pair)
    assert len({chat.chat_id for chat, _ in results}) == 1
    assert sum(created for _, created in results) == 1
    # ...and handed over once, as a new chat.
    assert handed[store].drain() == [Committed(results[0][0])]


@pytest.mark.parametrize("chat_id", ["999999", "abc", "", "-1", "1" * 40, "٣"])
async def test_get_chat_of_unknown_or_malformed_id_is_none(store: Store, chat_id: str) -> None:
    await store.create_chat("alice", "bob")
    assert await store.get_chat(chat_id) is None


# --------------------------------------------------------------------------- messages


async def test_add_message_is_acknowledged_after_commit(
    store: Store, opener: OpenStore, handed: dict[Store, Handed]
) -> None:
    origin = Origin("connection-1", "request-1")
    chat, _ = await store.create_chat("alice", "bob", origin)
    assert handed[store].drain() == [Committed(chat, origin)]
    message, created = await store.add_message(chat, "alice", "hello", None, origin)
    assert created
    # It was handed to `commits` (with its origin and the chat as given) before the writer
    # resumed, and a separate store (other connections, as another process would have)
    # already sees the row.
    assert handed[store].drain() == [Committed(chat, origin, message, None)]
    other = await opener()
    page = await other.messages_before(chat.chat_id, None, 10)
    assert page == ((message,), False)
    assert message.sender_id == "alice"
    assert message.recipient_id == "bob"
    assert message.chat_id == chat.chat_id
    assert TIMESTAMP.match(message.timestamp)


async def test_commits_order_is_commit_order_under_concurrency(
    store: Store, handed: dict[Store, Handed]
) -> None:
    chats = [(await store.create_chat("alice", f"peer{i}"))[0] for i in range(5)]
    assert handed[store].drain() == [Committed(chat) for chat in chats]
    committed: list[Message] = []
    returned: list[Message] = []

    async def sender(task: int) -> None:
        for index in range(20):
            chat = chats[(task + index) % len(chats)]
            message, created = await store.add_message(chat, "alice", f"{task}:{index}", None)
            assert created
            # It was handed over before this task resumed (read by this task or another).
            committed.extend(message for message, _ in handed[store].drain_messages())
            assert message in committed
            returned.append(message)

    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            for task in range(10):
                nursery.start_soon(sender, task)
    assert len(committed) == 200
    assert sorted(committed, key=lambda m: m.message_id) == sorted(
        returned, key=lambda m: m.message_id
    )
    # One writer per store: commit order is id order, and the hand-off followed it exactly.
    ids = [as_int(m.message_id) for m in committed]
    assert ids == sorted(ids)


def assert_one_chain(links: list[tuple[Message, str | None]]) -> None:
    """Per chat, each handed-over message named as previous exactly the message committed
    before it (commit order is id order within a chat), and None for the first."""
    by_chat: dict[str, list[tuple[Message, str | None]]] = {}
    for message, previous in links:
        by_chat.setdefault(message.chat_id, []).append((message, previous))
    for chain in by_chat.values():
        chain.sort(key=lambda link: as_int(link[0].message_id))
        expected = [None, *(message.message_id for message, _ in chain[:-1])]
        assert [previous for _, previous in chain] == expected


async def test_commits_name_the_previous_message_of_the_chat(
    store: Store, handed: dict[Store, Handed]
) -> None:
    first, _ = await store.create_chat("alice", "bob")
    second, _ = await store.create_chat("alice", "carol")
    a1, _ = await store.add_message(first, "alice", "a1", "k1")
    b1, _ = await store.add_message(second, "carol", "b1", None)
    a2, _ = await store.add_message(first, "bob", "a2", None)
    await store.add_message(first, "alice", "a1 again", "k1")  # a resend: not handed over
    a3, _ = await store.add_message(first, "alice", "a3", None)
    b2, _ = await store.add_message(second, "alice", "b2", None)
    assert handed[store].drain() == [
        Committed(first),
        Committed(second),
        Committed(first, NO_ORIGIN, a1, None),
        Committed(second, NO_ORIGIN, b1, None),
        Committed(first, NO_ORIGIN, a2, a1.message_id),
        Committed(first, NO_ORIGIN, a3, a2.message_id),
        Committed(second, NO_ORIGIN, b2, b1.message_id),
    ]


async def test_previous_ids_chain_under_concurrency_across_two_stores(
    opener: OpenStore, handed: dict[Store, Handed]
) -> None:
    """Two stores stand for two processes writing the same chats at once."""
    stores = [await opener(), await opener()]
    chats = [(await stores[0].create_chat("alice", f"peer{i}"))[0] for i in range(3)]

    async def sender(task: int) -> None:
        store = stores[task % 2]
        for index in range(12):
            chat = chats[(task + index) % len(chats)]
            sender_id = chat.participants[index % 2]
            await store.add_message(chat, sender_id, f"{task}:{index}", None)

    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            for task in range(8):
                nursery.start_soon(sender, task)
    links = [link for store in stores for link in handed[store].drain_messages()]
    assert len(links) == 8 * 12
    assert_one_chain(links)


async def test_resend_with_client_message_id_is_idempotent(
    store: Store, handed: dict[Store, Handed]
) -> None:
    chat, _ = await store.create_chat("alice", "bob")
    first, created = await store.add_message(chat, "alice", "one", "c-1")
    assert created
    assert first.client_message_id == "c-1"
    again, created_again = await store.add_message(chat, "alice", "changed", "c-1")
    assert not created_again
    assert again == first
    # Not handed over again (so no second fan-out) for a resend.
    assert handed[store].drain() == [Committed(chat), Committed(chat, NO_ORIGIN, first, None)]
    # The key is (sender, chat, client_message_id): another sender may use the same id.
    other, other_created = await store.add_message(chat, "bob", "two", "c-1")
    assert other_created
    assert other.message_id != first.message_id
    page, _ = await store.messages_before(chat.chat_id, None, 10) or ((), False)
    assert [m.content for m in page] == ["one", "two"]


async def test_concurrent_resends_store_one_message(store: Store) -> None:
    chat, _ = await store.create_chat("alice", "bob")
    results: list[tuple[Message, bool]] = []

    async def resend() -> None:
        results.append(await store.add_message(chat, "alice", "same", "dup"))

    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            for _ in range(25):
                nursery.start_soon(resend)
    assert sum(created for _, created in results) == 1
    assert len({message for message, _ in results}) == 1
    page, _ = await store.messages_before(chat.chat_id, None, 100) or ((), False)
    assert len(page) == 1


async def test_ids_and_timestamps_never_go_backwards_in_a_chat(store: Store) -> None:
    chat, _ = await store.create_chat("alice", "bob")
    sent = [await send(store, chat, ("alice", "bob")[i % 2], f"m{i}") for i in range(60)]
    page, has_more = await store.messages_before(chat.chat_id, None, 1000) or ((), True)
    assert not has_more
    assert page == tuple(sent)
    ids = [as_int(m.message_id) for m in page]
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)
    stamps = [m.timestamp for m in page]
    assert stamps == sorted(stamps)  # ISO-8601 with fixed width sorts as time
    assert all(TIMESTAMP.match(stamp) for stamp in stamps)


async def test_group_commit_under_concurrency_loses_nothing(store: Store) -> None:
    chats = [(await store.create_chat(f"u{i}", f"v{i}"))[0] for i in range(8)]
    results: list[Message] = []

    async def sender(task: int) -> None:
        chat = chats[task % len(chats)]
        for index in range(10):
            sender_id = chat.participants[index % 2]
            message, created = await store.add_message(
                chat, sender_id, f"{task}/{index}", f"k{task}-{index}"
            )
            assert created
            results.append(message)

    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            for task in range(50):
                nursery.start_soon(sender, task)
    assert len(results) == 500
    assert len({m.message_id for m in results}) == 500
    stored = 0
    for chat in chats:
        page, has_more = await store.messages_before(chat.chat_id, None, 1000) or ((), True)
        assert not has_more
        stored += len(page)
        ids = [as_int(m.message_id) for m in page]
        assert ids == sorted(ids)
    assert stored == 500
    statistics = getattr(store, "writer_statistics", None)
    if statistics is not None:
        batches, operations = statistics
        assert batches < operations  # writes really were grouped


ODD_CONTENT = [
    "\x00",
    "a\x00b\x00",
    "\x00" * 10,
    "emoji 😀👩‍👩‍👧‍👦🏳️‍🌈",
    "e\u0301 combining, \u200d zwj, \u200b zwsp",
    "\ufeffBOM first",
    "עברית mixed with العربية",
    "\uffff\ufffe\U0010ffff\U0001f600",
    "\r\n\t\x1b[31m\x7f\x85\u2028\u2029",
    "'; DROP TABLE messages; --",
    "\\x00 \\u0000 %s %(name)s {} $1 ?",
    " leading and trailing spaces ",
    "x" * 4096,
    "😀" * 4096,
]


@pytest.mark.parametrize("content", ODD_CONTENT, ids=range(len(ODD_CONTENT)))
async def test_content_round_trips_exactly(store: Store, content: str) -> None:
    chat, _ = await store.create_chat("alice", "bob")
    client_message_id = "id\x00" + content[:20]
    message = await send(store, chat, "alice", content, client_message_id)
    assert message.content == content
    page, _ = await store.messages_before(chat.chat_id, None, 10) or ((), False)
    assert [m.content for m in page] == [content]
    assert [m.client_message_id for m in page] == [client_message_id]
    assert await store.chats_of("bob") == [chat]
    backlog = await store.backlog("bob")
    assert [m.content for _, batch in backlog.messages for m in batch] == [content]
    again, created = await store.add_message(chat, "alice", content, client_message_id)
    assert not created
    assert again == message


# --------------------------------------------------------------------------- history


async def test_messages_before_pages_backwards(store: Store) -> None:
    chat, _ = await store.create_chat("alice", "bob")
    other, _ = await store.create_chat("alice", "carol")
    sent = [await send(store, chat, "alice", f"m{i}") for i in range(25)]
    foreign = await send(store, other, "alice", "elsewhere")

    page, has_more = await store.messages_before(chat.chat_id, None, 10) or ((), False)
    assert page == tuple(sent[15:])
    assert has_more
    page, has_more = await store.messages_before(chat.chat_id, page[0].message_id, 10) or (
        (),
        False,
    )
    assert page == tuple(sent[5:15])
    assert has_more
    page, has_more = await store.messages_before(chat.chat_id, page[0].message_id, 10) or (
        (),
        True,
    )
    assert page == tuple(sent[:5])
    assert not has_more
    assert await store.messages_before(chat.chat_id, sent[0].message_id, 10) == ((), False)
    # A `before` that is not a message of this chat is refused (the hub answers bad_request).
    assert await store.messages_before(chat.chat_id, foreign.message_id, 10) is None
    assert await store.messages_before(chat.chat_id, "nope", 10) is None
    assert await store.messages_before("nope", None, 10) is None
    empty, _ = await store.create_chat("alice", "dave")
    assert await store.messages_before(empty.chat_id, None, 10) == ((), False)


async def test_chats_of_most_recently_active_first(store: Store) -> None:
    quiet, _ = await store.create_chat("alice", "bob")
    busy, _ = await store.create_chat("carol", "alice")
    lonely, _ = await store.create_chat("alice", "dave")
    for i in range(5):
        await send(store, busy, "carol", f"b{i}")
    await send(store, quiet, "bob", "q0")
    await store.create_chat("erin", "frank")  # not alice's
    # quiet had the latest message, then busy; lonely (no message) ranks by its creation.
    assert await store.chats_of("alice") == [quiet, busy, lonely]
    assert await store.chats_of("nobody") == []


async def test_chats_of_orders_activity_within_one_millisecond(store: Store) -> None:
    """Ties in time are broken by which chat was active last, not by chat id."""
    first, _ = await store.create_chat("alice", "bob")
    second, _ = await store.create_chat("alice", "carol")
    # Both messages in one batch: one transaction, the same millisecond on either backend.
    async with trio.open_nursery() as nursery:
        nursery.start_soon(send, store, second, "carol", "older")
        await trio.lowlevel.checkpoint()
        nursery.start_soon(send, store, first, "bob", "newer")
    (older,) = await _page(store, second)
    (newer,) = await _page(store, first)
    assert int(newer.message_id) > int(older.message_id)  # queued last, committed last
    assert await store.chats_of("alice") == [first, second]
    # And for chats created in the same millisecond, without messages.
    a, _ = await store.create_chat("dave", "erin")
    b, _ = await store.create_chat("dave", "frank")
    assert await store.chats_of("dave") == [b, a]


async def _page(store: Store, chat: Chat) -> tuple[Message, ...]:
    page, _ = await store.messages_before(chat.chat_id, None, 10) or ((), False)
    return page


# --------------------------------------------------------------------------- backlog


async def test_backlog_groups_by_chat_in_order_of_oldest_undelivered(store: Store) -> None:
    first, _ = await store.create_chat("alice", "bob")
    second, _ = await store.create_chat("carol", "bob")
    a1 = await send(store, second, "carol", "c1")
    b1 = await send(store, first, "alice", "a1")
    a2 = await send(store, second, "carol", "c2")
    await send(store, first, "bob", "own message")  # never in one's own backlog
    b2 = await send(store, first, "alice", "a2")

    backlog = await store.backlog("bob")
    assert backlog.chats == (first, second)  # oldest first
    assert backlog.messages == (
        (second.chat_id, (a1, a2)),
        (first.chat_id, (b1, b2)),
    )
    assert backlog.message_ids == {a1.message_id, a2.message_id, b1.message_id, b2.message_id}
    assert backlog.chat_ids == {first.chat_id, second.chat_id}

    await store.mark_delivered("bob", [second.chat_id], [a1.message_id, b1.message_id])
    await pending_marks(store, "bob", 1, 2)
    backlog = await store.backlog("bob")
    assert backlog.chats == (first,)
    assert backlog.messages == ((second.chat_id, (a2,)), (first.chat_id, (b2,)))


async def test_mark_delivered_is_per_user_and_idempotent(store: Store) -> None:
    chat, _ = await store.create_chat("alice", "bob")
    to_bob = await send(store, chat, "alice", "for bob")
    to_alice = await send(store, chat, "bob", "for alice")
    # Marking someone else's message, unknown or malformed ids: no effect, no error.
    await store.mark_delivered("alice", [], [to_bob.message_id, "424242", "x", ""])
    await store.mark_delivered("bob", [chat.chat_id], [to_bob.message_id])
    await store.mark_delivered("bob", [chat.chat_id], [to_bob.message_id])
    await pending_marks(store, "bob", 0, 0)
    backlog = await store.backlog("alice")
    assert backlog.messages == ((chat.chat_id, (to_alice,)),)
    await store.mark_delivered("alice", [], [])


# --------------------------------------------------------------------------- lifecycle


async def test_check_answers_while_open(store: Store) -> None:
    await store.check()


async def test_reopen_keeps_data_and_schema(store: Store, opener: OpenStore) -> None:
    chat, _ = await store.create_chat("alice", "bob")
    message = await send(store, chat, "alice", "kept")
    await store.aclose()
    reopened = await opener()
    assert await reopened.get_chat(chat.chat_id) == chat
    assert await reopened.messages_before(chat.chat_id, None, 5) == ((message,), False)


# --------------------------------------------------------------------------- PostgreSQL only


@pytest.fixture
def postgres_config() -> Iterator[StorageConfig]:
    with fresh_schema(database_url()) as dsn:
        yield StorageConfig(backend="postgres", dsn=dsn, pool_size=4)


@pytest.mark.scale
async def test_postgres_writers_in_several_processes_keep_chat_order(
    postgres_config: StorageConfig, nursery: trio.Nursery
) -> None:
    """Three stores = three processes' writers, all on one chat, interleaving batches."""
    stores = [open_store(postgres_config) for _ in range(3)]
    handed = [await open_handing(store, nursery) for store in stores]
    try:
        chat, _ = await stores[0].create_chat("alice", "bob")

        async def writer(index: int, task: int) -> None:
            store = stores[index]
            for n in range(15):
                sender = ("alice", "bob")[(task + n) % 2]
                await store.add_message(chat, sender, f"{index}.{task}.{n}", None)

        with trio.fail_after(TIMEOUT_S * 2):
            async with trio.open_nursery() as writers:
                for index in range(len(stores)):
                    for task in range(8):
                        writers.start_soon(writer, index, task)
        page, _ = await stores[1].messages_before(chat.chat_id, None, 1000) or ((), False)
        assert len(page) == 3 * 8 * 15
        ids = [as_int(m.message_id) for m in page]
        assert ids == sorted(ids)
        stamps = [m.timestamp for m in page]
        assert stamps == sorted(stamps)
        per_store_links = [store_handed.drain_messages() for store_handed in handed]
        committed = [[message for message, _ in links] for links in per_store_links]
        links = [link for links in per_store_links for link in links]
        assert len(links) == len(page)
        for per_store in committed:  # each process handed over in commit (= id) order
            ids = [as_int(m.message_id) for m in per_store]
            assert ids == sorted(ids)
        # ...and each message named the one committed before it, by whichever process.
        assert_one_chain(links)
    finally:
        for store in stores:
            await store.aclose()


@pytest.mark.scale
async def test_postgres_resend_across_processes_stores_once(
    postgres_config: StorageConfig, nursery: trio.Nursery
) -> None:
    stores = [open_store(postgres_config) for _ in range(2)]
    for store in stores:
        await store.open(nursery)
    try:
        chat, _ = await stores[0].create_chat("alice", "bob")
        results: list[tuple[Message, bool]] = []

        async def resend(store: Store) -> None:
            results.append(await store.add_message(chat, "alice", "once", "same-key"))

        with trio.fail_after(TIMEOUT_S):
            async with trio.open_nursery() as senders:
                for index in range(20):
                    senders.start_soon(resend, stores[index % 2])
        assert sum(created for _, created in results) == 1
        assert len({message for message, _ in results}) == 1
    finally:
        for store in stores:
            await store.aclose()


@pytest.mark.scale
async def test_postgres_migrations_are_versioned_and_race_free(
    postgres_config: StorageConfig, nursery: trio.Nursery
) -> None:
    stores = [open_store(postgres_config) for _ in range(4)]
    async with trio.open_nursery() as openers:  # four processes starting at once
        for store in stores:
            openers.start_soon(store.open, nursery)
    for store in stores:
        await store.aclose()
    with psycopg.connect(postgres_config.dsn, autocommit=True) as connection:
        rows = connection.execute("SELECT version FROM schema_version").fetchall()
    assert rows == [(version,) for version in range(1, len(POSTGRES_MIGRATIONS) + 1)]


@pytest.mark.scale
async def test_postgres_upgrade_backfills_the_last_message_of_existing_chats(
    postgres_config: StorageConfig, nursery: trio.Nursery
) -> None:
    """A database written by the first schema version: after the upgrade, the next message of
    an existing chat names the newest old one as its predecessor."""
    with psycopg.connect(postgres_config.dsn, autocommit=True) as connection:
        connection.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        for statement in POSTGRES_MIGRATIONS[0]:
            connection.execute(statement)
        connection.execute("INSERT INTO schema_version (version) VALUES (1)")
        chat_row = connection.execute(
            "INSERT INTO chats (user_a, user_b, created_by, created_at_ms, last_activity_ms)"
            " VALUES ('alice', 'bob', 'alice', 1, 1) RETURNING id"
        ).fetchone()
        assert chat_row is not None
        old_ids = [
            row[0]
            for row in connection.execute(
                "INSERT INTO messages (chat_id, sender_id, recipient_id, content, created_at_ms)"
                " SELECT %s, 'alice', 'bob', 'old', 2 FROM generate_series(1, 3) RETURNING id",
                (chat_row[0],),
            ).fetchall()
        ]
    store = open_store(postgres_config)
    handed = await open_handing(store, nursery)
    try:
        chat = await store.get_chat(str(chat_row[0]))
        assert chat is not None
        await store.add_message(chat, "bob", "new", None)
        links = handed.drain_messages()
        assert [previous for _, previous in links] == [str(max(old_ids))]
    finally:
        await store.aclose()


@pytest.mark.scale
async def test_postgres_one_bad_write_does_not_fail_its_batch(
    postgres_config: StorageConfig, nursery: trio.Nursery
) -> None:
    store = open_store(postgres_config)
    await store.open(nursery)
    try:
        chat, _ = await store.create_chat("alice", "bob")
        good: list[Message] = []
        failures: list[BaseException] = []

        async def good_write(index: int) -> None:
            good.append(await send(store, chat, "alice", f"ok {index}"))

        async def bad_write() -> None:
            try:
                await store.create_chat("nul\x00user", "bob")  # text cannot hold U+0000
            except StoreUnavailable as error:
                failures.append(error)

        with trio.fail_after(TIMEOUT_S):
            async with trio.open_nursery() as writers:  # all queued into one batch
                for index in range(10):
                    writers.start_soon(good_write, index)
                writers.start_soon(bad_write)
        assert len(failures) == 1
        assert len(good) == 10
        page, _ = await store.messages_before(chat.chat_id, None, 100) or ((), False)
        assert sorted(m.message_id for m in page) == sorted(m.message_id for m in good)
    finally:
        await store.aclose()


@pytest.mark.scale
async def test_postgres_flush_reports_a_delivery_mark_that_failed(
    postgres_config: StorageConfig, nursery: trio.Nursery
) -> None:
    """Marks are queued without a waiter; the hub learns from `flush` whether they were
    committed, and keeps them for a retry if not."""
    store = open_store(postgres_config)
    await store.open(nursery)
    try:
        chat, _ = await store.create_chat("alice", "bob")
        await store.mark_delivered("nul\x00user", [chat.chat_id], [])  # text cannot hold NUL
        with pytest.raises(StoreUnavailable):
            await store.flush()
        await store.mark_delivered("bob", [chat.chat_id], [])
        await store.flush()  # nothing failed since
        assert (await store.backlog("bob")).chats == ()
    finally:
        await store.aclose()


@pytest.mark.scale
@pytest.mark.slow
async def test_postgres_outage_fails_fast_then_recovers_without_losing_acks(
    nursery: trio.Nursery,
) -> None:
    server = ThrowawayPostgres()
    try:
        with trio.fail_after(60):
            await server.start()
            store = open_store(StorageConfig(backend="postgres", dsn=server.dsn, pool_size=2))
            await store.open(nursery)
            chat, _ = await store.create_chat("alice", "bob")
            acked = [await send(store, chat, "alice", f"before {i}") for i in range(20)]

            await server.stop()  # like a crash
            with pytest.raises(StoreUnavailable):
                await store.add_message(chat, "alice", "during", None)
            with pytest.raises(StoreUnavailable):
                await store.messages_before(chat.chat_id, None, 10)
            with pytest.raises(StoreUnavailable):
                await store.check()
            with pytest.raises(StoreUnavailable):
                await store.create_chat("alice", "carol")
            await store.mark_delivered("bob", [chat.chat_id], [])  # dropped, never raises

            await server.start()
            # The same store reconnects by itself once its backoff window has passed.
            with trio.fail_after(15):
                while True:
                    try:
                        await store.check()
                        after = await store.add_message(chat, "alice", "after", None)
                        break
                    except StoreUnavailable:
                        await trio.sleep(0.1)
            page, _ = await store.messages_before(chat.chat_id, None, 100) or ((), False)
            assert page == (*acked, after[0])
            await store.aclose()
    finally:
        server.close()


async def test_postgres_unreachable_at_open_raises_store_unavailable(
    nursery: trio.Nursery,
) -> None:
    dsn = f"postgresql://postgres@127.0.0.1:{free_port()}/postgres"
    store = open_store(StorageConfig(backend="postgres", dsn=dsn))
    with pytest.raises(StoreUnavailable):
        await store.open(nursery)


@pytest.mark.scale
@pytest.mark.slow
@pytest.mark.parametrize("senders", [1, 16, 64])
async def test_postgres_group_commit_throughput(
    postgres_config: StorageConfig,
    nursery: trio.Nursery,
    senders: int,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Measures rows/s of group commit against one commit per message, on one writer and on
    eight (as a per-request connection pool would); prints the numbers for docs/design.md.

    Only the structure is asserted (batches form under concurrency), not the timings.
    """
    from handler.store.postgres import PostgresStore

    total = 1000 if senders == 1 else 3200
    results: dict[str, float] = {}
    for name, writers, max_batch in (
        ("one commit per message, 1 writer", 1, 1),
        ("one commit per message, 8 writers", 8, 1),
        ("group commit, 1 writer", 1, 512),
    ):
        stores = [PostgresStore(postgres_config, max_batch=max_batch) for _ in range(writers)]
        for store in stores:
            await store.open(nursery)
        chats = [(await stores[0].create_chat("bench", f"peer{i}"))[0] for i in range(16)]

        async def sender(
            task: int, stores: list[PostgresStore] = stores, chats: list[Chat] = chats
        ) -> None:
            for index in range(total // senders):
                store = stores[(task + index) % len(stores)]
                chat = chats[(task + index) % len(chats)]
                await store.add_message(chat, "bench", f"message {task}/{index} " * 4, None)

        started = trio.current_time()
        async with trio.open_nursery() as load:
            for task in range(senders):
                load.start_soon(sender, task)
        elapsed = trio.current_time() - started
        results[name] = total / elapsed
        batches, operations = stores[0].writer_statistics
        if max_batch > 1 and senders >= 16:
            assert operations / batches >= 4
        for store in stores:
            await store.aclose()
    with capsys.disabled():
        for name, rate in results.items():
            print(f"\n{senders:3d} senders  {name:36s} {rate:8.0f} messages/s", end="")
        print()


# --------------------------------------------------------------------------- upgrades

# A database as the first schema version wrote it: three chats whose activity times tie, one
# message each way, bob's chat and one message delivered to him, one not.
_V1_ROWS = (
    "INSERT INTO chats (id, user_a, user_b, created_by, created_at_ms, last_message_ms,"
    " last_activity_ms, a_delivered, b_delivered) VALUES"
    " (1, 'alice', 'bob', 'alice', 1000, 2000, 2000, 1, 1),"
    " (2, 'alice', 'carol', 'alice', 1000, 0, 1500, 1, 0),"
    " (3, 'alice', 'dave', 'dave', 1000, 0, 2000, 0, 1)",
    "INSERT INTO messages (id, chat_id, sender_id, recipient_id, content, created_at_ms,"
    " client_message_id, delivered) VALUES"
    " (1, 1, 'alice', 'bob', 'seen', 1900, 'c1', 1),"
    " (2, 1, 'alice', 'bob', 'unseen', 2000, NULL, 0)",
)

# The same rows in PostgreSQL's types (BOOLEAN flags, BYTEA text).
_V1_ROWS_POSTGRES = (  # a fresh schema: the identity columns give ids 1, 2, 3 as above
    "INSERT INTO chats (user_a, user_b, created_by, created_at_ms, last_message_ms,"
    " last_activity_ms, a_delivered, b_delivered) VALUES"
    " ('alice', 'bob', 'alice', 1000, 2000, 2000, true, true),"
    " ('alice', 'carol', 'alice', 1000, 0, 1500, true, false),"
    " ('alice', 'dave', 'dave', 1000, 0, 2000, false, true)",
    "INSERT INTO messages (chat_id, sender_id, recipient_id, content, created_at_ms,"
    " client_message_id, delivered) VALUES"
    " (1, 'alice', 'bob', 'seen'::bytea, 1900, 'c1'::bytea, true),"
    " (1, 'alice', 'bob', 'unseen'::bytea, 2000, NULL, false)",
)


def _write_v1_sqlite(path: Path) -> None:
    import sqlite3

    from handler.store.schema import SQLITE_MIGRATIONS

    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        for statement in (*SQLITE_MIGRATIONS[0], *_V1_ROWS):
            db.execute(statement)
        db.execute("INSERT INTO schema_version (version) VALUES (1)")
    finally:
        db.close()


async def _check_upgraded(store: Store) -> None:
    """Every chat, message and delivery state survived; the order of activity too (ties by
    id, as before), and new activity goes to the top."""
    alice = await store.chats_of("alice")
    assert [chat.chat_id for chat in alice] == ["3", "1", "2"]
    page = await _page(store, alice[1])
    assert [(m.message_id, m.content, m.client_message_id) for m in page] == [
        ("1", "seen", "c1"),
        ("2", "unseen", None),
    ]
    bob = await store.backlog("bob")
    assert bob.chats == ()
    assert [[m.message_id for m in batch] for _, batch in bob.messages] == [["2"]]
    assert [chat.chat_id for chat in (await store.backlog("carol")).chats] == ["2"]
    assert (await store.backlog("dave")).chats == ()
    assert [chat.chat_id for chat in (await store.backlog("alice")).chats] == ["3"]
    await send(store, alice[2], "carol", "new")
    assert [chat.chat_id for chat in await store.chats_of("alice")] == ["2", "3", "1"]


async def test_sqlite_upgrade_keeps_chats_messages_and_delivery(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    config = StorageConfig(backend="sqlite", path=tmp_path / "old.db")
    _write_v1_sqlite(config.path)
    store = open_store(config)
    await store.open(nursery)
    try:
        await _check_upgraded(store)
    finally:
        await store.aclose()


@pytest.mark.scale
async def test_postgres_upgrade_keeps_chats_messages_and_delivery(
    postgres_config: StorageConfig, nursery: trio.Nursery
) -> None:
    with psycopg.connect(postgres_config.dsn, autocommit=True) as connection:
        connection.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        for statement in POSTGRES_MIGRATIONS[0]:
            connection.execute(statement)
        for statement in _V1_ROWS_POSTGRES:
            connection.execute(statement)
        connection.execute("INSERT INTO schema_version (version) VALUES (1)")
    store = open_store(postgres_config)
    await store.open(nursery)
    try:
        await _check_upgraded(store)
    finally:
        await store.aclose()
