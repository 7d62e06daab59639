"""The store contract for blocking and last-seen times (`handler.store.base`,
`handler.store.blocks`), on every backend.

The backends and fixtures are the contract suite's (`test_store_contract`): each test runs on
SQLite and on PostgreSQL (marked `scale`; skipped, naming `CHAT_TEST_DATABASE_URL`, when it is
unset), every store is opened with a `commits` channel, and the tests read what it handed over.
Some tests also read the database underneath the store (`rows`): a direct chat's `blocked`
flag must agree with `blocks` whatever the order the writes came in.

A block is decided in the writer's transaction: while either of a pair blocks the other their
direct chat cannot be created (again), nor written or edited in; deleting one's own message
stays allowed, and groups are unaffected. The PostgreSQL-only tests at the end race two
stores (two processes' writers) on the same pairs; the upgrade tests build a database of
schema version 5 and open it.
"""

from __future__ import annotations

import contextlib
import random
import sqlite3
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Final

import psycopg
import pytest
import test_store_contract
import trio
import trio.testing
from scale_support import database_url, fresh_schema
from test_store_contract import (
    TIMEOUT_S,
    Handed,
    all_messages,
    in_one_batch,
    new_chat,
    open_handing,
    refused,
    send,
)

from handler.config import StorageConfig
from handler.errors import ErrorCode, ProtocolError
from handler.protocol import BlockChange, Chat
from handler.store import Store, open_store
from handler.store.base import NO_ORIGIN, Committed, Origin
from handler.store.blocks import BLOCK_IN_PLACE
from handler.store.schema import POSTGRES_MIGRATIONS, SQLITE_MIGRATIONS
from handler.store.sql_store import SQLStore
from handler.timefmt import format_ms

# The contract suite's backends and fixtures: SQLite, and PostgreSQL in a fresh schema.
storage_config = test_store_contract.storage_config
handed = test_store_contract.handed
opener = test_store_contract.opener
store = test_store_contract.store

MAX_BLOCKED: Final = 1000
# User ids whose code-point order is not the order of most collations (case, accents, symbols,
# characters outside the BMP): the list a user blocks is sorted by code point everywhere.
ODD_IDS: Final = ("zoe", "Zed", "émile", "Émile", "bob", "a-b", "a_b", "ab", "😀", "ß", "B", "0")


def block_changes(commits: Sequence[Committed]) -> list[tuple[BlockChange, Origin]]:
    """`commits`, which must all be blocks or unblocks, as their `BlockChange` and origin."""
    changes = []
    for commit in commits:
        assert commit.block is not None, commit
        assert (commit.message, commit.receipt, commit.group) == (None, None, None)
        assert commit.chat.chat_id == ""  # a block concerns two users, not a chat
        assert commit.chat.participants == ()
        changes.append((commit.block, commit.origin))
    return changes


def rows(config: StorageConfig, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    """A query on the database underneath the store, on a connection of its own (`?` for a
    parameter, on both backends)."""
    if config.backend == "sqlite":
        db = sqlite3.connect(config.path)
        try:
            return [tuple(row) for row in db.execute(sql, params).fetchall()]
        finally:
            db.close()
    with psycopg.connect(config.dsn, autocommit=True) as connection:
        return [tuple(row) for row in connection.execute(sql.replace("?", "%s"), params)]


# Every direct chat whose `blocked` flag disagrees with `blocks` (either way of its pair).
_FLAG_MISMATCHES: Final = (
    "SELECT c.id, c.user_a, c.user_b, c.blocked FROM chats c WHERE c.kind = 'direct' AND"
    " c.blocked <> CASE WHEN EXISTS (SELECT 1 FROM blocks b WHERE (b.blocker_id = c.user_a"
    " AND b.blocked_id = c.user_b) OR (b.blocker_id = c.user_b AND b.blocked_id = c.user_a))"
    " THEN 1 ELSE 0 END"
)


def flag_mismatches(config: StorageConfig) -> list[tuple[Any, ...]]:
    return rows(config, _FLAG_MISMATCHES)


def blocked_flag(config: StorageConfig, chat: Chat) -> int:
    ((flag,),) = rows(config, "SELECT blocked FROM chats WHERE id = ?", int(chat.chat_id))
    return int(flag)


async def block(store: Store, blocker: str, blocked: str, origin: Origin = NO_ORIGIN) -> bool:
    """Block; whether it changed anything."""
    _, changed = await store.set_block(blocker, blocked, True, MAX_BLOCKED, origin)
    return changed


async def unblock(store: Store, blocker: str, blocked: str, origin: Origin = NO_ORIGIN) -> bool:
    _, changed = await store.set_block(blocker, blocked, False, MAX_BLOCKED, origin)
    return changed


@contextlib.contextmanager
def refused_by_block(field: str) -> Iterator[None]:
    """Expect the `forbidden` that says a block is in place, on `field`."""
    with pytest.raises(ProtocolError) as caught:
        yield
    assert (caught.value.code, caught.value.field) == (ErrorCode.FORBIDDEN, field)
    assert caught.value.message == BLOCK_IN_PLACE


async def contents(store: Store, chat: Chat) -> list[str]:
    return [message.content for message in await all_messages(store, chat)]


# --------------------------------------------------------------------------- set_block


async def test_block_and_unblock_answer_the_sorted_list_and_hand_over_only_changes(
    store: Store, handed: dict[Store, Handed]
) -> None:
    commits = handed[store]
    blocked: list[str] = []
    for index, other in enumerate(ODD_IDS):
        origin = Origin(f"conn-{index}", f"r-{index}")
        blocked.append(other)
        expected = tuple(sorted(blocked))  # Python's order: by code point
        assert await store.set_block("alice", other, True, MAX_BLOCKED, origin) == (expected, True)
        assert block_changes(commits.drain()) == [
            (BlockChange("alice", other, True, expected), origin)
        ]
    everyone = tuple(sorted(ODD_IDS))
    assert everyone[:4] == ("0", "B", "Zed", "a-b")  # not the order of a locale's collation
    assert await store.blocks_of("alice") == everyone
    # Again: the same answer, nothing changed, nothing handed over.
    for other in ODD_IDS:
        assert await store.set_block("alice", other, True, MAX_BLOCKED) == (everyone, False)
    assert commits.drain() == []
    # Unblocking: the list without them, once; again, nothing.
    origin = Origin("conn-x", 7)
    rest = tuple(user for user in everyone if user != "émile")
    assert await store.set_block("alice", "émile", False, MAX_BLOCKED, origin) == (rest, True)
    assert block_changes(commits.drain()) == [(BlockChange("alice", "émile", False, rest), origin)]
    assert await store.set_block("alice", "émile", False, MAX_BLOCKED) == (rest, False)
    assert await store.set_block("alice", "nobody", False, MAX_BLOCKED) == (rest, False)
    assert commits.drain() == []
    assert await store.blocks_of("alice") == rest
    assert await store.blocks_of("émile") == ()  # a block is one way


async def test_past_max_blocked_a_new_block_is_refused_and_writes_nothing(
    store: Store, handed: dict[Store, Handed], storage_config: StorageConfig
) -> None:
    commits = handed[store]
    for other in ("bob", "carol", "dave"):
        await store.set_block("alice", other, True, 3)
    commits.drain()
    with refused(ErrorCode.BAD_REQUEST, "user_id"):
        await store.set_block("alice", "erin", True, 3)
    assert commits.drain() == []
    assert await store.blocks_of("alice") == ("bob", "carol", "dave")
    assert await store.block_relations("erin") == (frozenset(), frozenset())
    assert rows(storage_config, "SELECT COUNT(*) FROM blocks") == [(3,)]
    # Nothing stands between them: their chat can be created and written in.
    chat = await new_chat(store, "erin", "alice")
    await send(store, chat, "erin", "hi")
    assert blocked_flag(storage_config, chat) == 0
    # At the limit, what is already blocked stays answerable, and unblocking makes room.
    assert await store.set_block("alice", "bob", True, 3) == (("bob", "carol", "dave"), False)
    assert await store.set_block("alice", "bob", False, 3) == (("carol", "dave"), True)
    assert await store.set_block("alice", "erin", True, 3) == (("carol", "dave", "erin"), True)
    with refused(ErrorCode.BAD_REQUEST, "user_id"):
        await store.set_block("carol", "alice", True, 0)
    assert await store.blocks_of("carol") == ()


# --------------------------------------------------------------------------- direct chats


@pytest.mark.parametrize("blocker", ["alice", "bob"])
async def test_create_chat_is_refused_across_a_block_either_way(
    store: Store, handed: dict[Store, Handed], blocker: str
) -> None:
    other = "bob" if blocker == "alice" else "alice"
    await block(store, blocker, other)
    handed[store].drain()
    for creator, recipient in (("alice", "bob"), ("bob", "alice")):
        with refused_by_block("user_id"):
            await store.create_chat(creator, recipient)
    assert handed[store].drain() == []
    assert await store.chats_of("alice") == []
    assert await store.chats_of("bob") == []
    # Others are not concerned.
    chat = await new_chat(store, "alice", "carol")
    assert chat.participants == ("alice", "carol")
    await unblock(store, blocker, other)
    chat, created = await store.create_chat("bob", "alice")
    assert created
    await send(store, chat, other, "after the unblock")


async def test_an_existing_chat_is_not_created_again_while_blocked(
    store: Store, storage_config: StorageConfig
) -> None:
    chat = await new_chat(store, "alice", "bob")
    await send(store, chat, "alice", "before")
    await block(store, "bob", "alice")
    assert blocked_flag(storage_config, chat) == 1
    for creator, recipient in (("alice", "bob"), ("bob", "alice")):
        with refused_by_block("user_id"):
            await store.create_chat(creator, recipient)
    # The chat and its messages are kept, and the blocked user's chat list shows nothing new.
    assert await store.get_chat(chat.chat_id) == chat
    assert await contents(store, chat) == ["before"]
    for user in ("alice", "bob"):
        assert [view.chat_id for view in await store.chats_of(user)] == [chat.chat_id]
    await unblock(store, "bob", "alice")
    assert blocked_flag(storage_config, chat) == 0
    assert await store.create_chat("alice", "bob") == (chat, False)


@pytest.mark.parametrize("blocker", ["alice", "bob"])
async def test_messages_are_refused_both_ways_in_a_blocked_direct_chat(
    store: Store, handed: dict[Store, Handed], blocker: str
) -> None:
    commits = handed[store]
    chat = await new_chat(store, "alice", "bob")  # the Chat from before the block
    first = await send(store, chat, "alice", "one")
    second = await send(store, chat, "bob", "two")
    other = "bob" if blocker == "alice" else "alice"
    await block(store, blocker, other)
    commits.drain()
    for sender in ("alice", "bob"):
        with refused_by_block("chat_id"):
            await store.add_message(chat, sender, "refused", None)
        with refused_by_block("chat_id"):
            await store.add_message(chat, sender, "refused", f"key-{sender}")
    assert commits.drain() == []
    assert await all_messages(store, chat) == (first, second)
    # The refused ones took no seq, no version, and no client id: after the unblock the same
    # keys store new messages that continue the chat.
    await unblock(store, blocker, other)
    after, created = await store.add_message(chat, "bob", "three", "key-bob")
    assert created
    assert (after.seq, after.version) == (3, 3)
    assert commits.drain_messages() == [after]


async def test_an_edit_is_refused_and_a_delete_allowed_while_blocked(
    store: Store, handed: dict[Store, Handed]
) -> None:
    commits = handed[store]
    chat = await new_chat(store, "alice", "bob")
    mine = await send(store, chat, "alice", "mine")
    theirs = await send(store, chat, "bob", "theirs")
    await block(store, "bob", "alice")
    commits.drain()
    with refused_by_block("chat_id"):
        await store.edit_message(chat, "alice", mine.message_id, "edited")  # the blocked one
    with refused_by_block("chat_id"):
        await store.edit_message(chat, "bob", theirs.message_id, "edited")  # the blocker
    # Someone else's message: the usual rule answers first.
    with refused(ErrorCode.FORBIDDEN, "message_id"):
        await store.delete_message(chat, "alice", theirs.message_id)
    assert commits.drain() == []
    assert await all_messages(store, chat) == (mine, theirs)
    # Taking back what one wrote stays allowed, on both sides, once.
    deleted, changed = await store.delete_message(chat, "alice", mine.message_id)
    assert changed
    assert (deleted.deleted, deleted.content, deleted.version) == (True, "", 3)
    assert await store.delete_message(chat, "alice", mine.message_id) == (deleted, False)
    deleted_theirs, changed = await store.delete_message(chat, "bob", theirs.message_id)
    assert changed
    assert commits.drain_changes() == [(deleted, True), (deleted_theirs, True)]
    with refused(ErrorCode.BAD_REQUEST, "message_id"):  # a deleted message is not edited
        await store.edit_message(chat, "alice", mine.message_id, "edited")


async def test_a_block_both_ways_needs_both_lifted(
    store: Store, storage_config: StorageConfig
) -> None:
    chat = await new_chat(store, "alice", "bob")
    assert await block(store, "alice", "bob")
    assert await block(store, "bob", "alice")
    assert await store.block_relations("alice") == (frozenset({"bob"}), frozenset({"bob"}))
    assert await unblock(store, "alice", "bob")
    assert blocked_flag(storage_config, chat) == 1  # bob still blocks alice
    for sender in ("alice", "bob"):
        with refused_by_block("chat_id"):
            await store.add_message(chat, sender, "refused", None)
    with refused_by_block("user_id"):
        await store.create_chat("alice", "bob")
    assert await unblock(store, "bob", "alice")
    assert blocked_flag(storage_config, chat) == 0
    message = await send(store, chat, "alice", "free again")
    assert message.seq == 1
    assert flag_mismatches(storage_config) == []


async def test_groups_are_unaffected_by_a_block(
    store: Store, handed: dict[Store, Handed], storage_config: StorageConfig
) -> None:
    await block(store, "alice", "bob")
    group = await store.create_group("alice", "Team", ["bob", "carol"])
    assert group.participants == ("alice", "bob", "carol")
    from_bob = await send(store, group, "bob", "hi team")
    from_alice = await send(store, group, "alice", "hello")
    edited = await store.edit_message(group, "bob", from_bob.message_id, "hi all")
    assert edited.content == "hi all"
    other = await store.create_group("carol", "Other", ["dave"])
    view, changed = await store.add_members(other, "carol", ["alice", "bob"], 256)
    assert changed
    assert view.chat.participants == ("alice", "bob", "carol", "dave")
    assert await contents(store, group) == ["hi all", "hello"]
    assert from_alice.seq == 2
    # The flag lives on direct chats only: no group row carries it.
    assert rows(storage_config, "SELECT COUNT(*) FROM chats WHERE blocked <> 0") == [(0,)]
    with refused_by_block("user_id"):
        await store.create_chat("bob", "alice")


async def test_block_relations_read_both_directions(store: Store) -> None:
    await block(store, "alice", "bob")
    await block(store, "alice", "carol")
    await block(store, "dave", "alice")
    await block(store, "bob", "dave")
    assert await store.block_relations("alice") == (
        frozenset({"bob", "carol"}),
        frozenset({"dave"}),
    )
    assert await store.block_relations("bob") == (frozenset({"dave"}), frozenset({"alice"}))
    assert await store.block_relations("dave") == (frozenset({"alice"}), frozenset({"bob"}))
    assert await store.block_relations("erin") == (frozenset(), frozenset())
    assert await store.blocks_of("dave") == ("alice",)
    await unblock(store, "dave", "alice")
    assert await store.block_relations("alice") == (frozenset({"bob", "carol"}), frozenset())


async def test_blocks_and_writes_in_one_batch_apply_in_queue_order(
    store: Store, storage_config: StorageConfig
) -> None:
    chat = await new_chat(store, "alice", "bob")
    # A message queued before the block is stored; the one queued after it is refused.
    before, blocked, after = await in_one_batch(
        store,
        lambda: store.add_message(chat, "alice", "before", None),
        lambda: store.set_block("bob", "alice", True, MAX_BLOCKED),
        lambda: store.add_message(chat, "alice", "after", None),
    )
    assert before[1] is True
    assert blocked == (("alice",), True)
    assert isinstance(after, ProtocolError)
    assert (after.code, after.field) == (ErrorCode.FORBIDDEN, "chat_id")
    assert await contents(store, chat) == ["before"]
    # A chat created before a block in the same batch is created, and flagged by the block;
    # one queued after it is refused.
    created, blocked, elsewhere = await in_one_batch(
        store,
        lambda: store.create_chat("carol", "dave"),
        lambda: store.set_block("dave", "carol", True, MAX_BLOCKED),
        lambda: store.create_chat("erin", "dave"),  # not concerned: created
    )
    carol_dave, was_created = created
    assert was_created
    assert blocked == (("carol",), True)
    assert blocked_flag(storage_config, carol_dave) == 1
    erin_dave, was_created = elsewhere
    assert was_created
    assert blocked_flag(storage_config, erin_dave) == 0
    results = await in_one_batch(
        store,
        lambda: store.set_block("frank", "gina", True, MAX_BLOCKED),
        lambda: store.create_chat("gina", "frank"),
        lambda: store.set_block("frank", "gina", False, MAX_BLOCKED),
        lambda: store.create_chat("gina", "frank"),
    )
    assert results[0] == (("gina",), True)
    assert isinstance(results[1], ProtocolError)
    assert results[1].field == "user_id"
    assert results[2] == ((), True)
    frank_gina, was_created = results[3]
    assert was_created
    assert blocked_flag(storage_config, frank_gina) == 0
    assert flag_mismatches(storage_config) == []


async def test_a_resend_of_a_message_stored_before_the_block_answers_the_original(
    store: Store,
) -> None:
    """A client that lost the acknowledgement of a message sent before the block retries it:
    the message is stored, so the resend answers it (as everywhere else), not `forbidden`."""
    chat = await new_chat(store, "alice", "bob")
    original = await send(store, chat, "alice", "sent before", "key-1")
    await block(store, "bob", "alice")
    assert await store.add_message(chat, "alice", "sent before", "key-1") == (original, False)


# --------------------------------------------------------------------------- contacts


async def test_contacts_count_the_chats_shared_now(store: Store) -> None:
    await new_chat(store, "alice", "bob")
    await new_chat(store, "carol", "alice")
    await store.create_group("alice", "One", ["bob", "dave"])
    second = await store.create_group("alice", "Two", ["bob", "erin"])
    await store.create_group("bob", "Without alice", ["carol"])
    assert await store.contacts_of("alice") == {"bob": 3, "carol": 1, "dave": 1, "erin": 1}
    assert await store.contacts_of("bob") == {"alice": 3, "carol": 1, "dave": 1, "erin": 1}
    assert await store.contacts_of("erin") == {"alice": 1, "bob": 1}
    # A member removed, or who left, no longer counts.
    await store.remove_member(second, "alice", "erin")
    assert await store.contacts_of("alice") == {"bob": 3, "carol": 1, "dave": 1}
    assert await store.contacts_of("erin") == {}
    await store.remove_member(second, "bob", "bob")
    assert await store.contacts_of("alice") == {"bob": 2, "carol": 1, "dave": 1}
    # A block changes nobody's contacts (presence hides them; the chats stay shared).
    await block(store, "alice", "bob")
    assert (await store.contacts_of("alice"))["bob"] == 2
    assert await store.contacts_of("nobody") == {}


async def test_relations_of_reads_blocks_and_contacts_together(store: Store) -> None:
    await new_chat(store, "alice", "bob")
    await store.create_group("carol", "G", ["alice", "bob"])
    await block(store, "alice", "carol")
    await block(store, "dave", "alice")
    assert isinstance(store, SQLStore)  # both backends' (not part of the Store protocol)
    assert await store.relations_of("alice", with_contacts=True) == (
        frozenset({"carol"}),
        frozenset({"dave"}),
        {"bob": 2, "carol": 1},
    )
    assert await store.relations_of("alice", with_contacts=False) == (
        frozenset({"carol"}),
        frozenset({"dave"}),
        {},
    )


async def test_recent_contacts_newest_first_never_seen_last_and_limited(store: Store) -> None:
    for other in ("bob", "carol", "dave", "erin", "frank"):
        await new_chat(store, "alice", other)
    await store.create_group("alice", "G", ["gina"])
    await new_chat(store, "zara", "yann")  # not alice's contacts, though seen
    t0 = 1_780_000_000_000  # past 2**31: epoch milliseconds need 64 bits
    await store.save_last_seen(
        [("bob", t0 + 300), ("carol", t0 + 100), ("gina", t0 + 200), ("zara", t0 + 999)]
    )
    await store.save_last_seen([("yann", t0 + 998), ("alice", t0 + 5000)])
    everyone = [
        ("bob", t0 + 300),
        ("gina", t0 + 200),
        ("carol", t0 + 100),
        ("dave", None),
        ("erin", None),
        ("frank", None),
    ]
    assert await store.recent_contacts("alice", 200) == everyone
    for limit in (1, 2, 3, 4):
        assert await store.recent_contacts("alice", limit) == everyone[:limit]
    await store.save_last_seen([("frank", t0 + 400)])
    assert (await store.recent_contacts("alice", 2)) == [("frank", t0 + 400), ("bob", t0 + 300)]
    assert await store.recent_contacts("nobody", 10) == []


async def test_save_last_seen_only_moves_forward(store: Store, handed: dict[Store, Handed]) -> None:
    t0 = 1_780_000_000_000
    assert await store.last_seen_of(["bob"]) == {}
    await store.save_last_seen([("bob", t0 + 20)])
    await store.save_last_seen([("bob", t0 + 10)])  # an older time (a slower node)
    assert await store.last_seen_of(["bob"]) == {"bob": t0 + 20}
    await store.save_last_seen([("bob", t0 + 30), ("carol", t0 + 5)])
    await store.save_last_seen([("carol", t0 + 1), ("carol", t0 + 7)])  # one call, two times
    assert await store.last_seen_of(["bob", "carol", "dave"]) == {
        "bob": t0 + 30,
        "carol": t0 + 7,
    }
    await store.save_last_seen([])
    assert await store.last_seen_of([]) == {}
    many = [f"user-{index}" for index in range(250)]
    await store.save_last_seen([(user, t0 + index) for index, user in enumerate(many)])
    seen = await store.last_seen_of([*many, "nobody"])
    assert seen == {user: t0 + index for index, user in enumerate(many)}
    assert handed[store].drain() == []  # last_seen is no event


async def test_blocks_and_last_seen_survive_a_reopen(
    store: Store, opener: Callable[[], Awaitable[Store]]
) -> None:
    chat = await new_chat(store, "alice", "bob")
    await block(store, "bob", "alice")
    await store.save_last_seen([("alice", 1_780_000_000_123)])
    await store.aclose()
    reopened = await opener()
    assert await reopened.blocks_of("bob") == ("alice",)
    assert await reopened.last_seen_of(["alice"]) == {"alice": 1_780_000_000_123}
    with refused_by_block("chat_id"):
        await reopened.add_message(chat, "alice", "refused", None)


# --------------------------------------------------------------------------- PostgreSQL only


@pytest.fixture
def postgres_config() -> Iterator[StorageConfig]:
    with fresh_schema(database_url()) as dsn:
        yield StorageConfig(backend="postgres", dsn=dsn, pool_size=4)


async def _two_stores(config: StorageConfig, nursery: trio.Nursery) -> list[Store]:
    stores = [open_store(config) for _ in range(2)]
    for one in stores:
        await open_handing(one, nursery)
    return stores


@pytest.mark.scale
async def test_postgres_block_and_create_chat_racing_across_processes_never_leave_an_unflagged_chat(
    postgres_config: StorageConfig, nursery: trio.Nursery
) -> None:
    """Two stores (two processes' writers) race, per pair, a block against the creation of
    the pair's chat, many pairs at once, so each writer's batches mix both kinds. Either the
    block commits first and the chat is refused, or the chat commits first and the block
    flags it: never a chat created unflagged while a block exists."""
    stores = await _two_stores(postgres_config, nursery)
    outcomes = {"refused": 0, "created": 0}
    created: dict[str, Chat] = {}
    answers: list[tuple[ErrorCode, str | None]] = []
    start = trio.Event()

    async def blocker(a: str, b: str, one: Store) -> None:
        await start.wait()
        _, changed = await one.set_block(a, b, True, 10)
        assert changed

    async def creator(a: str, b: str, one: Store) -> None:
        await start.wait()
        try:
            chat, _ = await one.create_chat(a, b)
        except ProtocolError as error:
            answers.append((error.code, error.field))
            outcomes["refused"] += 1
        else:
            created[chat.chat_id] = chat
            outcomes["created"] += 1

    try:
        for round_ in range(6):
            start = trio.Event()
            with trio.fail_after(TIMEOUT_S * 2):
                async with trio.open_nursery() as racers:
                    for pair in range(40):
                        a, b = f"r{round_}a{pair}", f"r{round_}b{pair}"
                        who, whom = (b, a) if pair % 3 else (a, b)  # either way of the pair
                        racers.start_soon(blocker, who, whom, stores[pair % 2])
                        racers.start_soon(creator, a, b, stores[(pair + 1) % 2])
                    await trio.testing.wait_all_tasks_blocked()
                    start.set()
            assert flag_mismatches(postgres_config) == []
        # Every chat that won its race was created before its block: the block flagged it.
        assert rows(postgres_config, "SELECT COUNT(*) FROM chats WHERE blocked = 0") == [(0,)]
        for index, chat in enumerate(created.values()):
            for sender in chat.participants:
                with refused_by_block("chat_id"):
                    await stores[index % 2].add_message(chat, sender, "refused", None)
        assert sum(outcomes.values()) == 6 * 40
        assert answers == [(ErrorCode.FORBIDDEN, "user_id")] * outcomes["refused"]
    finally:
        for one in stores:
            await one.aclose()


@pytest.mark.scale
async def test_postgres_random_blocks_chats_and_messages_across_processes_keep_the_flag(
    postgres_config: StorageConfig, nursery: trio.Nursery
) -> None:
    """Blocks and unblocks both ways, chat creations and messages on a few pairs, from two
    stores at once in a seeded random order: afterwards every direct chat's flag is exactly
    whether a block stands between its pair, and no write failed for lock contention."""
    stores = await _two_stores(postgres_config, nursery)
    users = ["u0", "u1", "u2", "u3", "u4"]
    pairs = [(a, b) for index, a in enumerate(users) for b in users[index + 1 :]]
    chats: dict[tuple[str, str], Chat] = {}
    failures: list[BaseException] = []
    answers: list[tuple[ErrorCode, str]] = []
    try:

        async def worker(seed: int) -> None:
            rng = random.Random(seed)
            for _ in range(60):
                one = stores[rng.randrange(2)]
                a, b = rng.choice(pairs)
                if rng.random() < 0.5:
                    a, b = b, a
                action = rng.randrange(4)
                try:
                    if action == 0:
                        await one.set_block(a, b, True, 10)
                    elif action == 1:
                        await one.set_block(a, b, False, 10)
                    elif action == 2:
                        chat, _ = await one.create_chat(a, b)
                        chats[min(a, b), max(a, b)] = chat
                    else:
                        chat = chats.get((min(a, b), max(a, b)))
                        if chat is not None:
                            await one.add_message(chat, a, "hi", None)
                except ProtocolError as error:
                    answers.append((error.code, error.message))
                except Exception as error:  # e.g. StoreUnavailable: too much lock contention
                    failures.append(error)

        with trio.fail_after(TIMEOUT_S * 3):
            async with trio.open_nursery() as workers:
                for seed in range(16):
                    workers.start_soon(worker, seed)
        assert failures == []
        assert set(answers) <= {(ErrorCode.FORBIDDEN, BLOCK_IN_PLACE)}
        assert flag_mismatches(postgres_config) == []
        assert chats  # the race created chats to check
    finally:
        for one in stores:
            await one.aclose()


# --------------------------------------------------------------------------- upgrade from 5

# A database as schema version 5 (groups, before blocking) left it: direct chats with
# numbered, edited and deleted messages, a group with a member who joined late (and one who
# was removed: no row), each member's marks. Migration 6 must keep every row as it is, give
# every chat `blocked` = 0, and leave blocks and last-seen times usable.
_T0: Final = 1_780_000_000_000
# (id, user_a, user_b, created_by, created_at, last_message, kind, title, last_seq, version)
_V5_CHATS: Final = (
    (1, "alice", "bob", "alice", _T0, _T0 + 40, "direct", None, 3, 4),
    (2, "alice", "carol", "carol", _T0 + 1, 0, "direct", None, 0, 0),
    (3, None, None, "alice", _T0 + 2, _T0 + 70, "group", "Team", 3, 4),
    (4, "bob", "erin", "erin", _T0 + 3, _T0 + 50, "direct", None, 1, 1),
)
_V5_ACTIVITY: Final = (2, 4, 1, 3)  # the order of activity, oldest first
# (id, chat, sender, recipient, content, at, client id, seq, version, edited at, deleted,
# changed)
_V5_MESSAGES: Final = (
    (1, 1, "alice", "bob", "hi bob", _T0 + 10, None, 1, 1, None, 0, 0),
    (2, 1, "bob", "alice", "hello 😀\x00", _T0 + 20, "c-b1", 2, 2, None, 0, 0),
    (3, 3, "bob", "", "team!", _T0 + 30, None, 1, 1, None, 0, 0),
    (4, 1, "alice", "bob", "edited text", _T0 + 40, "c-a2", 3, 4, _T0 + 45, 0, 1),
    (5, 4, "erin", "bob", "hey", _T0 + 50, None, 1, 1, None, 0, 0),
    (6, 3, "dave", "", "joined", _T0 + 60, None, 2, 2, None, 0, 0),
    (7, 3, "alice", "", "", _T0 + 70, None, 3, 4, None, 1, 1),
)
# (chat, user, chat delivered, delivered seq, delivered at, read seq, read at, version mark,
# joined seq)
_V5_MEMBERS: Final = (
    (1, "alice", 1, 3, _T0 + 40, 3, _T0 + 40, 4, 0),
    (1, "bob", 1, 2, _T0 + 20, 2, _T0 + 20, 2, 0),
    (2, "alice", 0, 0, 0, 0, 0, 0, 0),
    (2, "carol", 1, 0, 0, 0, 0, 0, 0),
    (3, "alice", 1, 3, _T0 + 70, 3, _T0 + 70, 4, 0),
    (3, "bob", 1, 2, _T0 + 60, 1, _T0 + 30, 2, 0),
    (3, "dave", 1, 2, _T0 + 60, 2, _T0 + 60, 2, 1),
    (4, "bob", 0, 0, 0, 0, 0, 0, 0),
    (4, "erin", 1, 1, _T0 + 50, 1, _T0 + 50, 1, 0),
)
_V5_TABLES: Final = {"chats": "id", "messages": "id", "members": "chat_id, user_id"}
_MESSAGE_INSERT: Final = (
    "INSERT INTO messages (chat_id, sender_id, recipient_id, content, created_at_ms,"
    " client_message_id, seq, version, edited_at_ms, deleted, changed, delivered)"
    " VALUES ({}, TRUE)"
)
_MEMBER_INSERT: Final = (
    "INSERT INTO members (chat_id, user_id, chat_delivered, delivered_seq, delivered_at_ms,"
    " read_seq, read_at_ms, version_mark, joined_seq) VALUES ({})"
)


def _write_v5_sqlite(path: Path) -> None:
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        for version, statements in enumerate(SQLITE_MIGRATIONS[:5], start=1):
            for statement in statements:
                db.execute(statement)
            db.execute("INSERT INTO schema_version (version) VALUES (?)", (version,))
        for chat_id, a, b, creator, created, last, kind, title, *tail in _V5_CHATS:
            db.execute(
                "INSERT INTO chats (id, user_a, user_b, created_by, created_at_ms,"
                " last_message_ms, last_activity_ms, a_delivered, b_delivered, kind, title,"
                " last_seq, version) VALUES (?, ?, ?, ?, ?, ?, ?, 1, 1, ?, ?, ?, ?)",
                (chat_id, a, b, creator, created, last, max(created, last), kind, title, *tail),
            )
        for seq, chat_id in enumerate(_V5_ACTIVITY, start=1):
            db.execute("UPDATE chats SET activity_seq = ? WHERE id = ?", (seq, chat_id))
        for message_id, *values in _V5_MESSAGES:
            cursor = db.execute(_MESSAGE_INSERT.format(", ".join("?" * 11)), values)
            assert cursor.lastrowid == message_id
        for member in _V5_MEMBERS:
            db.execute(_MEMBER_INSERT.format(", ".join("?" * 9)), member)
    finally:
        db.close()


def _write_v5_postgres(dsn: str) -> None:
    """The same database in PostgreSQL's types (the identity columns give the ids above)."""
    with psycopg.connect(dsn, autocommit=True) as db:
        db.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        for version, statements in enumerate(POSTGRES_MIGRATIONS[:5], start=1):
            for statement in statements:
                db.execute(statement)
            db.execute("INSERT INTO schema_version (version) VALUES (%s)", (version,))
        for chat_id, a, b, creator, created, last, kind, title, last_seq, version in _V5_CHATS:
            row = db.execute(
                "INSERT INTO chats (user_a, user_b, created_by, created_at_ms, last_message_ms,"
                " last_activity_ms, a_delivered, b_delivered, kind, title, last_seq, version)"
                " VALUES (%s, %s, %s, %s, %s, %s, TRUE, TRUE, %s, %s, %s, %s) RETURNING id",
                (a, b, creator, created, last, max(created, last), kind, title, last_seq, version),
            ).fetchone()
            assert row == (chat_id,)
        for chat_id in _V5_ACTIVITY:
            db.execute(
                "UPDATE chats SET activity_seq = nextval('chat_activity_seq') WHERE id = %s",
                (chat_id,),
            )
        for message_id, chat_id, *values in _V5_MESSAGES:
            content, key = values[2], values[4]
            values[2], values[4] = content.encode(), None if key is None else key.encode()
            row = db.execute(
                _MESSAGE_INSERT.format(", ".join(["%s"] * 11)) + " RETURNING id",
                (chat_id, *values),
            ).fetchone()
            assert row == (message_id,)
            seq = values[5]
            db.execute(
                "UPDATE chats SET last_message_id = %s WHERE id = %s AND last_seq = %s",
                (message_id, chat_id, seq),
            )
        for member in _V5_MEMBERS:
            db.execute(_MEMBER_INSERT.format(", ".join(["%s"] * 9)), member)


def _snapshot(config: StorageConfig) -> dict[str, tuple[list[str], list[tuple[Any, ...]]]]:
    """Every row of the tables of schema 5, with their column names."""
    snapshot = {}
    for table, order in _V5_TABLES.items():
        if config.backend == "sqlite":
            db = sqlite3.connect(config.path)
            try:
                cursor = db.execute(f"SELECT * FROM {table} ORDER BY {order}")
                names = [column[0] for column in cursor.description]
                snapshot[table] = (names, [tuple(row) for row in cursor.fetchall()])
            finally:
                db.close()
        else:
            with psycopg.connect(config.dsn, autocommit=True) as connection:
                result = connection.execute(f"SELECT * FROM {table} ORDER BY {order}")
                assert result.description is not None
                names = [column.name for column in result.description]
                snapshot[table] = (names, [tuple(row) for row in result.fetchall()])
    return snapshot


def _the_same_rows(
    before: dict[str, tuple[list[str], list[tuple[Any, ...]]]],
    after: dict[str, tuple[list[str], list[tuple[Any, ...]]]],
) -> None:
    """Every row of `before` is in `after`, column for column; `after` adds `chats.blocked`
    (0 everywhere) and nothing else."""
    for table, (names, old_rows) in before.items():
        new_names, new_rows = after[table]
        added = [name for name in new_names if name not in names]
        assert added == (["blocked"] if table == "chats" else []), table
        kept = [tuple(row[new_names.index(name)] for name in names) for row in new_rows]
        assert kept == old_rows, table
        if table == "chats":
            assert [row[new_names.index("blocked")] for row in new_rows] == [0] * len(new_rows)


async def _check_upgraded_from_v5(store: Store, config: StorageConfig) -> None:
    """The old data reads as before; blocks, contacts and last-seen times work on it."""
    alice_bob = Chat("1", ("alice", "bob"), "alice", format_ms(_T0))
    group = await store.get_chat("3")
    assert group == Chat(
        "3", ("alice", "bob", "dave"), "alice", format_ms(_T0 + 2), "group", "Team"
    )
    assert await store.get_chat("1") == alice_bob
    page = [
        (m.message_id, m.seq, m.content, m.edited_at) for m in await all_messages(store, alice_bob)
    ]
    assert page == [
        ("1", 1, "hi bob", None),
        ("2", 2, "hello 😀\x00", None),
        ("4", 3, "edited text", format_ms(_T0 + 45)),
    ]
    assert [view.chat_id for view in await store.chats_of("alice")] == ["3", "1", "2"]
    assert [view.chat_id for view in await store.chats_of("bob")] == ["3", "1", "4"]
    assert await store.contacts_of("alice") == {"bob": 2, "carol": 1, "dave": 1}
    assert await store.contacts_of("bob") == {"alice": 2, "dave": 1, "erin": 1}
    # Nobody blocks anybody yet, and the old chats take new messages.
    assert await store.block_relations("alice") == (frozenset(), frozenset())
    message = await send(store, alice_bob, "bob", "after the upgrade")
    assert (message.seq, message.version) == (4, 5)
    # A block on an old chat flags it; its pair can neither write nor create it again; the
    # group goes on.
    assert await store.set_block("bob", "alice", True, MAX_BLOCKED) == (("alice",), True)
    assert blocked_flag(config, alice_bob) == 1
    with refused_by_block("chat_id"):
        await store.add_message(alice_bob, "alice", "refused", None)
    with refused_by_block("user_id"):
        await store.create_chat("alice", "bob")
    assert group is not None
    in_group = await send(store, group, "alice", "still here")
    assert (in_group.seq, in_group.version) == (4, 5)
    # Old client ids still make resends idempotent once the block is lifted.
    assert await store.set_block("bob", "alice", False, MAX_BLOCKED) == ((), True)
    resent, created = await store.add_message(alice_bob, "bob", "again", "c-b1")
    assert (resent.message_id, created) == ("2", False)
    await store.save_last_seen([("carol", _T0 + 900), ("bob", _T0 + 800)])
    assert await store.recent_contacts("alice", 10) == [
        ("carol", _T0 + 900),
        ("bob", _T0 + 800),
        ("dave", None),
    ]
    assert await store.last_seen_of(["bob", "dave"]) == {"bob": _T0 + 800}
    assert flag_mismatches(config) == []


async def test_sqlite_upgrade_from_version_5_keeps_every_row(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    config = StorageConfig(backend="sqlite", path=tmp_path / "v5.db")
    _write_v5_sqlite(config.path)
    before = _snapshot(config)
    store = open_store(config)
    commits = await open_handing(store, nursery)
    try:
        with trio.fail_after(TIMEOUT_S):
            _the_same_rows(before, _snapshot(config))
            assert rows(config, "SELECT COUNT(*) FROM blocks") == [(0,)]
            assert rows(config, "SELECT COUNT(*) FROM presence") == [(0,)]
            assert commits.drain() == []  # the upgrade hands nothing over
            await _check_upgraded_from_v5(store, config)
    finally:
        await store.aclose()
    versions = rows(config, "SELECT version FROM schema_version ORDER BY version")
    assert versions == [(version,) for version in range(1, len(SQLITE_MIGRATIONS) + 1)]
    assert len(SQLITE_MIGRATIONS) == 7  # (7, webhooks: tests/test_webhooks.py upgrades from 6)
    assert rows(config, "PRAGMA integrity_check") == [("ok",)]
    assert rows(config, "PRAGMA foreign_key_check") == []


@pytest.mark.scale
async def test_postgres_upgrade_from_version_5_keeps_every_row(
    postgres_config: StorageConfig, nursery: trio.Nursery
) -> None:
    _write_v5_postgres(postgres_config.dsn)
    before = _snapshot(postgres_config)
    store = open_store(postgres_config)
    commits = await open_handing(store, nursery)
    try:
        with trio.fail_after(TIMEOUT_S):
            _the_same_rows(before, _snapshot(postgres_config))
            assert rows(postgres_config, "SELECT COUNT(*) FROM blocks") == [(0,)]
            assert rows(postgres_config, "SELECT COUNT(*) FROM presence") == [(0,)]
            assert commits.drain() == []
            await _check_upgraded_from_v5(store, postgres_config)
    finally:
        await store.aclose()
    versions = rows(postgres_config, "SELECT version FROM schema_version ORDER BY version")
    assert versions == [(version,) for version in range(1, len(POSTGRES_MIGRATIONS) + 1)]
    assert len(POSTGRES_MIGRATIONS) == 7
