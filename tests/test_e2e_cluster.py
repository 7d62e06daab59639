"""The end-to-end protocol suite again, on two handler nodes sharing PostgreSQL and Redis.

PROTOCOL.md: with PostgreSQL and Redis, any number of processes serve the same users and every
rule holds whichever process each connection landed on. So every test of the single-node
end-to-end modules is collected here a second time, with the `server` and `start_server`
fixtures replaced: a `ClusterServer` is two nodes (two `serve()` instances in the test's Trio
run, each with its own app, store and bus, on its own port) on one database schema and one
Redis channel prefix, both fresh for each test. Its `open`, `open_raw` and `connect` alternate
between the nodes, so a user's second device, and the recipient of the first user's messages,
land on the other node. HTTP helpers and `server.app` (used to read the store) address the
first node.

The single-node modules mark known server faults `xfail`; the copies here carry no such mark,
so the cluster is held to the protocol as written. A few tests cannot mean the same thing on
two nodes; `_SINGLE_NODE` lists them with the reason, and the tests after the imported ones
cover the same ground for the cluster.

Skipped, naming the variables, unless `CHAT_TEST_DATABASE_URL` and `CHAT_TEST_REDIS_URL` are set.
"""

from __future__ import annotations

import contextlib
import importlib
import itertools
import random
import time
import types
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Final

import attrs
import pytest
import trio
from scale_support import database_url, fresh_schema, redis_url, unique_prefix
from support import (
    Client,
    RawClient,
    RunningServer,
    make_config,
    wait_committed,
    wait_nothing_pending,
)
from test_e2e_delivery import _reconnect_race

from handler.app import create_app
from handler.server import serve
from handler.store.postgres import PostgresStore

pytestmark = pytest.mark.scale

TEST_DEADLINE_S: Final = 45.0
SHUTDOWN_TIMEOUT_S: Final = 15.0
NODES: Final = 2

StartServer = Callable[..., Awaitable[RunningServer]]

_MODULES: Final = (
    "test_e2e_auth",
    "test_e2e_chats",
    "test_e2e_delivery",
    "test_e2e_http",
    "test_e2e_limits",
    "test_e2e_messages",
)

# Tests whose subject only exists on one node, with the cluster test that covers it instead.
_SINGLE_NODE: Final = {
    # Widens the commit-to-publish window by patching the SQLite store's writer: the cluster
    # versions below do the same to the PostgreSQL writers.
    "test_exactly_once_while_binding": "SQLite writer internals",
    "test_message_committed_while_the_recipient_binds_arrives_once": "SQLite writer internals",
    # Builds the expected same-host Origin from the first node's port while the connections
    # alternate between two ports; behind a load balancer every node sees the same Host. The
    # rule itself is per request and checked on both nodes by the other origin tests.
    "test_default_origin_policy": "the Origin is built from one node's address",
    # Waits for the slow-consumer counter in the first node's /metrics while the flooding
    # client is on the second node; metrics are per process. The policy itself is covered
    # here by test_a_client_that_stops_reading_is_dropped.
    "test_a_client_that_sends_but_never_reads_is_dropped": "per-process metrics",
    # Token buckets are per node: a user's devices on two nodes get the rate of each node.
    # docs/design.md ("Several processes") states the limit.
    "test_rate_limit_is_per_user_not_per_connection": "rate limits are per node",
}


# --------------------------------------------------------------------------- the cluster


@attrs.define
class ClusterServer(RunningServer):
    """Two nodes behind one `RunningServer` face; connections alternate between them."""

    nodes: list[RunningServer] = attrs.field(factory=list)
    turns: Iterator[int] = attrs.field(factory=itertools.count)

    def next_node(self) -> RunningServer:
        return self.nodes[next(self.turns) % len(self.nodes)]

    @asynccontextmanager
    async def open(self, **options: Any) -> AsyncIterator[Client]:
        async with self.next_node().open(**options) as client:
            yield client

    @asynccontextmanager
    async def open_raw(self, **options: Any) -> AsyncIterator[RawClient]:
        async with self.next_node().open_raw(**options) as client:
            yield client

    async def stop(self, timeout: float = SHUTDOWN_TIMEOUT_S) -> None:
        for node in self.nodes:
            node.stop_event.set()
        with trio.fail_after(timeout):
            for node in self.nodes:
                await node.stopped.wait()


async def _deadline(seconds: float) -> None:
    with trio.fail_after(seconds):
        await trio.sleep_forever()


@pytest.fixture
async def start_server(nursery: trio.Nursery, tmp_path: Path) -> AsyncIterator[StartServer]:
    """Factory: `await start_server(limits={...})` -> a `ClusterServer` of two fresh nodes.

    Every cluster of one test shares the test's schema and Redis prefix, so a cluster started
    again (e.g. after a shutdown) finds the data of the one before, like a restart.
    """
    database, redis = database_url(), redis_url()
    prefix = unique_prefix()
    nodes: list[RunningServer] = []
    counter = itertools.count()
    with fresh_schema(database) as dsn:
        nursery.start_soon(_deadline, TEST_DEADLINE_S)

        async def start_node(**overrides: Any) -> RunningServer:
            directory = tmp_path / f"node{next(counter)}"
            directory.mkdir()
            shared = {
                "storage": {"backend": "postgres", "dsn": dsn, "pool_size": 4},
                "bus": {"backend": "redis", "url": redis, "prefix": prefix},
            }
            for key, value in shared.items():
                overrides[key] = {**overrides.get(key, {}), **value}
            config = make_config(directory, **overrides)
            app = create_app(config)
            stop, stopped = trio.Event(), trio.Event()

            async def run(task_status: trio.TaskStatus[list[str]]) -> None:
                try:
                    await serve(
                        config, shutdown_trigger=stop.wait, app=app, task_status=task_status
                    )
                finally:
                    stopped.set()

            urls: list[str] = await nursery.start(run)
            node = RunningServer(config, urls[0], app, stop, stopped)
            nodes.append(node)
            return node

        async def start(**overrides: Any) -> ClusterServer:
            members = [await start_node(**overrides) for _ in range(NODES)]
            first = members[0]
            return ClusterServer(
                first.config, first.http_url, first.app, first.stop_event, first.stopped, members
            )

        yield start

        for node in nodes:
            node.stop_event.set()
        with trio.fail_after(SHUTDOWN_TIMEOUT_S):
            for node in nodes:
                await node.stopped.wait()
        nursery.cancel_scope.cancel()  # the deadline task


@pytest.fixture
async def server(start_server: StartServer) -> RunningServer:
    return await start_server()


# --------------------------------------------------------------------------- the imported suite


def _cluster_copy(test: types.FunctionType) -> types.FunctionType:
    """The same test function under a new identity, without the single-node xfail marks."""
    copy = types.FunctionType(
        test.__code__, test.__globals__, test.__name__, test.__defaults__, test.__closure__
    )
    copy.__kwdefaults__ = test.__kwdefaults__
    copy.__annotations__ = dict(test.__annotations__)
    copy.__doc__ = test.__doc__
    copy.__module__ = __name__
    copy.__qualname__ = test.__qualname__
    marks = [mark for mark in getattr(test, "pytestmark", []) if mark.name != "xfail"]
    copy.pytestmark = marks  # type: ignore[attr-defined]
    return copy


def _import_suite() -> dict[str, types.FunctionType]:
    tests: dict[str, types.FunctionType] = {}
    for module_name in _MODULES:
        module = importlib.import_module(module_name)
        for name, value in vars(module).items():
            if not name.startswith("test_") or not isinstance(value, types.FunctionType):
                continue
            if value.__module__ != module_name or name in _SINGLE_NODE:
                continue
            assert name not in tests, f"two end-to-end tests are named {name}"
            tests[name] = _cluster_copy(value)
    missing = set(_SINGLE_NODE) - {
        name for module in _MODULES for name in vars(importlib.import_module(module))
    }
    assert not missing, f"excluded tests that no longer exist: {missing}"
    return tests


globals().update(_import_suite())


# --------------------------------------------------------------------------- cluster-only tests


def _stores(server: RunningServer) -> list[PostgresStore]:
    assert isinstance(server, ClusterServer)
    stores = []
    for node in server.nodes:
        assert node.app.services is not None
        store = node.app.services.store
        assert isinstance(store, PostgresStore)
        stores.append(store)
    return stores


@contextlib.contextmanager
def slow_commits(server: RunningServer, delay: Callable[[], float]) -> Iterator[None]:
    """Widen the window between COMMIT and the `on_commit` fan-out of every node's writer
    (a pause in the worker thread after each committed batch keeps the store contract)."""
    writers = [store._writer for store in _stores(server)]
    originals = [writer._commit for writer in writers]

    def pausing(original: Callable[[list[Any]], None]) -> Callable[[list[Any]], None]:
        def commit_then_pause(batch: list[Any]) -> None:
            original(batch)
            time.sleep(delay())

        return commit_then_pause

    for writer, original in zip(writers, originals, strict=True):
        writer._commit = pausing(original)  # type: ignore[method-assign]
    try:
        yield
    finally:
        for writer, original in zip(writers, originals, strict=True):
            writer._commit = original  # type: ignore[method-assign]


def _users_on(server: RunningServer) -> list[set[str]]:
    assert isinstance(server, ClusterServer)
    users = []
    for node in server.nodes:
        assert node.app.services is not None
        users.append(set(node.app.services.hub.users))
    return users


async def test_connections_alternate_between_the_nodes(server: RunningServer) -> None:
    """The premise of the whole module: the two ends of a chat live on different nodes."""
    async with server.connect("alice") as alice, server.connect("bob") as bob:
        assert _users_on(server) == [{"alice"}, {"bob"}]
        chat = await alice.create_chat("bob")
        assert (await bob.recv())["type"] == "new_chats"
        ack = await alice.send_message(chat["chat_id"], "bob", "across")
        assert (await bob.recv())["message_id"] == ack["message_id"]


async def test_cluster_exactly_once_while_binding(server: RunningServer) -> None:
    """The sender stays on one node while the recipient rebinds on alternating nodes, with
    commits slowed so that bindings fall between a COMMIT and its fan-out."""
    rng = random.Random(4)
    with slow_commits(server, lambda: rng.uniform(0, 0.004)):
        await _reconnect_race(server, quiet_close=True, seed=1)


async def test_cluster_message_committed_while_the_recipient_binds_arrives_once(
    server: RunningServer,
) -> None:
    async with server.connect("alice") as alice:  # node 0
        chat = await alice.create_chat("bob")
        async with server.connect("bob"):  # node 1
            pass
        await wait_nothing_pending(server, "bob")
        with slow_commits(server, lambda: 0.3):
            await alice.send(
                {
                    "type": "send_message",
                    "chat_id": chat["chat_id"],
                    "recipient_id": "bob",
                    "content": "in the window",
                }
            )
            await wait_committed(server, "bob")  # visible to a backlog read, not published
            async with server.connect("bob") as bob:  # node 0 again: the sender's node
                [message] = [
                    m for f in bob.backlog if f["type"] == "new_messages" for m in f["data"]
                ]
                ack = await alice.recv()
                assert ack["message_id"] == message["message_id"]
                await bob.expect_no_frame(0.2)
            async with server.connect("bob") as bob:  # node 1: no late copy either
                assert bob.backlog == []
                await bob.expect_no_frame(0.2)


async def test_every_connection_sees_a_chat_in_one_order(server: RunningServer) -> None:
    """Both participants write at once from different nodes; each of their four devices (two
    per node) sees every message live, all in the same (commit) order."""
    per_user = 60
    async with (
        server.connect("alice") as alice,  # node 0
        server.connect("bob") as bob,  # node 1
        server.connect("bob") as bob_tablet,  # node 0
        server.connect("alice") as alice_tablet,  # node 1
    ):
        chat = await alice.create_chat("bob")
        for other in (bob, bob_tablet, alice_tablet):
            assert (await other.recv())["type"] == "new_chats"
        seen: dict[str, list[str]] = {}

        async def write_and_read(name: str, client: Client, sender: str | None) -> None:
            order: list[str] = []
            pending = 0
            sent = 0
            while len(order) < 2 * per_user:
                if sender is not None and sent < per_user and pending == 0:
                    recipient = "bob" if sender == "alice" else "alice"
                    await client.send(
                        {
                            "type": "send_message",
                            "chat_id": chat["chat_id"],
                            "recipient_id": recipient,
                            "content": f"{sender} {sent}",
                            "request_id": sent,
                        }
                    )
                    sent += 1
                    pending = 1
                frame = await client.recv()
                assert frame["type"] == "message", frame
                order.append(frame["message_id"])
                if "request_id" in frame:
                    pending = 0
            seen[name] = order

        async with trio.open_nursery() as nursery:
            nursery.start_soon(write_and_read, "alice", alice, "alice")
            nursery.start_soon(write_and_read, "bob", bob, "bob")
            nursery.start_soon(write_and_read, "bob_tablet", bob_tablet, None)
            nursery.start_soon(write_and_read, "alice_tablet", alice_tablet, None)
        page = await alice.request(
            {"type": "fetch_messages", "chat_id": chat["chat_id"], "limit": 1000}
        )
    stored = [m["message_id"] for m in page["data"]]
    assert len(stored) == 2 * per_user
    for name, order in seen.items():
        assert order == stored, f"{name} saw the chat in another order"
