"""The group-commit writer (`handler.store.group_commit`): its bounded queue, the hand-off to
the `commits` channel, and what it does when something around it fails.

The store tests run on SQLite and on PostgreSQL (marked `scale`; skipped, naming
`CHAT_TEST_DATABASE_URL`, when it is unset). They hold the writer still with its
`after_commit` test hook (`Gate`: the batch is committed, its hand-off and its callers wait)
or with a full `commits` channel, and observe with `wait_all_tasks_blocked`, never a sleep.
The writer tests at the end run it over a fake backend, on both thread mechanisms.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Final, Protocol, Unpack

import pytest
import test_store_contract
import trio
import trio.testing
from test_store_contract import Handed

from handler.config import StorageConfig
from handler.errors import StoreUnavailable
from handler.protocol import Chat, Message
from handler.session.outgoing import SeqMark
from handler.store.base import Committed, Origin
from handler.store.group_commit import (
    BatchThread,
    DedicatedThread,
    GroupCommitWriter,
    Op,
    WorkerThread,
    WriterOptions,
)
from handler.store.postgres import PostgresStore
from handler.store.sql_store import SQLStore
from handler.store.sqlite import SQLiteStore

TIMEOUT_S: Final = 20.0
IDLE_CUSHION_S: Final = 0.001


def mark_of(message: Message) -> SeqMark:
    """What a frame carrying `message` delivers."""
    return SeqMark(message.chat_id, message.seq, message.message_id, message.version)


# How long a held writer thread waits for its gate before it lets itself go, so a failing
# test cannot leave a thread blocked for ever.
GATE_LIMIT_S: Final = 30.0

Receiver = trio.MemoryReceiveChannel[Committed]


class Opener(Protocol):
    def __call__(
        self, capacity: int = ..., **options: Unpack[WriterOptions]
    ) -> Awaitable[tuple[SQLStore[Any], Receiver]]: ...


class Gate:
    """The `after_commit` hook that holds the writer's thread until `open()`: the batch is
    committed, while its hand-off and its callers wait. `held` is set once it held one."""

    def __init__(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._open = threading.Event()
        self.held = trio.Event()
        self.threads: set[str] = set()

    def __call__(self) -> None:  # in the writer's thread
        self.threads.add(threading.current_thread().name)
        if not self._open.is_set():
            self._token.run_sync_soon(self.held.set)
            self._open.wait(GATE_LIMIT_S)

    def open(self) -> None:
        self._open.set()


async def until(condition: Callable[[], bool]) -> None:
    """Return once `condition()` holds (under the caller's `fail_after`). It is checked each
    time every task is blocked: a writer waiting for its thread counts as blocked, so this
    goes round until the thread has reported back and the writer moved on.

    Each round waits for the tasks to stay blocked for `IDLE_CUSHION_S`, spent in the event
    loop's poll with the GIL released. Without it the loop spins, and the writer's thread
    waits for the GIL at every SQLite call: under coverage on a loaded machine a batch took
    five times longer, and once in CI longer than `TIMEOUT_S`."""
    while not condition():
        await trio.testing.wait_all_tasks_blocked(IDLE_CUSHION_S)


def drain(receive: Receiver) -> list[Committed]:
    """What was handed over and not read yet, in order."""
    return Handed(receive).drain()


def messages(handed: list[Committed]) -> list[Message]:
    return [commit.message for commit in handed if commit.message is not None]


def ids(messages: list[Message]) -> list[int]:
    return [int(message.message_id) for message in messages]


# --------------------------------------------------------------------------- stores


# The contract suite's backends: SQLite, and PostgreSQL in a fresh schema (or skipped).
storage_config = test_store_contract.storage_config


@pytest.fixture
async def opener(storage_config: StorageConfig, nursery: trio.Nursery) -> AsyncIterator[Opener]:
    """Opens a store of the backend with a `commits` channel of `capacity`; yields the store
    and the channel's receive end."""
    opened: list[tuple[SQLStore[Any], Receiver]] = []

    async def open_one(
        capacity: int = 64, **options: Unpack[WriterOptions]
    ) -> tuple[SQLStore[Any], Receiver]:
        store: SQLStore[Any]
        if storage_config.backend == "sqlite":
            store = SQLiteStore(storage_config, **options)
        else:
            store = PostgresStore(storage_config, **options)
        send, receive = trio.open_memory_channel[Committed](capacity)
        await store.open(nursery, send)
        opened.append((store, receive))
        return store, receive

    yield open_one
    with trio.fail_after(TIMEOUT_S):
        for store, receive in opened:
            receive.close()  # a writer waiting to hand over moves on
            await store.aclose()


@pytest.fixture
async def gate(opener: Opener) -> AsyncIterator[Gate]:
    """A `Gate`, opened at teardown (before the stores close: it depends on `opener`)."""
    held = Gate()
    yield held
    held.open()


async def test_a_full_queue_makes_writers_wait_and_loses_nothing(
    opener: Opener, gate: Gate
) -> None:
    store, receive = await opener(max_queued=2)
    chat, _ = await store.create_chat("alice", "bob")
    drain(receive)
    store.writer.after_commit = gate
    results: list[tuple[Message, bool]] = []

    async def send(index: int) -> None:
        results.append(await store.add_message(chat, "alice", f"m{index}", f"k{index}"))

    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as senders:
            senders.start_soon(send, 0)
            await gate.held.wait()  # m0 is committed; the writer is held before its hand-off
            for index in range(1, 11):
                senders.start_soon(send, index)
            await trio.testing.wait_all_tasks_blocked()
            statistics = store.writer.statistics()
            assert (statistics.queued, statistics.max_queued) == (2, 2)
            assert statistics.senders_waiting == 8  # waiting for room, not refused
            assert results == []
            gate.open()
    assert len(results) == 11
    assert all(created for _, created in results)
    page, _ = await store.messages_before(chat.chat_id, None, 100) or ((), False)
    assert sorted(m.content for m in page) == sorted(f"m{index}" for index in range(11))
    handed = messages(drain(receive))
    assert sorted(handed, key=lambda m: m.message_id) == sorted(
        (m for m, _ in results), key=lambda m: m.message_id
    )
    assert ids(handed) == sorted(ids(handed))  # in commit order


async def test_mark_delivered_waits_for_room_and_is_not_dropped(opener: Opener, gate: Gate) -> None:
    store, _ = await opener(max_queued=1)
    chat, _ = await store.create_chat("alice", "bob")
    message, _ = await store.add_message(chat, "alice", "hi", None)
    store.writer.after_commit = gate
    marked = trio.Event()

    async def mark() -> None:
        await store.mark_delivered("bob", [chat.chat_id], [mark_of(message)])
        marked.set()

    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as writers:
            writers.start_soon(store.add_message, chat, "bob", "held", None)
            await gate.held.wait()
            writers.start_soon(store.add_message, chat, "bob", "queued", None)
            await trio.testing.wait_all_tasks_blocked()  # the queue is full
            writers.start_soon(mark)
            await trio.testing.wait_all_tasks_blocked()
            assert not marked.is_set()
            assert store.writer.statistics().senders_waiting == 1
            gate.open()
        await store.flush()  # raises if a mark queued before was lost
    assert store.writer.lost_marks == 0
    backlog = await store.backlog("bob")
    assert backlog.chats == ()
    assert backlog.message_ids == set()


async def test_mark_delivered_returns_before_its_commit(opener: Opener, gate: Gate) -> None:
    store, _ = await opener()
    chat, _ = await store.create_chat("alice", "bob")
    message, _ = await store.add_message(chat, "alice", "hi", None)
    store.writer.after_commit = gate
    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as writers:
            writers.start_soon(store.add_message, chat, "alice", "held", None)
            await gate.held.wait()
            # Returns although the writer is held: queued, not committed.
            await store.mark_delivered("bob", [chat.chat_id], [mark_of(message)])
            assert store.writer.statistics().queued == 1
            assert message.message_id in (await store.backlog("bob")).message_ids
            gate.open()
        await store.flush()
    assert message.message_id not in (await store.backlog("bob")).message_ids


async def test_a_full_commits_channel_holds_the_writer_and_order_survives(
    opener: Opener,
) -> None:
    store, receive = await opener(capacity=1)
    chat, _ = await store.create_chat("alice", "bob")  # the channel is full from here
    batches = store.writer.batches
    returned: list[Message] = []

    async def send(index: int) -> None:
        message, created = await store.add_message(
            chat, ("alice", "bob")[index % 2], f"{index}", None
        )
        assert created
        returned.append(message)

    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as senders:
            for index in range(20):
                senders.start_soon(send, index)
            await until(lambda: receive.statistics().tasks_waiting_send == 1)
            await trio.testing.wait_all_tasks_blocked()
            # One batch is committed; the writer waits to hand it over, and so its callers
            # (and everyone queued behind them) wait too: backpressure, nothing dropped.
            assert store.writer.batches == batches + 1
            assert receive.statistics().tasks_waiting_send == 1
            assert returned == []
            received = [await receive.receive() for _ in range(21)]
    assert received[0] == Committed(chat)
    handed = messages(received[1:])
    assert len(handed) == 20
    assert ids(handed) == sorted(ids(handed))  # commit order
    assert sorted(ids(handed)) == sorted(ids(returned))
    assert drain(receive) == []


async def test_new_chats_and_messages_are_handed_over_and_resends_are_not(
    opener: Opener,
) -> None:
    store, receive = await opener()
    origin = Origin("connection-1", 1)
    chat, created = await store.create_chat("alice", "bob", origin)
    assert created
    assert drain(receive) == [Committed(chat, origin)]
    again, created = await store.create_chat("bob", "alice", Origin("connection-2", 2))
    assert (again, created) == (chat, False)
    assert drain(receive) == []  # an existing chat is not handed over again

    first, created = await store.add_message(chat, "alice", "one", "k1", origin)
    assert created
    resend, created = await store.add_message(chat, "alice", "one again", "k1", Origin("c-3"))
    assert (resend, created) == (first, False)
    assert drain(receive) == [Committed(chat, origin, first)]

    # Resends queued together with their original (one batch): still only one hand-off, with
    # the origin of the write that created the message.
    results: list[tuple[Origin, Message, bool]] = []

    async def send(index: int) -> None:
        request = Origin("connection-4", index)
        message, created = await store.add_message(chat, "bob", "same", "k2", request)
        results.append((request, message, created))

    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as senders:
            for index in range(5):
                senders.start_soon(send, index)
    (winner,) = [(request, message) for request, message, created in results if created]
    assert drain(receive) == [Committed(chat, winner[0], winner[1])]
    assert winner[1].version == first.version + 1  # the next change of the chat
    assert {message for _, message, _ in results} == {winner[1]}


async def test_a_closed_receive_end_does_not_break_writes(
    opener: Opener, caplog: pytest.LogCaptureFixture
) -> None:
    store, receive = await opener()
    receive.close()  # the fan-out is gone
    with caplog.at_level(logging.WARNING, logger="handler.store"):
        chat, created = await store.create_chat("alice", "bob")
        assert created
        sent = []
        for index in range(3):
            message, created = await store.add_message(chat, "alice", f"m{index}", None)
            assert created
            sent.append(message)
    warnings = [r for r in caplog.records if r.name == "handler.store"]
    assert len(warnings) == 1  # said once
    assert warnings[0].levelno == logging.WARNING
    assert await store.messages_before(chat.chat_id, None, 10) == (tuple(sent), False)
    # The backlog delivers what the fan-out never saw.
    backlog = await store.backlog("bob")
    assert backlog.chat_ids == {chat.chat_id}
    assert backlog.message_ids == {m.message_id for m in sent}


async def test_closing_drains_the_queue_then_closes_commits(opener: Opener, gate: Gate) -> None:
    store, receive = await opener()
    chat, _ = await store.create_chat("alice", "bob")
    drain(receive)
    store.writer.after_commit = gate
    results: list[Message] = []
    closed = trio.Event()

    async def send(index: int) -> None:
        message, created = await store.add_message(chat, "alice", f"m{index}", None)
        assert created
        results.append(message)

    async def close() -> None:
        await store.aclose()
        closed.set()

    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as tasks:
            tasks.start_soon(send, 0)
            await gate.held.wait()
            for index in range(1, 6):
                tasks.start_soon(send, index)
            await trio.testing.wait_all_tasks_blocked()
            tasks.start_soon(close)
            await trio.testing.wait_all_tasks_blocked()
            assert not closed.is_set()  # waits for the queue to drain
            with pytest.raises(StoreUnavailable):  # but takes no new writes
                await store.add_message(chat, "alice", "late", None)
            gate.open()
        handed = [commit async for commit in receive]  # ends: the store closed the channel
    assert len(results) == 6
    assert messages(handed) == sorted(results, key=lambda m: int(m.message_id))


# --------------------------------------------------------------------------- the writer alone

CHAT: Final = Chat("1", ("alice", "bob"), "alice", "2024-01-01T00:00:00.000Z")


class Echo(Op):
    """A fake write: its result is `value`, and it "creates" a chat when `creates`."""

    def __init__(self, value: int, *, creates: bool = False) -> None:
        super().__init__()
        self.value = value
        self.creates = creates


def echo_apply(batch: list[Echo]) -> str | None:
    """Odd values fail (one op's fault); the rest succeed."""
    for op in batch:
        op.reset()
        if op.value % 2:
            op.fail(ValueError(f"odd {op.value}"))
            continue
        op.result = op.value
        if op.creates:
            op.committed = Committed(CHAT, Origin(str(op.value)))
    return None


@pytest.fixture(params=["dedicated", "worker"])
def batch_thread(request: pytest.FixtureRequest) -> BatchThread:
    return DedicatedThread("test-writer") if request.param == "dedicated" else WorkerThread()


async def test_results_and_errors_are_per_op(batch_thread: BatchThread) -> None:
    writer = GroupCommitWriter[Echo](echo_apply, batch_thread)
    send, receive = trio.open_memory_channel[Committed](8)
    outcomes: dict[int, object] = {}

    async def submit(value: int) -> None:
        try:
            outcomes[value] = await writer.submit(Echo(value, creates=True))
        except ValueError as error:
            outcomes[value] = str(error)

    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            await nursery.start(writer.run, send)
            async with trio.open_nursery() as submitters:
                for value in range(6):
                    submitters.start_soon(submit, value)
            await writer.aclose()
    assert outcomes == {0: 0, 1: "odd 1", 2: 2, 3: "odd 3", 4: 4, 5: "odd 5"}
    # Only what succeeded was handed over; the channel was closed with the writer.
    assert sorted(commit.origin.connection_id or "" for commit in drain(receive)) == [
        "0",
        "2",
        "4",
    ]
    with pytest.raises(trio.EndOfChannel):
        receive.receive_nowait()


async def test_a_raising_apply_fails_its_batch_not_the_writer(
    batch_thread: BatchThread, caplog: pytest.LogCaptureFixture
) -> None:
    calls = 0

    def apply(batch: list[Echo]) -> str | None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("a bug")
        return echo_apply(batch)

    writer = GroupCommitWriter[Echo](apply, batch_thread)
    with trio.fail_after(TIMEOUT_S), caplog.at_level(logging.ERROR, logger="handler.store"):
        async with trio.open_nursery() as nursery:
            await nursery.start(writer.run)
            with pytest.raises(StoreUnavailable, match="outcome unknown"):
                await writer.submit(Echo(0))
            assert writer.write_failure is not None
            assert await writer.submit(Echo(2)) == 2  # the writer lives on
            await writer.aclose()
    assert any("writer failed a batch" in record.getMessage() for record in caplog.records)


async def test_the_hook_runs_off_the_trio_thread_and_cannot_break_the_writer(
    batch_thread: BatchThread, caplog: pytest.LogCaptureFixture
) -> None:
    writer = GroupCommitWriter[Echo](echo_apply, batch_thread)
    threads: list[threading.Thread] = []

    def hook() -> None:
        threads.append(threading.current_thread())
        raise RuntimeError("a broken hook")

    writer.after_commit = hook
    with trio.fail_after(TIMEOUT_S), caplog.at_level(logging.ERROR, logger="handler.store"):
        async with trio.open_nursery() as nursery:
            await nursery.start(writer.run)
            assert await writer.submit(Echo(4)) == 4
            assert await writer.submit(Echo(6)) == 6
            await writer.aclose()
    assert len(threads) == 2
    assert threading.main_thread() not in threads
    assert writer.write_failure is None
    assert sum("after_commit" in record.getMessage() for record in caplog.records) == 2


async def test_a_cancelled_writer_fails_what_is_still_queued(batch_thread: BatchThread) -> None:
    writer = GroupCommitWriter[Echo](echo_apply, batch_thread, max_batch=1)
    gate = Gate()
    writer.after_commit = gate
    outcomes: dict[int, object] = {}

    async def submit(value: int) -> None:
        try:
            outcomes[value] = await writer.submit(Echo(value))
        except StoreUnavailable as error:
            outcomes[value] = type(error)

    try:
        with trio.fail_after(TIMEOUT_S):
            async with trio.open_nursery() as submitters, trio.open_nursery() as running:
                await running.start(writer.run)
                submitters.start_soon(submit, 0)
                await gate.held.wait()
                submitters.start_soon(submit, 2)
                submitters.start_soon(submit, 4)
                await trio.testing.wait_all_tasks_blocked()
                running.cancel_scope.cancel()  # the batch in the thread is shielded
                gate.open()
    finally:
        gate.open()
    # The committed batch was reported as committed; what was queued failed, no one hangs.
    assert outcomes == {0: 0, 2: StoreUnavailable, 4: StoreUnavailable}
    with pytest.raises(StoreUnavailable):
        await writer.submit(Echo(8))


async def test_a_writer_that_never_ran_refuses_writes() -> None:
    writer = GroupCommitWriter[Echo](echo_apply, WorkerThread())
    with pytest.raises(StoreUnavailable, match="not open"):
        await writer.submit(Echo(0))
    with pytest.raises(StoreUnavailable, match="not open"):
        await writer.enqueue(Echo(0))
    await writer.aclose()  # returns at once


def test_bounds_must_be_positive() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        GroupCommitWriter[Echo](echo_apply, WorkerThread(), max_queued=0)
