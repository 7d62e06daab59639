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

The copies keep their marks, `xfail` included: a known fault is expected on the cluster too,
and once it is fixed (and the mark removed) the cluster copy must pass as well. The helpers a
test reaches through its module's globals can be swapped for cluster versions (`_SWAPPED`:
the SQLite writer pause becomes a pause of every node's PostgreSQL writer). A few tests cannot
mean the same thing on two nodes; `_SINGLE_NODE` lists them with the reason.

Skipped, naming the variables, unless `CHAT_TEST_DATABASE_URL` and `CHAT_TEST_REDIS_URL` are set.
"""

from __future__ import annotations

import contextlib
import importlib
import time
import types
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, Final

import pytest
import trio
from cluster_support import Cluster, ClusterServer
from scale_support import database_url, fresh_schema, redis_url, unique_prefix
from support import Client, RunningServer

from handler.store.postgres import PostgresStore

pytestmark = pytest.mark.scale

TEST_DEADLINE_S: Final = 45.0

StartServer = Callable[..., Awaitable[RunningServer]]

_MODULES: Final = (
    "test_e2e_auth",
    "test_e2e_chats",
    "test_e2e_delivery",
    "test_e2e_groups",
    "test_e2e_http",
    "test_e2e_limits",
    "test_e2e_messages",
    "test_e2e_receipts",
    "test_e2e_typing",
    "test_e2e_presence",
    "test_e2e_blocking",
    "test_api",
)

# Tests whose subject only exists on one node.
_SINGLE_NODE: Final = {
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
    # Restarts one server on the same SQLite file; a cluster's last_seen lives in PostgreSQL
    # and is checked after a node is killed (test_cluster_process).
    "test_last_seen_survives_a_restart": "one SQLite file restarted",
    "test_last_seen_is_kept_when_the_server_stops_within_the_grace": "one SQLite file restarted",
}


# --------------------------------------------------------------------------- the cluster


async def _deadline(seconds: float) -> None:
    with trio.fail_after(seconds):
        await trio.sleep_forever()


@pytest.fixture
def backends() -> Iterator[tuple[str, str]]:
    """A fresh schema on the shared PostgreSQL, and the shared Redis; or skip, naming the
    variable to set (from a plain fixture, so the reason is reported)."""
    database, redis = database_url(), redis_url()
    with fresh_schema(database) as dsn:
        yield dsn, redis


@pytest.fixture
async def start_server(
    nursery: trio.Nursery, tmp_path: Path, backends: tuple[str, str]
) -> AsyncIterator[StartServer]:
    """Factory: `await start_server(limits={...})` -> a `ClusterServer` of two fresh nodes.

    Every cluster of one test shares the test's schema and Redis prefix, so a cluster started
    again (e.g. after a shutdown) finds the data of the one before, like a restart.
    """
    dsn, redis = backends
    nursery.start_soon(_deadline, TEST_DEADLINE_S)
    cluster = Cluster(nursery, tmp_path, dsn, redis, unique_prefix())
    yield cluster.start
    await cluster.stop_all()
    nursery.cancel_scope.cancel()  # the deadline task


@pytest.fixture
async def server(start_server: StartServer) -> RunningServer:
    return await start_server()


# --------------------------------------------------------------------------- the imported suite


def _cluster_copy(test: types.FunctionType, swapped: dict[str, Any]) -> types.FunctionType:
    """The same test (code, marks) with some of its module's globals swapped."""
    copy = types.FunctionType(
        test.__code__,
        {**test.__globals__, **swapped},
        test.__name__,
        test.__defaults__,
        test.__closure__,
    )
    copy.__kwdefaults__ = test.__kwdefaults__
    copy.__annotations__ = dict(test.__annotations__)
    copy.__doc__ = test.__doc__
    copy.__module__ = __name__
    copy.__qualname__ = test.__qualname__
    copy.pytestmark = list(getattr(test, "pytestmark", []))  # type: ignore[attr-defined]
    return copy


def _import_suite(swapped: dict[str, Any]) -> dict[str, types.FunctionType]:
    tests: dict[str, types.FunctionType] = {}
    for module_name in _MODULES:
        module = importlib.import_module(module_name)
        for name, value in vars(module).items():
            if not name.startswith("test_") or not isinstance(value, types.FunctionType):
                continue
            if value.__module__ != module_name or name in _SINGLE_NODE:
                continue
            assert name not in tests, f"two end-to-end tests are named {name}"
            tests[name] = _cluster_copy(value, swapped)
    missing = set(_SINGLE_NODE) - {
        name for module in _MODULES for name in vars(importlib.import_module(module))
    }
    assert not missing, f"excluded tests that no longer exist: {missing}"
    return tests


# --------------------------------------------------------------------------- swapped helpers


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
    """`test_e2e_delivery.slow_commits` for the cluster: widen the window between COMMIT and
    the hand-off to the fan-out of every node's writer (a pause in the worker thread after
    each committed batch, the writer's `after_commit` test hook, keeps the store contract)."""
    writers = [store.writer for store in _stores(server)]
    originals = [writer.after_commit for writer in writers]
    for writer in writers:
        writer.after_commit = lambda: time.sleep(delay())
    try:
        yield
    finally:
        for writer, original in zip(writers, originals, strict=True):
            writer.after_commit = original


_SWAPPED: Final[dict[str, Any]] = {"slow_commits": slow_commits}

globals().update(_import_suite(_SWAPPED))


# --------------------------------------------------------------------------- cluster-only tests


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
