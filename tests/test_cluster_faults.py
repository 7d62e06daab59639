"""Faults end to end: Redis or PostgreSQL restarted in the middle of a conversation between two
users on two nodes.

The service must recover by itself, lose no acknowledged message and deliver none twice, and
`/healthz` must say 503 while a backend is unreachable and 200 after. The clients do what a
real client does: the sender resends an unacknowledged message with the same
`client_message_id` after an error or a reconnect; both reconnect when closed (a resync after
a Redis outage closes connections with 1013 so they rebind). The recipient reads with a
`RawClient`, which sees exactly what the server wrote before each close, so "exactly once"
is checked without slack over every binding.

Each test starts throwaway servers of the backend it breaks (`scale_support`) and uses the
shared instance of the other one.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Final

import attrs
import pytest
import trio
from cluster_support import Cluster, ClusterServer
from scale_support import (
    ThrowawayPostgres,
    ThrowawayRedis,
    database_url,
    fresh_schema,
    redis_url,
    unique_prefix,
)
from support import Client, Frame, http_request
from trio_websocket import ConnectionClosed, ConnectionTimeout, HandshakeError

pytestmark = [pytest.mark.scale, pytest.mark.slow]

TEST_TIMEOUT_S: Final = 90.0
RECOVERY_TIMEOUT_S: Final = 20.0
PACE_S: Final = 0.01
# No keep-alive pings: `RawClient.close_and_drain` cannot answer one that arrives after its
# close frame, and these connections are never idle anyway.
LIMITS: Final = {"ping_interval_s": 60}
# How a connection ends when a server closes or resets it (or refuses a new one).
_GONE: Final = (
    ConnectionClosed,
    ConnectionTimeout,
    HandshakeError,
    ConnectionError,
    OSError,
    trio.BrokenResourceError,
)


@attrs.define
class Conversation:
    """alice sends numbered messages to bob until `total` are acknowledged; bob reads."""

    server: ClusterServer
    chat_id: str
    total: int
    acked: dict[str, str] = attrs.field(factory=dict)  # client_message_id -> message_id
    internal_errors: int = 0
    # Connections that answered `internal` and then acknowledged a later message.
    survived_errors: int = 0
    bindings: list[list[tuple[str, str]]] = attrs.field(factory=list)  # bob: (how, id)
    progress: trio.Event = attrs.field(factory=trio.Event)
    paused: bool = False

    def bump(self) -> None:
        self.progress.set()
        self.progress = trio.Event()

    async def wait_acked(self, count: int) -> None:
        while len(self.acked) < count:
            await self.progress.wait()

    async def send_all(self) -> None:
        index = 0
        while index < self.total:
            try:
                async with self.server.open(token=self.server.token("alice")) as alice:
                    if (await alice.recv())["type"] != "authenticated":
                        await trio.sleep(0.1)  # binding failed (internal): try again
                        continue
                    failed_here = False
                    while index < self.total:
                        key = f"m{index}"
                        await alice.send(
                            {
                                "type": "send_message",
                                "chat_id": self.chat_id,
                                "recipient_id": "bob",
                                "content": key,
                                "client_message_id": key,
                                "request_id": key,
                            }
                        )
                        reply = await _reply(alice, key)
                        if reply["type"] == "error":
                            assert reply["code"] == "internal", reply
                            self.internal_errors += 1
                            failed_here = True
                            await trio.sleep(0.1)
                            continue  # the same key again, on the same connection
                        assert reply["type"] == "message", reply
                        assert (
                            self.acked.setdefault(key, reply["message_id"]) == (reply["message_id"])
                        ), "a resend was stored twice"
                        if failed_here:
                            self.survived_errors += 1
                            failed_here = False
                        index += 1
                        self.bump()
                        await trio.sleep(PACE_S)
            except _GONE:
                await trio.sleep(0.05)  # closed (e.g. resync): reconnect, resend the same key

    async def read_all(self, done: trio.Event) -> None:
        """bob: bind, read until closed, rebind; stop once done and caught up."""
        while True:
            finished = done.is_set() and self._caught_up()
            try:
                async with self.server.open_raw(token=self.server.token("bob")) as bob:
                    first = await bob.recv_event()
                    if isinstance(first, int) or first["type"] != "authenticated":
                        await trio.sleep(0.1)
                        continue
                    received: list[tuple[str, str]] = []
                    self.bindings.append(received)
                    while True:
                        if finished or (done.is_set() and self._caught_up()):
                            _record(received, await bob.close_and_drain())
                            break
                        with trio.move_on_after(0.1):
                            event = await bob.recv_event(timeout=RECOVERY_TIMEOUT_S)
                            if isinstance(event, int):
                                break  # closed by the server: rebind
                            _record(received, [event])
                if finished:
                    return
            except _GONE:
                await trio.sleep(0.05)

    def _caught_up(self) -> bool:
        seen = {message_id for binding in self.bindings for _, message_id in binding}
        return seen >= set(self.acked.values())

    def check(self) -> None:
        every = [message_id for binding in self.bindings for _, message_id in binding]
        duplicates = {m: n for m, n in Counter(every).items() if n > 1}
        assert not duplicates, f"delivered more than once: {duplicates}"
        assert len(self.acked) == self.total
        assert set(every) == set(self.acked.values()), "lost, or delivered but never acked"
        for binding in self.bindings:  # each binding: backlog then live, oldest first
            ids = [int(message_id) for _, message_id in binding]
            assert ids == sorted(ids)


def _record(received: list[tuple[str, str]], frames: list[Frame]) -> None:
    for frame in frames:
        if frame["type"] == "new_messages":
            received += [("backlog", m["message_id"]) for m in frame["data"]]
        elif frame["type"] == "message":
            received.append(("live", frame["message_id"]))


async def _reply(client: Client, request_id: str) -> Frame:
    """The reply to `request_id`; nothing else is sent to alice (she has no other device)."""
    while True:
        frame = await client.recv()
        if frame.get("request_id") == request_id:
            return frame
        assert frame["type"] == "new_chats", frame


async def _health(server: ClusterServer) -> list[int]:
    statuses = []
    for node in server.nodes:
        try:
            statuses.append((await http_request(node, "GET", "/healthz")).status)
        except (OSError, trio.TooSlowError):
            statuses.append(0)
    return statuses


async def _wait_health(server: ClusterServer, status: int) -> float:
    """Poll every node's /healthz until all answer `status`; how long it took."""
    started = trio.current_time()
    with trio.fail_after(RECOVERY_TIMEOUT_S):
        while await _health(server) != [status] * len(server.nodes):  # noqa: ASYNC110
            await trio.sleep(0.05)
    return trio.current_time() - started


async def _chat(server: ClusterServer) -> str:
    async with server.connect("alice") as alice:
        chat = await alice.create_chat("bob")
    chat_id: str = chat["chat_id"]
    return chat_id


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def throwaway_redis() -> Iterator[ThrowawayRedis]:
    server = ThrowawayRedis()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def throwaway_postgres() -> Iterator[ThrowawayPostgres]:
    server = ThrowawayPostgres()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def shared_schema() -> Iterator[str]:
    """A fresh schema on the shared PostgreSQL (or skip, naming the variable)."""
    with fresh_schema(database_url()) as dsn:
        yield dsn


@pytest.fixture
def shared_redis() -> str:
    return redis_url()


@pytest.fixture
async def deadline(nursery: trio.Nursery) -> AsyncIterator[None]:
    async def expire() -> None:
        with trio.fail_after(TEST_TIMEOUT_S):
            await trio.sleep_forever()

    nursery.start_soon(expire)
    yield
    nursery.cancel_scope.cancel()


# --------------------------------------------------------------------------- the tests


async def test_redis_restart_during_a_conversation(
    throwaway_redis: ThrowawayRedis,
    shared_schema: str,
    nursery: trio.Nursery,
    tmp_path: Path,
    deadline: None,
) -> None:
    await throwaway_redis.start()
    cluster = Cluster(nursery, tmp_path, shared_schema, throwaway_redis.url, unique_prefix())
    server = await cluster.start(limits=LIMITS)
    conversation = Conversation(server, await _chat(server), total=200)
    done = trio.Event()
    async with trio.open_nursery() as clients:
        clients.start_soon(conversation.read_all, done)

        async def send_then_finish() -> None:
            await conversation.send_all()
            done.set()

        clients.start_soon(send_then_finish)
        await conversation.wait_acked(50)
        await throwaway_redis.stop()
        await _wait_health(server, 503)
        during = len(conversation.acked)
        await trio.sleep(1.0)  # the store is up: alice's messages are still acknowledged
        assert len(conversation.acked) > during
        await throwaway_redis.start()
        recovered_s = await _wait_health(server, 200)
    conversation.check()
    assert len(conversation.bindings) >= 2  # bob was resynchronized and rebound
    await cluster.stop_all()
    print(f"\nredis restart: healthy again {recovered_s:.2f}s after it came back")


async def test_postgres_restart_during_a_conversation(
    throwaway_postgres: ThrowawayPostgres,
    shared_redis: str,
    nursery: trio.Nursery,
    tmp_path: Path,
    deadline: None,
) -> None:
    await throwaway_postgres.start()
    cluster = Cluster(nursery, tmp_path, throwaway_postgres.dsn, shared_redis, unique_prefix())
    server = await cluster.start(limits=LIMITS)
    conversation = Conversation(server, await _chat(server), total=200)
    done = trio.Event()
    async with trio.open_nursery() as clients:
        clients.start_soon(conversation.read_all, done)

        async def send_then_finish() -> None:
            await conversation.send_all()
            done.set()

        clients.start_soon(send_then_finish)
        await conversation.wait_acked(50)
        await throwaway_postgres.stop()
        await _wait_health(server, 503)
        errors = conversation.internal_errors
        with trio.fail_after(5):
            while conversation.internal_errors == errors:  # noqa: ASYNC110
                await trio.sleep(0.05)
        await throwaway_postgres.start()
        recovered_s = await _wait_health(server, 200)
    conversation.check()
    assert conversation.survived_errors >= 1  # a connection that got `internal` went on
    await cluster.stop_all()
    print(f"\npostgres restart: healthy again {recovered_s:.2f}s after it came back")
