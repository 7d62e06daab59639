"""The store contract (`handler.store.base`), checked on every backend.

Each test runs on SQLite and on PostgreSQL (the latter marked `scale`; it skips unless
`CHAT_TEST_DATABASE_URL` is set, and gets a fresh schema). Every store is opened with a
`commits` channel, and the tests read what the store handed to it (`Handed`). Delivery marks
are queued, not awaited: a test either waits for their commit with `flush` (`deliver`) or
polls until the backlog shows them (`pending_marks`). Writes that must share one transaction
are queued while the writer is held (`in_one_batch`). PostgreSQL-only tests at the end cover
what only a shared store has: several writers on one chat, concurrent migrations, and an
outage of a throwaway cluster; the upgrade tests build the released schemas and open them.
"""

from __future__ import annotations

import contextlib
import re
import sqlite3
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import psycopg
import pytest
import trio
import trio.lowlevel
import trio.testing
from scale_support import ThrowawayPostgres, database_url, free_port, fresh_schema

from handler.config import StorageConfig
from handler.errors import ErrorCode, ProtocolError, StoreUnavailable
from handler.protocol import Chat, ChatView, Message, ReceiptFrame
from handler.session.outgoing import SeqMark
from handler.store import Store, open_store
from handler.store.base import NO_ORIGIN, Committed, Origin
from handler.store.schema import POSTGRES_MIGRATIONS, SQLITE_MIGRATIONS
from handler.store.sql_store import SQLStore
from handler.timefmt import format_ms

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

    def drain_messages(self) -> list[Message]:
        """`drain`, keeping the new messages (not the edits and deletes)."""
        return [
            commit.message
            for commit in self.drain()
            if commit.message is not None and not commit.update
        ]

    def drain_changes(self) -> list[tuple[Message, bool]]:
        """`drain`, keeping what carries a message: each new, edited or deleted message with
        whether it was handed over as an update (an edit or a delete)."""
        return [
            (commit.message, commit.update) for commit in self.drain() if commit.message is not None
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


async def new_chat(store: Store, creator: str, recipient: str) -> Chat:
    chat, _ = await store.create_chat(creator, recipient)
    return chat


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


async def deliver(
    store: Store, user_id: str, *marks: SeqMark, chat_ids: Sequence[str] = ()
) -> None:
    """Record deliveries to `user_id` and wait for their commit (`flush`)."""
    await store.mark_delivered(user_id, list(chat_ids), list(marks))
    await store.flush()


def live(message: Message, version: int = 0) -> SeqMark:
    """The mark of a live `message` frame (it continues the mark only from just below)."""
    return SeqMark(message.chat_id, message.seq, message.message_id, version)


def page_of(*messages: Message, version: int = 0) -> SeqMark:
    """The mark of one frame carrying `messages` (oldest first), as a binding writes it."""
    first, last = messages[0], messages[-1]
    return SeqMark(first.chat_id, last.seq, last.message_id, version, first=first.seq)


def moved_marks(commits: Sequence[Committed]) -> list[tuple[Chat, str, str, int, str | None]]:
    """`commits`, which must all be moved marks, as (chat, user, kind, seq, message id); their
    time is checked to be a timestamp, their `request_id` unset."""
    moved = []
    for commit in commits:
        receipt = commit.receipt
        assert receipt is not None, commit
        assert commit.message is None
        assert not commit.update
        assert receipt.chat_id == commit.chat.chat_id
        assert receipt.request_id is None
        assert TIMESTAMP.match(receipt.timestamp)
        moved.append((commit.chat, receipt.user_id, receipt.kind, receipt.seq, receipt.message_id))
    return moved


async def view_of(store: Store, user_id: str, chat: Chat) -> ChatView:
    """The user's chat object of `chat`, as `chats_of` lists it and `chat_view` reads it."""
    views = [view for view in await store.chats_of(user_id) if view.chat_id == chat.chat_id]
    assert len(views) == 1, views
    assert await store.chat_view(chat.chat_id, user_id) == views[0]
    return views[0]


def expected_view(
    chat: Chat,
    last: Message | None,
    unread: int,
    read: Mapping[str, int],
    delivered: Mapping[str, int],
) -> ChatView:
    """A chat object with its marks given per participant (in participant order)."""
    return ChatView(
        chat,
        last,
        unread,
        tuple((user, read[user]) for user in chat.participants),
        tuple((user, delivered[user]) for user in chat.participants),
    )


async def all_messages(store: Store, chat: Chat) -> tuple[Message, ...]:
    page, has_more = await store.messages_before(chat.chat_id, None, 1000) or ((), True)
    assert not has_more
    return page


@contextlib.contextmanager
def refused(code: ErrorCode, field: str | None = None) -> Iterator[None]:
    """Expect a `ProtocolError` with `code` (and `field`, when given)."""
    with pytest.raises(ProtocolError) as caught:
        yield
    assert caught.value.code == code
    if field is not None:
        assert caught.value.field == field


class HeldWriter:
    """The writer's `after_commit` test hook: holds its thread after a batch until
    `release()`, so what is queued meanwhile is committed as one batch."""

    def __init__(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._released = threading.Event()
        self.held = trio.Event()

    def __call__(self) -> None:  # in the writer's thread
        if not self._released.is_set():
            self._token.run_sync_soon(self.held.set)
            self._released.wait(TIMEOUT_S)  # never longer: a failing test cannot hang here

    def release(self) -> None:
        self._released.set()


async def in_one_batch(store: Store, *writes: Callable[[], Awaitable[Any]]) -> list[Any]:
    """Run `writes`, queued in this order, as one batch of the store's writer (one
    transaction); their results, or the `ProtocolError` each raised."""
    assert isinstance(store, SQLStore)
    hold = HeldWriter()
    store.writer.after_commit = hold
    results: list[Any] = [None] * len(writes)

    async def run(index: int, write: Callable[[], Awaitable[Any]]) -> None:
        try:
            results[index] = await write()
        except ProtocolError as error:
            results[index] = error

    try:
        with trio.fail_after(TIMEOUT_S):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(store.flush)  # the batch the writer is held after
                await hold.held.wait()
                for index, write in enumerate(writes):
                    nursery.start_soon(run, index, write)
                    await trio.testing.wait_all_tasks_blocked()  # queued before the next
                hold.release()
    finally:
        hold.release()
        store.writer.after_commit = None
    return results


def assert_versions_chain(
    per_store: Sequence[Sequence[Message]], after: Mapping[str, int] | None = None
) -> None:
    """What stores handed over carries each chat's versions exactly once, from the one after
    `after` (0 by default) without a gap, and each store handed them over in version order."""
    by_chat: dict[str, list[int]] = {}
    for handed in per_store:
        newest: dict[str, int] = {}
        for message in handed:
            assert message.version > newest.get(message.chat_id, 0), message
            newest[message.chat_id] = message.version
            by_chat.setdefault(message.chat_id, []).append(message.version)
    for chat_id, versions in by_chat.items():
        start = (after or {}).get(chat_id, 0)
        assert sorted(versions) == list(range(start + 1, start + len(versions) + 1)), chat_id


# --------------------------------------------------------------------------- chats


async def test_create_chat_is_idempotent_and_tracks_delivery(store: Store) -> None:
    chat, created = await store.create_chat("bob", "alice")
    assert created
    assert chat.participants == ("alice", "bob")
    assert chat.created_by == "bob"
    assert (chat.kind, chat.title) == ("direct", None)
    assert TIMESTAMP.match(chat.created_at)
    assert await store.chat_view(chat.chat_id, "bob") == ChatView.fresh(chat)

    again, created_again = await store.create_chat("alice", "bob")
    assert not created_again
    assert again == chat
    assert await store.get_chat(chat.chat_id) == chat
    assert await store.chat_view(chat.chat_id, "alice") == ChatView.fresh(chat)

    # The creator's copy counts as delivered, the recipient's does not.
    assert (await store.backlog("bob")).chats == ()
    assert (await store.backlog("alice")).chats == (ChatView.fresh(chat),)

    await store.mark_delivered("alice", [chat.chat_id], [])
    await pending_marks(store, "alice", 0, 0)

    # Found again later: the same chat; its chat object is as it is now.
    message = await send(store, chat, "alice", "hello")
    assert await store.create_chat("bob", "alice") == (chat, False)
    marks = {"alice": 1, "bob": 0}
    assert await view_of(store, "bob", chat) == expected_view(chat, message, 1, marks, marks)
    assert await store.chat_view(chat.chat_id, "carol") is None  # not a member
    assert await store.chat_view("nope", "bob") is None
    assert await store.chat_view("999999", "bob") is None


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
    chat = results[0][0]
    assert all(found == chat for found, _ in results)
    # ...and handed over once, as a new chat.
    assert handed[store].drain() == [Committed(chat)]


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
    assert handed[store].drain() == [Committed(chat, origin, message)]
    other = await opener()
    page = await other.messages_before(chat.chat_id, None, 10)
    assert page == ((message,), False)
    assert message.sender_id == "alice"
    assert message.recipient_id == "bob"
    assert message.chat_id == chat.chat_id
    assert TIMESTAMP.match(message.timestamp)
    assert (message.seq, message.version, message.edited_at, message.deleted) == (1, 1, None, False)


async def test_commits_order_is_commit_order_under_concurrency(
    store: Store, handed: dict[Store, Handed]
) -> None:
    chats = [await new_chat(store, "alice", f"peer{i}") for i in range(5)]
    assert handed[store].drain() == [Committed(chat) for chat in chats]
    committed: list[Message] = []
    returned: list[Message] = []

    async def sender(task: int) -> None:
        for index in range(20):
            chat = chats[(task + index) % len(chats)]
            message, created = await store.add_message(chat, "alice", f"{task}:{index}", None)
            assert created
            # It was handed over before this task resumed (read by this task or another).
            committed.extend(handed[store].drain_messages())
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
    # One writer per store: commit order is id order, and the hand-off followed it exactly;
    # per chat, seq and version follow it too.
    ids = [as_int(m.message_id) for m in committed]
    assert ids == sorted(ids)
    for chat in chats:
        mine = [m for m in committed if m.chat_id == chat.chat_id]
        assert [m.seq for m in mine] == list(range(1, 41))
        assert [m.version for m in mine] == list(range(1, 41))


async def test_commits_carry_each_chats_next_version(
    store: Store, handed: dict[Store, Handed]
) -> None:
    first = await new_chat(store, "alice", "bob")
    second = await new_chat(store, "alice", "carol")
    a1, _ = await store.add_message(first, "alice", "a1", "k1")
    b1, _ = await store.add_message(second, "carol", "b1", None)
    a2, _ = await store.add_message(first, "bob", "a2", None)
    await store.add_message(first, "alice", "a1 again", "k1")  # a resend: not handed over
    a1_edited = await store.edit_message(first, "alice", a1.message_id, "a1, edited")
    a3, _ = await store.add_message(first, "alice", "a3", None)
    b2, _ = await store.add_message(second, "alice", "b2", None)
    assert handed[store].drain() == [
        Committed(first),
        Committed(second),
        Committed(first, NO_ORIGIN, a1),
        Committed(second, NO_ORIGIN, b1),
        Committed(first, NO_ORIGIN, a2),
        Committed(first, NO_ORIGIN, a1_edited, update=True),
        Committed(first, NO_ORIGIN, a3),
        Committed(second, NO_ORIGIN, b2),
    ]
    # A new message takes the chat's next seq and version; an edit only the next version.
    assert [(m.seq, m.version) for m in (a1, a2, a1_edited, a3)] == [(1, 1), (2, 2), (1, 3), (3, 4)]
    assert [(m.seq, m.version) for m in (b1, b2)] == [(1, 1), (2, 2)]


async def test_versions_chain_under_concurrency_across_two_stores(
    opener: OpenStore, handed: dict[Store, Handed]
) -> None:
    """Two stores stand for two processes writing the same chats at once."""
    stores = [await opener(), await opener()]
    chats = [await new_chat(stores[0], "alice", f"peer{i}") for i in range(3)]

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
    per_store = [handed[store].drain_messages() for store in stores]
    assert sum(len(messages) for messages in per_store) == 8 * 12
    assert_versions_chain(per_store)
    for chat in chats:
        page = await all_messages(stores[1], chat)
        assert [m.seq for m in page] == list(range(1, len(page) + 1))
        assert sorted(
            (m for ms in per_store for m in ms if m.chat_id == chat.chat_id), key=lambda m: m.seq
        ) == list(page)


async def test_seq_is_gapless_and_agrees_with_ids_and_timestamps(
    storage_config: StorageConfig, opener: OpenStore, handed: dict[Store, Handed]
) -> None:
    """20 concurrent senders in one chat, through two stores (two processes) on PostgreSQL
    and one on SQLite; then 20 concurrent edits and deletes of their messages."""
    stores = [await opener() for _ in range(2 if storage_config.backend == "postgres" else 1)]
    chat = await new_chat(stores[0], "alice", "bob")
    handed[stores[0]].drain()
    returned: list[Message] = []

    async def sender(task: int) -> None:
        store = stores[task % len(stores)]
        for n in range(10):
            sender_id = chat.participants[(task + n) % 2]
            returned.append(await send(store, chat, sender_id, f"{task}.{n}"))

    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            for task in range(20):
                nursery.start_soon(sender, task)
    total = len(returned)
    assert total == 200
    page = await all_messages(stores[-1], chat)
    assert list(page) == sorted(returned, key=lambda m: m.seq)
    assert [m.seq for m in page] == list(range(1, total + 1))
    ids = [as_int(m.message_id) for m in page]
    assert ids == sorted(ids)
    assert len(set(ids)) == total
    stamps = [m.timestamp for m in page]
    assert stamps == sorted(stamps)
    assert [m.version for m in page] == list(range(1, total + 1))  # nothing changed yet
    per_store = [handed[store].drain_changes() for store in stores]
    assert all(not update for changes in per_store for _, update in changes)
    assert_versions_chain([[m for m, _ in changes] for changes in per_store])
    assert sorted((m for changes in per_store for m, _ in changes), key=lambda m: m.seq) == list(
        page
    )

    changed: list[Message] = []

    async def changer(task: int) -> None:
        store = stores[task % len(stores)]
        target = page[task * 7]
        if task % 3:
            content = f"edit {task}"
            changed.append(
                await store.edit_message(chat, target.sender_id, target.message_id, content)
            )
        else:
            tombstone, was_changed = await store.delete_message(
                chat, target.sender_id, target.message_id
            )
            assert was_changed
            changed.append(tombstone)

    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            for task in range(20):
                nursery.start_soon(changer, task)
    assert sorted(m.version for m in changed) == list(range(total + 1, total + 21))
    per_store = [handed[store].drain_changes() for store in stores]
    assert all(update for changes in per_store for _, update in changes)
    assert_versions_chain([[m for m, _ in changes] for changes in per_store], {chat.chat_id: total})
    assert sorted((m for changes in per_store for m, _ in changes), key=lambda m: m.seq) == sorted(
        changed, key=lambda m: m.seq
    )
    # Changes keep every message's seq, id and timestamp.
    by_id = {m.message_id: m for m in changed}
    final = await all_messages(stores[0], chat)
    assert list(final) == [by_id.get(m.message_id, m) for m in page]
    assert all(
        (c.seq, c.timestamp) == (m.seq, m.timestamp)
        for m in page
        if (c := by_id.get(m.message_id)) is not None
    )


async def test_resend_with_client_message_id_is_idempotent(
    store: Store, handed: dict[Store, Handed]
) -> None:
    chat = await new_chat(store, "alice", "bob")
    first, created = await store.add_message(chat, "alice", "one", "c-1")
    assert created
    assert first.client_message_id == "c-1"
    again, created_again = await store.add_message(chat, "alice", "changed", "c-1")
    assert not created_again
    assert again == first
    # Not handed over again (so no second fan-out) for a resend, nor given a seq or version.
    assert handed[store].drain() == [Committed(chat), Committed(chat, NO_ORIGIN, first)]
    # The key is (sender, chat, client_message_id): another sender may use the same id.
    other, other_created = await store.add_message(chat, "bob", "two", "c-1")
    assert other_created
    assert other.message_id != first.message_id
    assert (other.seq, other.version) == (2, 2)
    page, _ = await store.messages_before(chat.chat_id, None, 10) or ((), False)
    assert [m.content for m in page] == ["one", "two"]


async def test_concurrent_resends_store_one_message(store: Store) -> None:
    chat = await new_chat(store, "alice", "bob")
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
    assert page[0].seq == 1


async def test_ids_and_timestamps_never_go_backwards_in_a_chat(store: Store) -> None:
    chat = await new_chat(store, "alice", "bob")
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
    assert [m.seq for m in page] == list(range(1, 61))


async def test_group_commit_under_concurrency_loses_nothing(store: Store) -> None:
    chats = [await new_chat(store, f"u{i}", f"v{i}") for i in range(8)]
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
        assert [m.seq for m in page] == list(range(1, len(page) + 1))
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
    chat = await new_chat(store, "alice", "bob")
    client_message_id = "id\x00" + content[:20]
    message = await send(store, chat, "alice", content, client_message_id)
    assert message.content == content
    page, _ = await store.messages_before(chat.chat_id, None, 10) or ((), False)
    assert [m.content for m in page] == [content]
    assert [m.client_message_id for m in page] == [client_message_id]
    views = await store.chats_of("bob")
    assert [view.chat for view in views] == [chat]
    assert views[0].last_message == message
    backlog = await store.backlog("bob")
    assert [m.content for _, batch in backlog.messages for m in batch] == [content]
    again, created = await store.add_message(chat, "alice", content, client_message_id)
    assert not created
    assert again == message
    # An edit stores its content exactly too.
    edited_content = content[::-1] + "\x00"
    edited = await store.edit_message(chat, "alice", message.message_id, edited_content)
    assert edited.content == edited_content
    page, _ = await store.messages_before(chat.chat_id, None, 10) or ((), False)
    assert page == (edited,)
    backlog = await store.backlog("bob")
    assert [m.content for _, batch in backlog.messages for m in batch] == [edited_content]


# --------------------------------------------------------------------------- history


async def test_messages_before_pages_backwards(store: Store) -> None:
    chat = await new_chat(store, "alice", "bob")
    other = await new_chat(store, "alice", "carol")
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
    empty = await new_chat(store, "alice", "dave")
    assert await store.messages_before(empty.chat_id, None, 10) == ((), False)


async def test_chats_of_most_recently_active_first(store: Store) -> None:
    quiet = await new_chat(store, "alice", "bob")
    busy = await new_chat(store, "carol", "alice")
    lonely = await new_chat(store, "alice", "dave")
    for i in range(5):
        await send(store, busy, "carol", f"b{i}")
    await send(store, quiet, "bob", "q0")
    await store.create_chat("erin", "frank")  # not alice's
    # quiet had the latest message, then busy; lonely (no message) ranks by its creation.
    assert [view.chat for view in await store.chats_of("alice")] == [quiet, busy, lonely]
    assert await store.chats_of("nobody") == []


async def test_chats_of_orders_activity_within_one_millisecond(store: Store) -> None:
    """Ties in time are broken by which chat was active last, not by chat id."""
    first = await new_chat(store, "alice", "bob")
    second = await new_chat(store, "alice", "carol")
    # Both messages in one batch: one transaction, the same millisecond on either backend.
    async with trio.open_nursery() as nursery:
        nursery.start_soon(send, store, second, "carol", "older")
        await trio.lowlevel.checkpoint()
        nursery.start_soon(send, store, first, "bob", "newer")
    (older,) = await _page(store, second)
    (newer,) = await _page(store, first)
    assert int(newer.message_id) > int(older.message_id)  # queued last, committed last
    assert [view.chat for view in await store.chats_of("alice")] == [first, second]
    # And for chats created in the same millisecond, without messages.
    a = await new_chat(store, "dave", "erin")
    b = await new_chat(store, "dave", "frank")
    assert [view.chat for view in await store.chats_of("dave")] == [b, a]


async def _page(store: Store, chat: Chat) -> tuple[Message, ...]:
    page, _ = await store.messages_before(chat.chat_id, None, 10) or ((), False)
    return page


# --------------------------------------------------------------------------- backlog


async def test_backlog_groups_by_chat_in_order_of_oldest_undelivered(store: Store) -> None:
    first = await new_chat(store, "alice", "bob")
    second = await new_chat(store, "carol", "bob")
    a1 = await send(store, second, "carol", "c1")
    b1 = await send(store, first, "alice", "a1")
    a2 = await send(store, second, "carol", "c2")
    await send(store, first, "bob", "own message")  # never in one's own backlog
    b2 = await send(store, first, "alice", "a2")

    backlog = await store.backlog("bob")
    views = {view.chat_id: view for view in await store.chats_of("bob")}
    assert backlog.chats == (views[first.chat_id], views[second.chat_id])  # oldest first
    assert backlog.messages == (
        (second.chat_id, (a1, a2)),
        (first.chat_id, (b1, b2)),
    )
    assert backlog.updates == ()
    assert backlog.message_ids == {a1.message_id, a2.message_id, b1.message_id, b2.message_id}
    assert backlog.chat_ids == {first.chat_id, second.chat_id}
    assert backlog.high_water == {first.chat_id: (3, 3), second.chat_id: (2, 2)}

    await store.mark_delivered("bob", [second.chat_id], [live(a1), live(b1)])
    await pending_marks(store, "bob", 1, 2)
    backlog = await store.backlog("bob")
    assert [view.chat for view in backlog.chats] == [first]
    assert backlog.messages == ((second.chat_id, (a2,)), (first.chat_id, (b2,)))
    plan = await store.backlog_plan("bob")
    # (In the first chat the mark went on over bob's own message right after a1.)
    assert plan.message_chats == ((second.chat_id, 1), (first.chat_id, 2))
    assert plan.chat_ids == {first.chat_id}
    # The reads a binding makes of it, bounded by the snapshot's seq.
    assert await store.undelivered("bob", first.chat_id, 0, 3) == (b1, b2)
    assert await store.undelivered("bob", first.chat_id, 0, 2) == (b1,)
    assert await store.undelivered("bob", first.chat_id, 1, 3) == (b2,)
    assert await store.undelivered("bob", "nope", 0, 3) == ()


async def test_mark_delivered_is_per_user_and_idempotent(
    store: Store, handed: dict[Store, Handed]
) -> None:
    chat = await new_chat(store, "alice", "bob")
    to_bob = await send(store, chat, "alice", "for bob")
    to_alice = await send(store, chat, "bob", "for alice")
    handed[store].drain()
    # A mark the user has already, marks of unknown or malformed chat ids, marks by someone
    # who is not a member: no effect, no error.
    await store.mark_delivered(
        "alice", [], [live(to_bob), SeqMark("424242", 5, "9"), SeqMark("x", 1), SeqMark("", 1)]
    )
    await store.mark_delivered("carol", [chat.chat_id], [live(to_alice)])
    await store.mark_delivered("bob", [chat.chat_id], [live(to_bob)])
    await store.mark_delivered("bob", [chat.chat_id], [live(to_bob)])
    await pending_marks(store, "bob", 0, 0)
    backlog = await store.backlog("alice")
    assert backlog.messages == ((chat.chat_id, (to_alice,)),)
    await store.mark_delivered("alice", [], [])
    await store.flush()
    # Bob's mark moved once: one receipt, for where it ended (over his own message right after
    # the one he got: one's own messages count as delivered); nobody else's moved.
    assert moved_marks(handed[store].drain()) == [
        (chat, "bob", "delivered", 2, to_alice.message_id)
    ]
    read, delivered = {"alice": 1, "bob": 2}, {"alice": 1, "bob": 2}
    assert await view_of(store, "alice", chat) == expected_view(chat, to_alice, 1, read, delivered)
    assert await view_of(store, "bob", chat) == expected_view(chat, to_alice, 0, read, delivered)
    assert await store.chats_of("carol") == []


async def test_a_queued_mark_takes_effect_before_a_later_acknowledged_write(
    store: Store,
) -> None:
    chat = await new_chat(store, "alice", "bob")
    message = await send(store, chat, "alice", "for bob")
    await store.mark_delivered("bob", [chat.chat_id], [live(message)])  # queued, not awaited
    after = await send(store, chat, "alice", "next")  # acknowledged after the mark was queued
    backlog = await store.backlog("bob")
    assert backlog.chats == ()
    assert backlog.messages == ((chat.chat_id, (after,)),)


# --------------------------------------------------------------------------- delivery marks


async def test_mark_delivered_moves_up_only_and_hands_over_a_receipt_when_it_moves(
    store: Store, handed: dict[Store, Handed]
) -> None:
    chat = await new_chat(store, "alice", "bob")
    m1, m2, m3 = [await send(store, chat, "alice", f"m{i}") for i in (1, 2, 3)]
    handed[store].drain()

    await deliver(store, "bob", page_of(m1, m2, m3))
    assert moved_marks(handed[store].drain()) == [(chat, "bob", "delivered", 3, m3.message_id)]
    # Lower marks, and the same mark again, move nothing and hand nothing over.
    await deliver(store, "bob", live(m1))
    await deliver(store, "bob", page_of(m1, m2))
    await deliver(store, "bob", page_of(m1, m2, m3))
    assert handed[store].drain() == []
    view = await view_of(store, "bob", chat)
    assert dict(view.delivered_up_to) == {"alice": 3, "bob": 3}
    assert dict(view.read_up_to) == {"alice": 3, "bob": 0}  # delivered is not read
    backlog = await store.backlog("bob")
    assert (backlog.messages, backlog.updates) == ((), ())

    # A chat delivered as such moves no message mark and hands nothing over.
    other = await new_chat(store, "alice", "carol")
    handed[store].drain()
    await deliver(store, "carol", chat_ids=[other.chat_id])
    assert handed[store].drain() == []
    assert (await store.backlog("carol")).chats == ()


async def test_mark_delivered_moves_only_where_the_frame_continues_it(
    store: Store, handed: dict[Store, Handed]
) -> None:
    chat = await new_chat(store, "alice", "bob")
    m1 = await send(store, chat, "alice", "m1")
    m2 = await send(store, chat, "alice", "m2")
    b3 = await send(store, chat, "bob", "b3")
    m4 = await send(store, chat, "alice", "m4")
    m5 = await send(store, chat, "alice", "m5")
    handed[store].drain()

    def delivered(view: ChatView) -> dict[str, int]:
        return dict(view.delivered_up_to)

    # Bob's own message did not move his mark over alice's undelivered ones.
    assert delivered(await view_of(store, "bob", chat)) == {"alice": 2, "bob": 0}
    # A page above undelivered messages of another member does not continue the mark.
    await deliver(store, "bob", page_of(m4, m5))
    await deliver(store, "bob", live(m5))
    assert handed[store].drain() == []
    assert delivered(await view_of(store, "bob", chat)) == {"alice": 2, "bob": 0}
    backlog = await store.backlog("bob")
    assert backlog.messages == ((chat.chat_id, (m1, m2, m4, m5)),)
    # A page from just above the mark continues it (and the mark goes on over bob's own m3)...
    await deliver(store, "bob", page_of(m1, m2))
    assert moved_marks(handed[store].drain()) == [(chat, "bob", "delivered", 3, b3.message_id)]
    # ...and so does one above the user's own messages only.
    await deliver(store, "bob", page_of(m4, m5))
    assert moved_marks(handed[store].drain()) == [(chat, "bob", "delivered", 5, m5.message_id)]
    assert (await store.backlog("bob")).messages == ()
    # Per user: alice's mark stayed below bob's undelivered message, until she got it.
    assert delivered(await view_of(store, "alice", chat)) == {"alice": 2, "bob": 5}
    await deliver(store, "alice", live(m4))
    assert handed[store].drain() == []
    await deliver(store, "alice", live(b3))
    # ...then over her own m4 and m5 after it.
    assert moved_marks(handed[store].drain()) == [(chat, "alice", "delivered", 5, m5.message_id)]
    assert delivered(await view_of(store, "bob", chat)) == {"alice": 5, "bob": 5}


async def test_marks_of_one_call_that_join_move_the_mark_over_all_of_them(
    store: Store, handed: dict[Store, Handed]
) -> None:
    """Frames reported together (coalesced receipts) whose ranges join, in either order."""
    chat = await new_chat(store, "alice", "bob")
    sent = [await send(store, chat, "alice", f"m{i}") for i in range(1, 7)]
    handed[store].drain()
    await deliver(store, "bob", page_of(*sent[2:4]), page_of(*sent[0:2]))
    assert moved_marks(handed[store].drain()) == [(chat, "bob", "delivered", 4, sent[3].message_id)]
    await deliver(store, "bob", live(sent[4]), live(sent[5]))
    assert moved_marks(handed[store].drain()) == [(chat, "bob", "delivered", 6, sent[5].message_id)]
    assert (await store.backlog("bob")).messages == ()


async def test_marks_of_one_call_that_do_not_join_move_the_mark_only_as_far_as_it_continues(
    store: Store, handed: dict[Store, Handed]
) -> None:
    chat = await new_chat(store, "alice", "bob")
    sent = [await send(store, chat, "alice", f"m{i}") for i in range(1, 5)]
    handed[store].drain()
    # Two frames reported together: m1 continues the mark, m3..m4 does not (m2 is missing).
    await deliver(store, "bob", live(sent[0]), page_of(*sent[2:4]))
    view = await view_of(store, "bob", chat)
    assert dict(view.delivered_up_to)["bob"] == 1
    assert (await store.backlog("bob")).messages == ((chat.chat_id, tuple(sent[1:])),)


# --------------------------------------------------------------------------- read marks


async def test_mark_read_moves_up_only_and_moves_delivered_too(
    store: Store, handed: dict[Store, Handed]
) -> None:
    chat = await new_chat(store, "alice", "bob")
    m1, m2, m3 = [await send(store, chat, "alice", f"m{i}") for i in (1, 2, 3)]
    handed[store].drain()
    origin = Origin("connection-1", "request-1")

    receipt, moved = await store.mark_read(chat, "bob", m2.message_id, origin)
    assert moved
    assert receipt == ReceiptFrame(chat.chat_id, "bob", "read", 2, m2.message_id, receipt.timestamp)
    assert TIMESTAMP.match(receipt.timestamp)
    assert handed[store].drain() == [Committed(chat, origin, receipt=receipt)]
    # Reading implies delivery: the delivered mark moved with it.
    assert await view_of(store, "bob", chat) == expected_view(
        chat, m3, 1, {"alice": 3, "bob": 2}, {"alice": 3, "bob": 2}
    )
    assert (await store.backlog("bob")).messages == ((chat.chat_id, (m3,)),)

    # An older message, or the same one: not moved, answered with the current mark.
    assert await store.mark_read(chat, "bob", m1.message_id, origin) == (receipt, False)
    assert await store.mark_read(chat, "bob", m2.message_id) == (receipt, False)
    assert handed[store].drain() == []

    # A read mark below the delivered mark leaves the delivered mark where it is.
    m4 = await send(store, chat, "alice", "m4")
    await deliver(store, "bob", page_of(m3, m4))
    handed[store].drain()
    receipt, moved = await store.mark_read(chat, "bob", m3.message_id)
    assert moved
    assert (receipt.seq, receipt.message_id) == (3, m3.message_id)
    assert moved_marks(handed[store].drain()) == [(chat, "bob", "read", 3, m3.message_id)]
    assert await view_of(store, "bob", chat) == expected_view(
        chat, m4, 1, {"alice": 4, "bob": 3}, {"alice": 4, "bob": 4}
    )
    # The reader's marks are the reader's: alice's are as her own messages left them.
    assert await view_of(store, "alice", chat) == expected_view(
        chat, m4, 0, {"alice": 4, "bob": 3}, {"alice": 4, "bob": 4}
    )


async def test_mark_read_refuses_a_message_of_another_chat(
    store: Store, handed: dict[Store, Handed]
) -> None:
    chat = await new_chat(store, "alice", "bob")
    other = await new_chat(store, "alice", "carol")
    mine = await send(store, chat, "alice", "here")
    foreign = await send(store, other, "alice", "elsewhere")
    handed[store].drain()
    before = await view_of(store, "bob", chat)
    for message_id in (foreign.message_id, "424242", "x", "", "-1", "٣"):
        with refused(ErrorCode.BAD_REQUEST, "message_id"):
            await store.mark_read(chat, "bob", message_id)
    # Nothing changed, nothing was handed over.
    assert handed[store].drain() == []
    assert await view_of(store, "bob", chat) == before
    assert before.unread_count == 1
    assert (await store.backlog("bob")).message_ids == {mine.message_id}


# --------------------------------------------------------------------------- chat objects


async def test_chat_views_count_unread_and_show_the_last_message(store: Store) -> None:
    chat = await new_chat(store, "alice", "bob")
    assert await view_of(store, "alice", chat) == ChatView.fresh(chat)
    assert await view_of(store, "bob", chat) == ChatView.fresh(chat)
    m1, m2, m3 = [await send(store, chat, "alice", f"m{i}") for i in (1, 2, 3)]
    marks = {"alice": 3, "bob": 0}
    # Each user's unread count counts the other member's messages above their read mark.
    assert await view_of(store, "alice", chat) == expected_view(chat, m3, 0, marks, marks)
    assert await view_of(store, "bob", chat) == expected_view(chat, m3, 3, marks, marks)
    await store.mark_read(chat, "bob", m1.message_id)
    marks = {"alice": 3, "bob": 1}
    assert await view_of(store, "bob", chat) == expected_view(chat, m3, 2, marks, marks)

    # Deleted messages are not counted; the last message shows its current state.
    await store.delete_message(chat, "alice", m2.message_id)
    assert await view_of(store, "bob", chat) == expected_view(chat, m3, 1, marks, marks)
    t3, _ = await store.delete_message(chat, "alice", m3.message_id)
    assert await view_of(store, "bob", chat) == expected_view(chat, t3, 0, marks, marks)
    assert await view_of(store, "alice", chat) == expected_view(chat, t3, 0, marks, marks)
    m4 = await send(store, chat, "alice", "m4")
    e4 = await store.edit_message(chat, "alice", m4.message_id, "m4, edited")
    marks = {"alice": 4, "bob": 1}
    assert await view_of(store, "bob", chat) == expected_view(chat, e4, 1, marks, marks)
    assert await view_of(store, "alice", chat) == expected_view(chat, e4, 0, marks, marks)

    # The other way round: bob's message is alice's unread one, until it is deleted.
    b5 = await send(store, chat, "bob", "b5")
    read, delivered = {"alice": 4, "bob": 5}, {"alice": 4, "bob": 1}
    assert await view_of(store, "alice", chat) == expected_view(chat, b5, 1, read, delivered)
    assert await view_of(store, "bob", chat) == expected_view(chat, b5, 0, read, delivered)
    t5, _ = await store.delete_message(chat, "bob", b5.message_id)
    alice = await view_of(store, "alice", chat)
    assert alice == expected_view(chat, t5, 0, read, delivered)
    # A message deleted below the read mark changes no count.
    await store.delete_message(chat, "alice", m1.message_id)
    assert await view_of(store, "alice", chat) == alice
    assert await view_of(store, "bob", chat) == expected_view(chat, t5, 0, read, delivered)


async def test_sending_moves_the_senders_own_marks(store: Store) -> None:
    chat = await new_chat(store, "alice", "bob")
    m1 = await send(store, chat, "alice", "m1")
    marks = {"alice": 1, "bob": 0}
    assert await view_of(store, "alice", chat) == expected_view(chat, m1, 0, marks, marks)
    # Writing in a chat reads it: the read mark moves at once. The delivered mark stays below
    # another member's message that has not reached the sender.
    b2 = await send(store, chat, "bob", "b2")
    read, delivered = {"alice": 1, "bob": 2}, {"alice": 1, "bob": 0}
    assert await view_of(store, "bob", chat) == expected_view(chat, b2, 0, read, delivered)
    m3 = await send(store, chat, "alice", "m3")
    read = {"alice": 3, "bob": 2}
    assert await view_of(store, "alice", chat) == expected_view(chat, m3, 0, read, delivered)

    # Once it has, the sender's next message moves the delivered mark too.
    await deliver(store, "bob", page_of(m1, b2, m3))
    b4 = await send(store, chat, "bob", "b4")
    read, delivered = {"alice": 3, "bob": 4}, {"alice": 1, "bob": 4}
    assert await view_of(store, "bob", chat) == expected_view(chat, b4, 0, read, delivered)
    # A tombstone that has not reached the sender holds it as well (the backlog offers it).
    m5 = await send(store, chat, "alice", "m5")
    t5, _ = await store.delete_message(chat, "alice", m5.message_id)
    b6 = await send(store, chat, "bob", "b6")
    read = {"alice": 5, "bob": 6}
    assert await view_of(store, "bob", chat) == expected_view(chat, b6, 0, read, delivered)
    assert (await store.backlog("bob")).messages == ((chat.chat_id, (t5,)),)

    # Alice's delivered mark: over bob's messages once she has them, then over her own.
    await deliver(store, "alice", live(b2))
    await deliver(store, "alice", page_of(b4, t5, b6))
    m7 = await send(store, chat, "alice", "m7")
    read, delivered = {"alice": 7, "bob": 6}, {"alice": 7, "bob": 4}
    assert await view_of(store, "alice", chat) == expected_view(chat, m7, 0, read, delivered)
    assert await view_of(store, "bob", chat) == expected_view(chat, m7, 1, read, delivered)
    assert (await store.backlog("alice")).messages == ()


async def test_marks_committed_before_a_send_count_for_the_senders_marks(
    store: Store, storage_config: StorageConfig, request: pytest.FixtureRequest
) -> None:
    """A read or delivered mark queued before the user's message, in the same batch: the
    message moves the sender's marks as if the mark had been committed alone before it."""
    chat = await new_chat(store, "alice", "bob")
    m1 = await send(store, chat, "alice", "m1")
    (receipt, moved), b2 = await in_one_batch(
        store,
        lambda: store.mark_read(chat, "bob", m1.message_id),
        lambda: send(store, chat, "bob", "b2"),
    )
    assert moved
    assert (receipt.seq, receipt.message_id) == (1, m1.message_id)
    marks = {"alice": 1, "bob": 2}
    assert await view_of(store, "bob", chat) == expected_view(chat, b2, 0, marks, marks)

    m3 = await send(store, chat, "alice", "m3")
    _, b4 = await in_one_batch(
        store,
        lambda: store.mark_delivered("bob", [], [live(m3)]),
        lambda: send(store, chat, "bob", "b4"),
    )
    assert await view_of(store, "bob", chat) == expected_view(
        chat, b4, 0, {"alice": 3, "bob": 4}, {"alice": 1, "bob": 4}
    )


# --------------------------------------------------------------------------- edits, deletes


async def test_edit_replaces_the_content_and_takes_the_next_version(
    store: Store, handed: dict[Store, Handed]
) -> None:
    chat = await new_chat(store, "alice", "bob")
    m1, _ = await store.add_message(chat, "alice", "hello", "k1")
    b2 = await send(store, chat, "bob", "b2")
    handed[store].drain()
    origin = Origin("connection-1", "request-1")

    edited = await store.edit_message(chat, "alice", m1.message_id, "hello, edited", origin)
    # Same id, seq, timestamp and client id; the new content, the edit's time, the next version.
    assert edited == attrs.evolve(
        m1, content="hello, edited", version=3, edited_at=edited.edited_at
    )
    assert edited.edited_at is not None
    assert TIMESTAMP.match(edited.edited_at)
    assert edited.edited_at >= m1.timestamp
    assert not edited.deleted
    assert handed[store].drain() == [Committed(chat, origin, edited, update=True)]
    assert await _page(store, chat) == (edited, b2)

    again = await store.edit_message(chat, "alice", m1.message_id, "third")
    assert again == attrs.evolve(edited, content="third", version=4, edited_at=again.edited_at)
    assert again.edited_at is not None
    assert again.edited_at >= edited.edited_at
    assert handed[store].drain() == [Committed(chat, NO_ORIGIN, again, update=True)]
    # A resend gets the stored message as it is now; new messages continue the versions.
    assert await store.add_message(chat, "alice", "hello", "k1") == (again, False)
    m3 = await send(store, chat, "alice", "m3")
    assert (m3.seq, m3.version) == (3, 5)
    assert await _page(store, chat) == (again, b2, m3)


async def test_delete_leaves_a_tombstone_once(store: Store, handed: dict[Store, Handed]) -> None:
    chat = await new_chat(store, "alice", "bob")
    m1, _ = await store.add_message(chat, "alice", "secret", "k1")
    edited = await store.edit_message(chat, "alice", m1.message_id, "secret, edited")
    b2 = await send(store, chat, "bob", "b2")
    handed[store].drain()
    origin = Origin("connection-1", "request-1")

    tombstone, changed = await store.delete_message(chat, "alice", m1.message_id, origin)
    assert changed
    # Same id, seq, timestamp, client id and time of the last edit; no content, deleted.
    assert tombstone == attrs.evolve(edited, content="", deleted=True, version=4)
    assert (tombstone.message_id, tombstone.seq, tombstone.timestamp) == (
        m1.message_id,
        m1.seq,
        m1.timestamp,
    )
    assert handed[store].drain() == [Committed(chat, origin, tombstone, update=True)]
    assert await _page(store, chat) == (tombstone, b2)

    # Deleting again is answered the same, changes nothing and hands nothing over.
    assert await store.delete_message(chat, "alice", m1.message_id, origin) == (tombstone, False)
    # A tombstone cannot be edited.
    with refused(ErrorCode.BAD_REQUEST, "message_id"):
        await store.edit_message(chat, "alice", m1.message_id, "back again")
    assert handed[store].drain() == []
    assert await _page(store, chat) == (tombstone, b2)
    assert await store.add_message(chat, "alice", "secret", "k1") == (tombstone, False)
    b3 = await send(store, chat, "bob", "b3")
    assert (b3.seq, b3.version) == (3, 5)  # neither took a version


async def test_refused_changes_change_nothing(store: Store, handed: dict[Store, Handed]) -> None:
    chat = await new_chat(store, "alice", "bob")
    other = await new_chat(store, "alice", "carol")
    m1 = await send(store, chat, "alice", "m1")
    b2 = await send(store, chat, "bob", "b2")
    foreign = await send(store, other, "alice", "elsewhere")
    handed[store].drain()
    refusals = [
        ("bob", m1.message_id, ErrorCode.FORBIDDEN),  # not the sender
        ("alice", b2.message_id, ErrorCode.FORBIDDEN),
        ("carol", m1.message_id, ErrorCode.FORBIDDEN),
        ("alice", foreign.message_id, ErrorCode.BAD_REQUEST),  # hers, but of another chat
        ("alice", "424242", ErrorCode.BAD_REQUEST),
        ("alice", "x", ErrorCode.BAD_REQUEST),
        ("alice", "", ErrorCode.BAD_REQUEST),
        ("alice", "-1", ErrorCode.BAD_REQUEST),
    ]
    for user_id, message_id, code in refusals:
        field = "message_id" if code is ErrorCode.BAD_REQUEST else None
        with refused(code, field):
            await store.edit_message(chat, user_id, message_id, "changed")
        with refused(code, field):
            await store.delete_message(chat, user_id, message_id)
    assert handed[store].drain() == []
    assert await _page(store, chat) == (m1, b2)
    assert await _page(store, other) == (foreign,)
    # No refusal took a version.
    m3 = await send(store, chat, "alice", "m3")
    assert (m3.seq, m3.version) == (3, 3)
    f2 = await send(store, other, "carol", "f2")
    assert (f2.seq, f2.version) == (2, 2)


async def test_changes_committed_together_apply_in_queue_order(
    store: Store,
    handed: dict[Store, Handed],
    storage_config: StorageConfig,
    request: pytest.FixtureRequest,
) -> None:
    """Changes to one message in one batch (one transaction) are judged one after another,
    as if each were committed alone."""
    chat = await new_chat(store, "alice", "bob")
    m1 = await send(store, chat, "alice", "m1")
    m2 = await send(store, chat, "alice", "m2")
    handed[store].drain()
    deleted, again, late, first, second = await in_one_batch(
        store,
        lambda: store.delete_message(chat, "alice", m1.message_id),
        lambda: store.delete_message(chat, "alice", m1.message_id),
        lambda: store.edit_message(chat, "alice", m1.message_id, "too late"),
        lambda: store.edit_message(chat, "alice", m2.message_id, "first"),
        lambda: store.edit_message(chat, "alice", m2.message_id, "second"),
    )
    tombstone = attrs.evolve(m1, content="", deleted=True, version=3)
    assert deleted == (tombstone, True)
    assert again == (tombstone, False)
    assert isinstance(late, ProtocolError)
    assert (late.code, late.field) == (ErrorCode.BAD_REQUEST, "message_id")
    assert first == attrs.evolve(m2, content="first", version=4, edited_at=first.edited_at)
    assert second == attrs.evolve(m2, content="second", version=5, edited_at=second.edited_at)
    assert handed[store].drain_changes() == [(tombstone, True), (first, True), (second, True)]
    assert await _page(store, chat) == (tombstone, second)
    m3 = await send(store, chat, "alice", "m3")
    assert (m3.seq, m3.version) == (3, 6)


# --------------------------------------------------------------------------- the change log


async def test_a_change_to_a_delivered_message_is_offered_once_in_its_final_state(
    store: Store,
) -> None:
    chat = await new_chat(store, "alice", "bob")
    m1 = await send(store, chat, "alice", "m1")
    m2 = await send(store, chat, "alice", "m2")
    await deliver(store, "bob", page_of(m1, m2), chat_ids=[chat.chat_id])
    backlog = await store.backlog("bob")
    assert (backlog.chats, backlog.messages, backlog.updates) == ((), (), ())
    assert (await store.backlog_plan("bob")).update_chats == ()  # nothing changed yet

    await store.edit_message(chat, "alice", m1.message_id, "one")
    await store.edit_message(chat, "alice", m1.message_id, "two")
    e3 = await store.edit_message(chat, "alice", m1.message_id, "three")
    tombstone, _ = await store.delete_message(chat, "alice", m2.message_id)
    backlog = await store.backlog("bob")
    assert backlog.messages == ()
    assert backlog.updates == ((chat.chat_id, (e3, tombstone)),)  # once each, by seq
    assert backlog.updated_ids == {m1.message_id, m2.message_id}
    plan = await store.backlog_plan("bob")
    assert plan.update_chats == ((chat.chat_id, 0, 2),)
    assert plan.high_water == {chat.chat_id: (2, 6)}

    # The read is bounded by the snapshot: a later change is the live fan-out's.
    e4 = await store.edit_message(chat, "alice", m1.message_id, "four")
    assert e4.version == 7
    assert await store.updated("bob", chat.chat_id, 0, 6, 2) == (tombstone,)
    assert await store.updated("bob", chat.chat_id, 0, 7, 2) == (e4, tombstone)
    assert await store.updated("bob", chat.chat_id, 6, 7, 2) == (e4,)
    assert await store.updated("bob", chat.chat_id, 0, 7, 1) == (e4,)  # only what he had

    # Not once the version mark covers a change; a lower mark does not move it back.
    await deliver(store, "bob", SeqMark(chat.chat_id, version=6))
    assert (await store.backlog("bob")).updates == ((chat.chat_id, (e4,)),)
    await deliver(store, "bob", SeqMark(chat.chat_id, version=7))
    await deliver(store, "bob", SeqMark(chat.chat_id, version=3))
    backlog = await store.backlog("bob")
    assert (backlog.chats, backlog.messages, backlog.updates) == ((), (), ())
    assert (await store.backlog_plan("bob")).update_chats == ()
    # The sender's own changes are offered to her too (her other devices), by her own mark.
    alice = await store.backlog("alice")
    assert alice.messages == ()
    assert alice.updates == ((chat.chat_id, (e4, tombstone)),)


async def test_a_changed_message_never_delivered_comes_as_a_message_in_its_current_state(
    store: Store,
) -> None:
    chat = await new_chat(store, "alice", "bob")
    m1 = await send(store, chat, "alice", "m1")
    m2 = await send(store, chat, "alice", "m2")
    await deliver(store, "bob", live(m1), chat_ids=[chat.chat_id])
    e2 = await store.edit_message(chat, "alice", m2.message_id, "m2, edited")
    e1 = await store.edit_message(chat, "alice", m1.message_id, "m1, edited")
    m3 = await send(store, chat, "alice", "m3")
    t3, _ = await store.delete_message(chat, "alice", m3.message_id)
    backlog = await store.backlog("bob")
    assert backlog.messages == ((chat.chat_id, (e2, t3)),)
    assert backlog.updates == ((chat.chat_id, (e1,)),)
    assert backlog.high_water == {chat.chat_id: (3, 6)}
    # The frames that carried them, with the snapshot's version: nothing is left.
    await deliver(store, "bob", page_of(e2, t3, version=6))
    backlog = await store.backlog("bob")
    assert (backlog.messages, backlog.updates) == ((), ())


# --------------------------------------------------------------------------- lifecycle


async def test_check_answers_while_open(store: Store) -> None:
    await store.check()


async def test_reopen_keeps_data_and_schema(store: Store, opener: OpenStore) -> None:
    chat = await new_chat(store, "alice", "bob")
    message = await send(store, chat, "alice", "kept")
    await store.aclose()
    reopened = await opener()
    assert await reopened.get_chat(chat.chat_id) == chat
    assert await reopened.messages_before(chat.chat_id, None, 5) == ((message,), False)
    after = await send(reopened, chat, "bob", "after")
    assert (after.seq, after.version) == (2, 2)


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
        chat = await new_chat(stores[0], "alice", "bob")

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
        assert [m.seq for m in page] == list(range(1, len(page) + 1))
        committed = [store_handed.drain_messages() for store_handed in handed]
        assert sum(len(per_store) for per_store in committed) == len(page)
        for per_store in committed:  # each process handed over in commit (= id) order
            ids = [as_int(m.message_id) for m in per_store]
            assert ids == sorted(ids)
        # ...and together they carry the chat's versions 1..N once each, whichever process.
        assert_versions_chain(committed)
        assert sorted((m for per_store in committed for m in per_store), key=lambda m: m.seq) == (
            list(page)
        )
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
        chat = await new_chat(stores[0], "alice", "bob")
        results: list[tuple[Message, bool]] = []

        async def resend(store: Store) -> None:
            results.append(await store.add_message(chat, "alice", "once", "same-key"))

        with trio.fail_after(TIMEOUT_S):
            async with trio.open_nursery() as senders:
                for index in range(20):
                    senders.start_soon(resend, stores[index % 2])
        assert sum(created for _, created in results) == 1
        assert len({message for message, _ in results}) == 1
        assert results[0][0].seq == 1
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
async def test_postgres_upgrade_from_v1_numbers_old_messages_and_continues_them(
    postgres_config: StorageConfig, nursery: trio.Nursery
) -> None:
    """A database written by the first schema version: after the upgrade, its messages are
    numbered in id order and the next message of the chat takes the next seq and version."""
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
        page = await _page(store, chat)
        assert [(as_int(m.message_id), m.seq, m.version) for m in page] == [
            (message_id, n, n) for n, message_id in enumerate(sorted(old_ids), start=1)
        ]
        new = await send(store, chat, "bob", "new")
        assert handed.drain_changes() == [(new, False)]
        assert (new.seq, new.version) == (4, 4)
        assert as_int(new.message_id) > max(old_ids)
    finally:
        await store.aclose()


@pytest.mark.scale
async def test_postgres_one_bad_write_does_not_fail_its_batch(
    postgres_config: StorageConfig, nursery: trio.Nursery
) -> None:
    store = open_store(postgres_config)
    await store.open(nursery)
    try:
        chat = await new_chat(store, "alice", "bob")
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
        assert [m.seq for m in page] == list(range(1, 11))
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
        chat = await new_chat(store, "alice", "bob")
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
            chat = await new_chat(store, "alice", "bob")
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
            assert after[0].seq == 21  # the failed write took no seq
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
        chats = [await new_chat(stores[0], "bench", f"peer{i}") for i in range(16)]

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
    assert [view.chat_id for view in alice] == ["3", "1", "2"]
    page = await _page(store, alice[1].chat)
    assert [(m.message_id, m.content, m.client_message_id, m.seq) for m in page] == [
        ("1", "seen", "c1", 1),
        ("2", "unseen", None, 2),
    ]
    # Bob's marks stop below his undelivered message; what was delivered counts as read.
    marks = {"alice": 2, "bob": 1}
    assert alice[1] == expected_view(alice[1].chat, page[1], 0, marks, marks)
    assert (await view_of(store, "bob", alice[1].chat)).unread_count == 1
    bob = await store.backlog("bob")
    assert bob.chats == ()
    assert [[m.message_id for m in batch] for _, batch in bob.messages] == [["2"]]
    assert [view.chat_id for view in (await store.backlog("carol")).chats] == ["2"]
    assert (await store.backlog("dave")).chats == ()
    assert [view.chat_id for view in (await store.backlog("alice")).chats] == ["3"]
    new = await send(store, alice[2].chat, "carol", "new")
    assert (new.seq, new.version) == (1, 1)
    assert [view.chat_id for view in await store.chats_of("alice")] == ["2", "3", "1"]


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


# A database as the released schema (version 3) wrote it. Chats: (id, user_a, user_b,
# created_by, created_at_ms, a_delivered, b_delivered); carol never got chat 2, alice never
# got chat 3, and chat 4 has no messages.
_T0 = 1_700_000_000_000
_V3_CHATS = (
    (1, "alice", "bob", "alice", _T0, True, True),
    (2, "alice", "carol", "alice", _T0 + 10, True, False),
    (3, "alice", "dave", "dave", _T0 + 20, False, True),
    (4, "erin", "frank", "erin", _T0 + 30, True, True),
)
# Messages: (id, chat_id, sender_id, recipient_id, content, created_at_ms, client_message_id,
# delivered), the chats' ids interleaved. Bob's gap: a2 undelivered below a3, delivered.
_V3_MESSAGES = (
    (1, 1, "alice", "bob", "a1", _T0 + 100, "c-a1", True),
    (2, 2, "alice", "carol", "x1", _T0 + 110, None, False),
    (3, 1, "bob", "alice", "b1", _T0 + 120, "c-b1", True),
    (4, 1, "alice", "bob", "a2, the gap", _T0 + 130, None, False),
    (5, 1, "alice", "bob", "a3", _T0 + 140, "c-a3", True),
    (6, 1, "bob", "alice", "b2", _T0 + 140, None, False),  # the same millisecond as a3
    (7, 2, "alice", "carol", "x2", _T0 + 160, "c-x2", False),
    (8, 1, "alice", "bob", "a4 😀\x00", _T0 + 170, None, False),
    (9, 3, "dave", "alice", "d1", _T0 + 180, None, False),
)
# The order the chats were last active in, oldest first (the writer bumped `activity_seq`).
_V3_ACTIVITY = (4, 2, 1, 3)


def _write_v3_sqlite(path: Path) -> None:
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        for version, statements in enumerate(SQLITE_MIGRATIONS[:3], start=1):
            for statement in statements:
                db.execute(statement)
            db.execute("INSERT INTO schema_version (version) VALUES (?)", (version,))
        for chat_id, user_a, user_b, creator, created, a_delivered, b_delivered in _V3_CHATS:
            db.execute(
                "INSERT INTO chats (id, user_a, user_b, created_by, created_at_ms,"
                " last_activity_ms, a_delivered, b_delivered) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (chat_id, user_a, user_b, creator, created, created, a_delivered, b_delivered),
            )
        for message_id, chat_id, sender, recipient, content, at, client_id, done in _V3_MESSAGES:
            db.execute(
                "INSERT INTO messages (id, chat_id, sender_id, recipient_id, content,"
                " created_at_ms, client_message_id, delivered) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (message_id, chat_id, sender, recipient, content, at, client_id, done),
            )
            db.execute(
                "UPDATE chats SET last_message_ms = ?, last_activity_ms = ? WHERE id = ?",
                (at, at, chat_id),
            )
        for chat_id in _V3_ACTIVITY:
            db.execute(
                "UPDATE chats SET activity_seq = (SELECT MAX(activity_seq) + 1 FROM chats)"
                " WHERE id = ?",
                (chat_id,),
            )
    finally:
        db.close()


def _write_v3_postgres(dsn: str) -> None:
    """The same database in PostgreSQL's types, in a fresh schema (the identity columns give
    the ids above)."""
    with psycopg.connect(dsn, autocommit=True) as db:
        db.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        for version, statements in enumerate(POSTGRES_MIGRATIONS[:3], start=1):
            for statement in statements:
                db.execute(statement)
            db.execute("INSERT INTO schema_version (version) VALUES (%s)", (version,))
        for chat_id, user_a, user_b, creator, created, a_delivered, b_delivered in _V3_CHATS:
            row = db.execute(
                "INSERT INTO chats (user_a, user_b, created_by, created_at_ms, last_activity_ms,"
                " a_delivered, b_delivered) VALUES (%s, %s, %s, %s, %s, %s, %s) RETURNING id",
                (user_a, user_b, creator, created, created, a_delivered, b_delivered),
            ).fetchone()
            assert row == (chat_id,)
        for message_id, chat_id, sender, recipient, content, at, client_id, done in _V3_MESSAGES:
            row = db.execute(
                "INSERT INTO messages (chat_id, sender_id, recipient_id, content, created_at_ms,"
                " client_message_id, delivered) VALUES (%s, %s, %s, %s, %s, %s, %s) RETURNING id",
                (
                    chat_id,
                    sender,
                    recipient,
                    content.encode(),
                    at,
                    None if client_id is None else client_id.encode(),
                    done,
                ),
            ).fetchone()
            assert row == (message_id,)
            db.execute(
                "UPDATE chats SET last_message_ms = %s, last_activity_ms = %s,"
                " last_message_id = %s WHERE id = %s",
                (at, at, message_id, chat_id),
            )
        for chat_id in _V3_ACTIVITY:
            db.execute(
                "UPDATE chats SET activity_seq = nextval('chat_activity_seq') WHERE id = %s",
                (chat_id,),
            )


def _v3_chat(chat_id: int) -> Chat:
    _, user_a, user_b, creator, created, _, _ = _V3_CHATS[chat_id - 1]
    return Chat(str(chat_id), (user_a, user_b), creator, format_ms(created))


def _v3_messages(chat_id: int) -> tuple[Message, ...]:
    """The chat's messages as the upgraded store must return them: numbered in id order."""
    rows = [row for row in _V3_MESSAGES if row[1] == chat_id]
    return tuple(
        Message(
            str(message_id),
            str(chat_id),
            sender,
            recipient,
            content,
            format_ms(at),
            client_id,
            seq,
            seq,
        )
        for seq, (message_id, _, sender, recipient, content, at, client_id, _) in enumerate(
            sorted(rows), start=1
        )
    )


async def _check_upgraded_from_v3(store: Store, handed: Handed) -> None:
    """Every chat, message, content, client id and timestamp survived, numbered by id per
    chat; each member's delivered mark stops below their oldest undelivered message (so the
    gap's message and all after it stay undelivered), read marks equal delivered ones, and
    new writes continue every chat's seq and version."""
    chats = {n: _v3_chat(n) for n in (1, 2, 3, 4)}
    m = {n: _v3_messages(n) for n in (1, 2, 3, 4)}
    for n, chat in chats.items():
        assert await store.get_chat(chat.chat_id) == chat
        assert await all_messages(store, chat) == m[n]
    # Per chat and member: the delivered (= read) mark and the unread count.
    marks = {
        1: {"alice": 4, "bob": 2},
        2: {"alice": 2, "carol": 0},
        3: {"alice": 0, "dave": 1},
        4: {"erin": 0, "frank": 0},
    }
    unread = {(1, "alice"): 1, (1, "bob"): 3, (2, "carol"): 2, (3, "alice"): 1}

    def view(n: int, user: str) -> ChatView:
        last = m[n][-1] if m[n] else None
        return expected_view(chats[n], last, unread.get((n, user), 0), marks[n], marks[n])

    order = {"alice": [3, 1, 2], "bob": [1], "carol": [2], "dave": [3], "erin": [4]}
    for user, chat_ids in order.items():
        assert await store.chats_of(user) == [view(n, user) for n in chat_ids], user

    alice = await store.backlog("alice")
    assert alice.chats == (view(3, "alice"),)
    assert alice.messages == (("1", (m[1][4],)), ("3", (m[3][0],)))
    assert alice.updates == ()
    assert alice.high_water == {"1": (6, 6), "2": (2, 2), "3": (1, 1)}
    bob = await store.backlog("bob")
    assert bob.chats == ()
    assert bob.messages == (("1", (m[1][2], m[1][3], m[1][5])),)  # from the gap on
    assert bob.updates == ()
    carol = await store.backlog("carol")
    assert carol.chats == (view(2, "carol"),)
    assert carol.messages == (("2", m[2]),)
    for user in ("dave", "erin", "frank"):
        backlog = await store.backlog(user)
        assert (backlog.chats, backlog.messages, backlog.updates) == ((), (), ()), user
    assert handed.drain() == []  # the upgrade handed nothing over

    # Old client ids still make resends idempotent; new messages continue seq and version.
    assert await store.add_message(chats[1], "alice", "again", "c-a1") == (m[1][0], False)
    assert await store.add_message(chats[1], "bob", "again", "c-b1") == (m[1][1], False)
    x3 = await send(store, chats[2], "carol", "x3")
    assert (x3.seq, x3.version) == (3, 3)
    assert x3.timestamp >= m[2][-1].timestamp
    a5 = await send(store, chats[1], "alice", "a5")
    assert (a5.seq, a5.version) == (7, 7)
    assert [view.chat_id for view in await store.chats_of("alice")] == ["1", "2", "3"]
    # Alice read her chat by writing in it; her delivered mark stays below b2 (not had yet).
    alice_view = await view_of(store, "alice", chats[1])
    assert alice_view.read_up_to == (("alice", 7), ("bob", 2))
    assert alice_view.delivered_up_to == (("alice", 4), ("bob", 2))
    assert alice_view.unread_count == 0
    # The version marks cover the old messages; a change after the upgrade is offered.
    a1 = await store.edit_message(chats[1], "alice", "1", "a1, edited")
    assert a1 == attrs.evolve(m[1][0], content="a1, edited", version=8, edited_at=a1.edited_at)
    bob = await store.backlog("bob")
    assert bob.messages == (("1", (m[1][2], m[1][3], m[1][5], a5)),)
    assert bob.updates == (("1", (a1,)),)
    assert (await store.backlog("alice")).updates == (("1", (a1,)),)
    assert handed.drain_changes() == [(x3, False), (a5, False), (a1, True)]

    # A page from the gap on continues bob's mark: it moves over all of it.
    await deliver(store, "bob", page_of(m[1][2], m[1][3], m[1][5], a5, version=8))
    assert moved_marks(handed.drain()) == [(chats[1], "bob", "delivered", 7, a5.message_id)]
    bob = await store.backlog("bob")
    assert (bob.chats, bob.messages, bob.updates) == ((), (), ())
    assert await view_of(store, "bob", chats[1]) == expected_view(
        chats[1], a5, 4, {"alice": 7, "bob": 2}, {"alice": 4, "bob": 7}
    )


async def test_sqlite_upgrade_from_the_released_schema(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    config = StorageConfig(backend="sqlite", path=tmp_path / "v3.db")
    _write_v3_sqlite(config.path)
    store = open_store(config)
    handed = await open_handing(store, nursery)
    try:
        with trio.fail_after(TIMEOUT_S):
            await _check_upgraded_from_v3(store, handed)
    finally:
        await store.aclose()
    db = sqlite3.connect(config.path)
    try:
        versions = db.execute("SELECT version FROM schema_version ORDER BY version").fetchall()
    finally:
        db.close()
    assert versions == [(version,) for version in range(1, len(SQLITE_MIGRATIONS) + 1)]


@pytest.mark.scale
async def test_postgres_upgrade_from_the_released_schema(
    postgres_config: StorageConfig, nursery: trio.Nursery
) -> None:
    _write_v3_postgres(postgres_config.dsn)
    store = open_store(postgres_config)
    handed = await open_handing(store, nursery)
    try:
        with trio.fail_after(TIMEOUT_S):
            await _check_upgraded_from_v3(store, handed)
    finally:
        await store.aclose()
    with psycopg.connect(postgres_config.dsn, autocommit=True) as db:
        versions = db.execute("SELECT version FROM schema_version ORDER BY version").fetchall()
    assert versions == [(version,) for version in range(1, len(POSTGRES_MIGRATIONS) + 1)]


# The database as schema version 4 (version 2's model, before groups) left it: the released
# data of version 3 above, migrated by migration 4 (the same statements the code of version 4
# ran), so it holds direct chats, numbered messages, members with their marks, and bob's
# delivery gap.


def _write_v4_sqlite(path: Path) -> None:
    _write_v3_sqlite(path)
    db = sqlite3.connect(path, isolation_level=None)
    try:
        for statement in SQLITE_MIGRATIONS[3]:
            db.execute(statement)
        db.execute("INSERT INTO schema_version (version) VALUES (4)")
    finally:
        db.close()


def _write_v4_postgres(dsn: str) -> None:
    _write_v3_postgres(dsn)
    with psycopg.connect(dsn, autocommit=True) as db:
        for statement in POSTGRES_MIGRATIONS[3]:
            db.execute(statement)
        db.execute("INSERT INTO schema_version (version) VALUES (4)")


async def _check_groups_next_to_upgraded_chats(store: Store, handed: Handed) -> Chat:
    """After the upgrade checks: groups live next to the old direct chats, which stay one per
    pair; returns the group."""
    # The old members were there from the start: their pages (fetch_messages reads with the
    # viewer) hold every message.
    for n, users in ((1, ("alice", "bob")), (2, ("alice", "carol")), (3, ("alice", "dave"))):
        everything = await all_messages(store, _v3_chat(n))
        for user in users:
            page = await store.messages_before(str(n), None, 1000, user)
            assert page == (everything, False), (n, user)
    group = await store.create_group("alice", "Old friends", ["bob", "carol"])
    assert group.participants == ("alice", "bob", "carol")
    assert int(group.chat_id) > len(_V3_CHATS)  # ids go on after the old ones
    message, _ = await store.add_message(group, "bob", "hello group", None)
    assert (message.seq, message.version, message.recipient_id) == (1, 1, None)
    assert int(message.message_id) > len(_V3_MESSAGES)
    assert [view.chat_id for view in await store.chats_of("alice")] == [
        group.chat_id,
        "1",
        "2",
        "3",
    ]
    assert [view.chat_id for view in await store.chats_of("bob")] == [group.chat_id, "1"]
    assert await store.create_chat("bob", "alice") == (_v3_chat(1), False)  # still one per pair
    erin = await new_chat(store, "erin", "alice")
    assert erin.kind == "direct"
    assert await store.get_chat(group.chat_id) == group
    committed = handed.drain()
    assert [c.chat.chat_id for c in committed] == [group.chat_id, group.chat_id, erin.chat_id]
    return group


async def test_sqlite_upgrade_from_version_4_keeps_everything_and_holds_groups(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    config = StorageConfig(backend="sqlite", path=tmp_path / "v4.db")
    _write_v4_sqlite(config.path)
    store = open_store(config)
    handed = await open_handing(store, nursery)
    try:
        with trio.fail_after(TIMEOUT_S):
            await _check_upgraded_from_v3(store, handed)
            group = await _check_groups_next_to_upgraded_chats(store, handed)
    finally:
        await store.aclose()
    db = sqlite3.connect(config.path, isolation_level=None)
    try:
        db.execute("PRAGMA foreign_keys = ON")
        versions = db.execute("SELECT version FROM schema_version ORDER BY version").fetchall()
        assert versions == [(version,) for version in range(1, len(SQLITE_MIGRATIONS) + 1)]
        assert db.execute("PRAGMA foreign_key_check").fetchall() == []
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        for table in ("messages", "members"):
            references = db.execute(f"PRAGMA foreign_key_list({table})").fetchall()
            assert [(row[2], row[3], row[4]) for row in references] == [("chats", "chat_id", "id")]
        # The group's row has no pair; the old chats keep theirs, ids and activity order.
        rows = db.execute(
            "SELECT id, user_a, user_b, kind, title FROM chats ORDER BY activity_seq"
        ).fetchall()
        assert rows[:4] == [
            (4, "erin", "frank", "direct", None),
            (3, "alice", "dave", "direct", None),
            (2, "alice", "carol", "direct", None),
            (1, "alice", "bob", "direct", None),
        ]
        assert (int(group.chat_id), None, None, "group", "Old friends") in rows
        indexes = {
            name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'index'")
        }
        assert {"chats_by_user_b", "chats_by_activity"} <= indexes
        # The references still hold: no message or member for a chat that does not exist,
        # and still one direct chat per pair.
        with pytest.raises(sqlite3.IntegrityError):
            db.execute(
                "INSERT INTO messages (chat_id, sender_id, recipient_id, content, created_at_ms,"
                " seq, version) VALUES (999, 'alice', 'bob', 'x', 0, 1, 1)"
            )
        with pytest.raises(sqlite3.IntegrityError):
            db.execute("INSERT INTO members (chat_id, user_id) VALUES (999, 'alice')")
        with pytest.raises(sqlite3.IntegrityError):
            db.execute(
                "INSERT INTO chats (user_a, user_b, created_by, created_at_ms, last_activity_ms)"
                " VALUES ('alice', 'bob', 'alice', 0, 0)"
            )
        with pytest.raises(sqlite3.IntegrityError):
            db.execute("DELETE FROM chats WHERE id = 1")  # its messages refer to it
    finally:
        db.close()


@pytest.mark.scale
async def test_postgres_upgrade_from_version_4_keeps_everything_and_holds_groups(
    postgres_config: StorageConfig, nursery: trio.Nursery
) -> None:
    _write_v4_postgres(postgres_config.dsn)
    store = open_store(postgres_config)
    handed = await open_handing(store, nursery)
    try:
        with trio.fail_after(TIMEOUT_S):
            await _check_upgraded_from_v3(store, handed)
            group = await _check_groups_next_to_upgraded_chats(store, handed)
    finally:
        await store.aclose()
    with psycopg.connect(postgres_config.dsn, autocommit=True) as db:
        versions = db.execute("SELECT version FROM schema_version ORDER BY version").fetchall()
        assert versions == [(version,) for version in range(1, len(POSTGRES_MIGRATIONS) + 1)]
        rows = db.execute(
            "SELECT id, user_a, user_b, kind, title FROM chats ORDER BY activity_seq"
        ).fetchall()
        assert rows[:4] == [
            (4, "erin", "frank", "direct", None),
            (3, "alice", "dave", "direct", None),
            (2, "alice", "carol", "direct", None),
            (1, "alice", "bob", "direct", None),
        ]
        assert (int(group.chat_id), None, None, "group", "Old friends") in rows
        with pytest.raises(psycopg.errors.ForeignKeyViolation):
            db.execute(
                "INSERT INTO messages (chat_id, sender_id, recipient_id, content, created_at_ms,"
                " seq, version) VALUES (999, 'alice', 'bob', 'x'::bytea, 0, 1, 1)"
            )
        with pytest.raises(psycopg.errors.ForeignKeyViolation):
            db.execute("INSERT INTO members (chat_id, user_id) VALUES (999, 'alice')")
        with pytest.raises(psycopg.errors.UniqueViolation):
            db.execute(
                "INSERT INTO chats (user_a, user_b, created_by, created_at_ms, last_activity_ms)"
                " VALUES ('alice', 'bob', 'alice', 0, 0)"
            )
