"""End to end: per-user delivery, the offline backlog, multi-device, exactly-once reconnects.

"Delivered" (PROTOCOL.md) means written to at least one open connection of the user, or
returned by a fetch. A message written to a connection that then closes counts as delivered
even if the client never read it; that is why the reconnect tests use `RawClient`, whose
`close_and_drain()` reads everything the server wrote before its close frame, so the test sees
exactly what the server wrote and can demand "exactly once" without any slack.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import pytest
import trio
from support import (
    Frame,
    RunningServer,
    backlog_messages,
    expect_silence,
    static,
    wait_committed,
    wait_marked,
    wait_nothing_pending,
    wait_until,
)

from handler.store.sqlite import SQLiteStore


@contextmanager
def slow_commits(server: RunningServer, delay: Callable[[], float]) -> Iterator[None]:
    """Widen the window between COMMIT and the hand-off to the fan-out of the SQLite store.

    The store contract lets that window exist (commits are handed over after COMMIT, in commit
    order, before the writing task resumes); a worker-thread pause after each commit (the
    writer's `after_commit` test hook) keeps the contract and makes the window long enough to
    hit on purpose.
    """
    services = server.app.services
    assert services is not None
    store = services.store
    assert isinstance(store, SQLiteStore)
    writer = store.writer
    original = writer.after_commit
    writer.after_commit = lambda: time.sleep(delay())
    try:
        yield
    finally:
        writer.after_commit = original


def ids(frames: list[Frame]) -> list[str]:
    return [f["message_id"] for f in frames]


def id_key(message_id: str) -> tuple[int, str]:
    return len(message_id), message_id


async def test_offline_backlog_order(server: RunningServer) -> None:
    async with server.connect("carol") as carol, server.connect("alice") as alice:
        carols_chat = await carol.create_chat("bob")  # created first, first message later
        alices_chat = await alice.create_chat("bob")
        daves_chat_owner = carol  # carol also opens an empty chat with dave
        await daves_chat_owner.create_chat("dave")
        a1 = await alice.send_message(alices_chat["chat_id"], "bob", "a1")
        c1 = await carol.send_message(carols_chat["chat_id"], "bob", "c1")
        a2 = await alice.send_message(alices_chat["chat_id"], "bob", "a2")
        c2 = await carol.send_message(carols_chat["chat_id"], "bob", "c2")
        # bob's own message in a chat is not part of his backlog
    async with server.connect("bob") as bob:
        backlog = bob.backlog
        assert [f["type"] for f in backlog] == ["new_chats", "new_messages", "new_messages"]
        # oldest first; chat objects carry the state for bob (two unread each)
        assert [static(chat) for chat in backlog[0]["data"]] == [
            static(carols_chat),
            static(alices_chat),
        ]
        assert [chat["unread_count"] for chat in backlog[0]["data"]] == [2, 2]
        # Chats in the order of their oldest undelivered message, each oldest first.
        assert backlog[1]["chat_id"] == alices_chat["chat_id"]
        assert ids(backlog[1]["data"]) == [a1["message_id"], a2["message_id"]]
        assert backlog[2]["chat_id"] == carols_chat["chat_id"]
        assert ids(backlog[2]["data"]) == [c1["message_id"], c2["message_id"]]
        expected = {k: v for k, v in a1.items() if k not in ("type", "request_id")}
        assert backlog[1]["data"][0] == expected
        assert all("request_id" not in f for f in backlog)
    await wait_nothing_pending(server, "bob")
    async with server.connect("bob") as bob:
        assert bob.backlog == []


async def test_no_backlog_frames_when_nothing_is_pending(server: RunningServer) -> None:
    async with server.open(token=server.token("newcomer")) as client:
        assert await client.recv() == {"type": "authenticated", "user_id": "newcomer"}
        await client.expect_no_frame(0.2)


async def test_own_messages_are_never_in_the_own_backlog(server: RunningServer) -> None:
    async with server.connect("alice") as alice:
        chat = await alice.create_chat("bob")
        await alice.send_message(chat["chat_id"], "bob", "mine")
    async with server.connect("alice") as alice:
        assert alice.backlog == []


async def test_only_the_participants_get_anything(server: RunningServer) -> None:
    async with (
        server.connect("alice") as alice,
        server.connect("bob") as bob,
        server.connect("carol") as carol,
    ):
        chat = await alice.create_chat("bob")
        assert (await bob.recv())["type"] == "new_chats"
        ack = await alice.send_message(chat["chat_id"], "bob", "private")
        assert (await bob.recv())["message_id"] == ack["message_id"]
        await expect_silence(carol)
        all_chats, _ = await carol.fetch_chats()
        assert all_chats["data"] == []
    async with server.connect("carol") as carol:
        assert carol.backlog == []


async def test_every_connection_of_a_user_gets_live_messages(server: RunningServer) -> None:
    async with (
        server.connect("alice") as alice,
        server.connect("alice") as alice_tablet,
        server.connect("bob") as bob_phone,
        server.connect("bob") as bob_laptop,
        server.connect("bob") as bob_tablet,
    ):
        chat = await alice.create_chat("bob")
        for other in (alice_tablet, bob_phone, bob_laptop, bob_tablet):
            assert (await other.recv())["type"] == "new_chats"
        for i in range(5):
            ack = await alice.send_message(chat["chat_id"], "bob", f"m{i}")
            copy = {k: v for k, v in ack.items() if k != "request_id"}
            for other in (alice_tablet, bob_phone, bob_laptop, bob_tablet):
                assert await other.recv() == copy
        reply = await bob_laptop.send_message(chat["chat_id"], "alice", "from the laptop")
        copy = {k: v for k, v in reply.items() if k != "request_id"}
        for other in (alice, alice_tablet, bob_phone, bob_tablet):
            assert await other.recv() == copy
        await expect_silence(alice, alice_tablet, bob_phone, bob_laptop, bob_tablet)


async def test_live_delivery_counts_even_if_the_client_closes(server: RunningServer) -> None:
    async with server.connect("alice") as alice:
        chat = await alice.create_chat("bob")
        async with server.open_raw(token=server.token("bob")) as bob:
            assert (await bob.recv())["type"] == "authenticated"
            assert (await bob.recv())["type"] == "new_chats"
            ack = await alice.send_message(chat["chat_id"], "bob", "live")
            # bob closes without reading; whatever the server wrote before its close counts.
            drained = await bob.close_and_drain()
        written = [f["message_id"] for f in drained if f["type"] == "message"]
        await wait_marked(server, "bob", message_ids=written)
        async with server.connect("bob") as bob_again:
            again = [m["message_id"] for m in backlog_messages(bob_again.backlog)]
            assert sorted(written + again) == [ack["message_id"]]


async def test_immediate_rebind_gets_no_backlog_twice(server: RunningServer) -> None:
    """A second binding right after the first must not get the same backlog again."""
    async with server.connect("alice") as alice:
        chat = await alice.create_chat("bob")
        for round_ in range(5):
            ack = await alice.send_message(chat["chat_id"], "bob", f"round {round_}")
            async with server.connect("bob") as bob:
                got = [m["message_id"] for m in backlog_messages(bob.backlog)]
                assert got == [ack["message_id"]]
            async with server.connect("bob") as bob:
                assert backlog_messages(bob.backlog) == [], f"round {round_}: delivered twice"


async def test_immediate_rebind_after_a_live_message(server: RunningServer) -> None:
    async with server.connect("alice") as alice:
        chat = await alice.create_chat("bob")
        async with server.connect("bob") as bob:
            pass
        await wait_nothing_pending(server, "bob")
        for round_ in range(5):
            async with server.open_raw(token=server.token("bob")) as bob:
                assert (await bob.recv())["type"] == "authenticated"
                ack = await alice.send_message(chat["chat_id"], "bob", f"round {round_}")
                assert (await bob.recv())["message_id"] == ack["message_id"]
                assert await bob.close_and_drain() == []
            async with server.connect("bob") as bob:
                assert backlog_messages(bob.backlog) == [], f"round {round_}: delivered twice"


class _Progress:
    """A counter that can be awaited."""

    def __init__(self) -> None:
        self.count = 0
        self._changed = trio.Event()

    def bump(self) -> None:
        self.count += 1
        self._changed.set()
        self._changed = trio.Event()

    async def wait_for(self, count: int) -> None:
        while self.count < count:
            await self._changed.wait()


async def _reconnect_race(server: RunningServer, *, quiet_close: bool, seed: int) -> None:
    """One sender streams while the recipient connects and disconnects over and over.

    Every message must reach bob exactly once over the sequence of bindings: either in a
    backlog or live, never both, never twice, never neither.

    With `quiet_close`, the race is only at the binding end: before bob closes, the sender
    pauses, bob reads everything already pushed (a `ping` round trip) and closes with nothing
    in flight, then waits until the store has recorded what that binding received. Without
    it, bob closes at random moments (even while the server is still binding) and rebinds at
    once.
    """
    total = 300
    rng = random.Random(seed)
    async with server.connect("alice") as alice:
        chat = await alice.create_chat("bob")
        chat_id = chat["chat_id"]
        async with server.connect("bob"):
            pass  # takes the new chat
        await wait_nothing_pending(server, "bob")

        acked: list[str] = []
        ack_progress = _Progress()
        sent = 0
        gate = trio.Lock()  # held by bob during a quiet close: the sender waits
        done = trio.Event()
        bindings: list[list[tuple[str, str]]] = []  # per binding: (how, message_id)

        async def send_all() -> None:
            nonlocal sent
            for i in range(total):
                async with gate:
                    await alice.send(
                        {
                            "type": "send_message",
                            "chat_id": chat_id,
                            "recipient_id": "bob",
                            "content": f"m{i}",
                        }
                    )
                    sent += 1
                await trio.sleep(rng.uniform(0, 0.006))  # pacing, so bindings interleave

        async def read_acks() -> None:
            while len(acked) < total:
                frame = await alice.recv()
                assert frame["type"] == "message", frame
                acked.append(frame["message_id"])
                ack_progress.bump()
            done.set()

        async def one_binding() -> list[tuple[str, str]]:
            # How long the binding reads before closing; None: close right after the upgrade,
            # typically while the server is still binding.
            choices = [0, 0, 0.001, 0.005, 0.02] if quiet_close else [None, 0, 0, 0.005, 0.02]
            linger = rng.choice(choices)
            frames: list[Frame] = []
            async with server.open_raw(token=server.token("bob")) as raw:
                if linger is not None:
                    assert (await raw.recv())["type"] == "authenticated"
                    with trio.move_on_after(linger):
                        while True:
                            frames.append(await raw.recv())
                if quiet_close:
                    async with gate:
                        await ack_progress.wait_for(sent)  # everything sent is pushed
                        frames += await raw.sync()
                        frames += await raw.close_and_drain()
                else:
                    frames += await raw.close_and_drain()
            received: list[tuple[str, str]] = []
            for frame in frames:
                if frame["type"] == "authenticated":
                    continue
                if frame["type"] == "new_messages":
                    received += [("backlog", m["message_id"]) for m in frame["data"]]
                elif frame["type"] == "message":
                    received.append(("live", frame["message_id"]))
                else:
                    raise AssertionError(f"unexpected frame {frame}")
            return received

        async def reconnect_until_done() -> None:
            while not done.is_set():
                received = await one_binding()
                bindings.append(received)
                if quiet_close:
                    await wait_marked(server, "bob", message_ids=[m for _, m in received])

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send_all)
            nursery.start_soon(read_acks)
            nursery.start_soon(reconnect_until_done)
        # A last, complete binding: whatever is still pending. (A random one could close
        # before the server wrote anything, legitimately leaving messages undelivered.)
        async with server.connect("bob") as bob:
            final: list[tuple[str, str]] = []
            for frame in bob.backlog:
                if frame["type"] == "new_messages":
                    final += [("backlog", m["message_id"]) for m in frame["data"]]
                elif frame["type"] == "message":
                    final.append(("live", frame["message_id"]))
            bindings.append(final)

        page = await alice.request({"type": "fetch_messages", "chat_id": chat_id, "limit": 1000})
        stored = [m["message_id"] for m in page["data"]]

    assert sorted(acked, key=id_key) == stored
    assert len(stored) == total
    assert len(bindings) >= 10, "the race needs many bindings during the stream"
    every = [message_id for binding in bindings for _, message_id in binding]
    duplicates = {m: n for m, n in Counter(every).items() if n > 1}
    missing = set(stored) - set(every)
    where = {
        m: [(index, how) for index, binding in enumerate(bindings) for how, n in binding if n == m]
        for m in sorted(duplicates, key=id_key)[:5]
    }
    assert not duplicates, f"delivered more than once (binding, how): {where}"
    assert not missing, f"never delivered: {sorted(missing, key=id_key)[:10]}"
    for index, binding in enumerate(bindings):  # backlog then live, oldest first
        order = [message_id for _, message_id in binding]
        assert order == sorted(order, key=id_key), f"binding {index} out of order"
        kinds = [how for how, _ in binding]
        assert kinds == sorted(kinds), f"binding {index}: live before backlog"


async def test_exactly_once_while_binding(server: RunningServer) -> None:
    rng = random.Random(4)
    with slow_commits(server, lambda: rng.uniform(0, 0.004)):
        await _reconnect_race(server, quiet_close=True, seed=1)


@asynccontextmanager
async def committed_not_published(
    server: RunningServer, pause: Callable[..., Any], *, delay_s: float
) -> AsyncIterator[Any]:
    """alice sends bob a message and the block runs while it is committed (visible to a
    backlog read) but its fan-out is held back for `delay_s`; yields alice's client.

    `pause` is `slow_commits`, passed by the test so that the two-node copies of these tests
    (which swap the test's globals) bring their own."""
    async with server.connect("alice") as alice:
        chat = await alice.create_chat("bob")
        async with server.connect("bob"):
            pass
        await wait_nothing_pending(server, "bob")
        with pause(server, lambda: delay_s):
            await alice.send(
                {
                    "type": "send_message",
                    "chat_id": chat["chat_id"],
                    "recipient_id": "bob",
                    "content": "in the window",
                }
            )
            await wait_committed(server, "bob")
            yield alice


async def test_message_committed_while_the_recipient_binds_arrives_once(
    server: RunningServer,
) -> None:
    async with (
        committed_not_published(server, slow_commits, delay_s=0.3) as alice,
        server.connect("bob") as bob,
    ):
        [message] = backlog_messages(bob.backlog)
        ack = await alice.recv()
        assert ack["message_id"] == message["message_id"]
        await bob.expect_no_frame(0.2)


async def test_late_fan_out_after_a_quick_rebind_arrives_once(server: RunningServer) -> None:
    """The message is committed, delivered in one binding's backlog, and only published once
    the next binding is under way: that binding must not get it again."""
    async with committed_not_published(server, slow_commits, delay_s=0.4) as alice:
        async with server.open_raw(token=server.token("bob")) as first:
            frames = [await first.recv() for _ in range(2)]
            frames += await first.close_and_drain()
        [message] = backlog_messages(frames)
        async with server.connect("bob") as second:
            ack = await alice.recv()  # published by now
            assert ack["message_id"] == message["message_id"]
            again = [*second.backlog, *await second.sync()]
            assert again == [], "delivered twice"


@pytest.mark.parametrize("seed", [2, 3])
async def test_exactly_once_across_abrupt_reconnects(server: RunningServer, seed: int) -> None:
    rng = random.Random(seed + 100)
    with slow_commits(server, lambda: rng.uniform(0, 0.004)):
        await _reconnect_race(server, quiet_close=False, seed=seed)


async def test_frames_not_written_before_the_client_closed_stay_undelivered(
    server: RunningServer,
) -> None:
    """The client closes right after the upgrade, while the server is still binding."""
    async with server.connect("alice") as alice:
        chat = await alice.create_chat("bob")
        sent = [
            (await alice.send_message(chat["chat_id"], "bob", f"m{i}"))["message_id"]
            for i in range(3)
        ]
    async with server.open_raw(token=server.token("bob")) as raw:
        drained = await raw.close_and_drain()
    written = [m["message_id"] for m in backlog_messages(drained)]
    assert written in ([], sent)
    # Once the server is done with the connection (its receipts released or forgotten) and
    # has recorded whatever it believes it wrote, bind again: what the first connection did
    # not get must come back.
    services = server.app.services
    assert services is not None
    hub = services.hub
    await wait_until(lambda: not hub.connections)
    await hub.marks.sync("bob")
    async with server.connect("bob") as bob:
        again = [m["message_id"] for m in backlog_messages(bob.backlog)]
    assert sorted(written + again, key=id_key) == sent
