"""Presence between nodes through the shared Redis (`handler.bus.redis_presence`).

A node here is one `RedisPresenceLink` in this process with a sink (`Node`) that keeps what the
presence service's board would: its own users, and a copy of each other node's users, built
only from what the link tells it; every call is recorded in order. The tests connect and
disconnect users on some nodes and check what the others see.

Some tests play a node themselves (`Scripted`): a raw client writes its set and counter and
publishes its announcements the way the link does, so that a publish can be lost, or a copy made
to differ, on purpose. A node killed with SIGKILL runs in a child process.

Marked `scale`: skipped unless `CHAT_TEST_REDIS_URL` is set. Each test has its own key prefix,
and its keys are deleted afterwards. The heartbeat is a constructor argument (the silence that
makes a node gone is three of them): by default the nodes here get one so long that none comes
during a test after the writes of their start, so changes can only travel as changes; tests of
heartbeats and silence pass short ones. The key TTL (30 s) is a module constant no test waits
for.
"""

from __future__ import annotations

import secrets
import subprocess
import sys
from collections.abc import AsyncIterator, Collection, Sequence
from pathlib import Path
from typing import Any, Final

import coredis
import orjson
import pytest
import trio
import trio.lowlevel
from coredis.tokens import PureToken
from scale_support import redis_url, unique_prefix
from support import wait_until

from handler.bus.redis_presence import KEY_TTL_S, RedisPresenceLink
from handler.presence.board import user_hash
from handler.presence.link import Change
from handler.timefmt import now_ms

pytestmark = pytest.mark.scale

WAIT_S: Final = 5.0
QUIET_S: Final = 30.0  # a heartbeat that never comes within a test
ROOT: Final = Path(__file__).resolve().parent.parent

Call = tuple[str, str, Any]


def digest_of(users: Collection[str]) -> tuple[int, int]:
    """(count, XOR of the user hashes), as the board computes it."""
    value = 0
    for user in users:
        value ^= user_hash(user)
    return len(users), value


class Node:
    """One link and its sink: this node's users, and its copy of every other node's."""

    def __init__(self, link: RedisPresenceLink) -> None:
        self.link = link
        self.local: set[str] = set()
        self.copies: dict[str, set[str]] = {}
        self.calls: list[Call] = []
        self._scope = trio.CancelScope()
        self._stopped = trio.Event()

    @property
    def id(self) -> str:
        return self.link.node_id

    async def run(self, *, task_status: trio.TaskStatus[None]) -> None:
        try:
            with self._scope:
                await self.link.run(self, task_status=task_status)
        finally:
            self._stopped.set()

    async def stop(self) -> None:
        """A clean stop: the link's task is cancelled, as on a server's shutdown."""
        self._scope.cancel()
        with trio.fail_after(WAIT_S):
            await self._stopped.wait()

    # ------------------------------------------------------------------ this node's users

    def connect(self, user: str) -> int:
        at = now_ms()
        self.local.add(user)
        self.link.announce(user, True, at)
        return at

    def disconnect(self, user: str) -> int:
        at = now_ms()
        self.local.discard(user)
        self.link.announce(user, False, at)
        return at

    # ------------------------------------------------------------------ what it sees

    def sees_online(self, user: str) -> bool:
        return any(user in users for users in self.copies.values())

    def copy_of(self, node: str) -> set[str] | None:
        return self.copies.get(node)

    def calls_about(self, node: str, kind: str | None = None) -> list[Call]:
        return [call for call in self.calls if call[1] == node and kind in (None, call[0])]

    # ------------------------------------------------------------------ the sink

    def remote_changes(self, node: str, changes: Sequence[Change]) -> None:
        self.calls.append(("changes", node, tuple(changes)))
        users = self.copies.setdefault(node, set())
        for user, online, _ in changes:
            if online:
                users.add(user)
            else:
                users.discard(user)

    def remote_full(self, node: str, users: Collection[str], at_ms: int) -> None:
        self.calls.append(("full", node, frozenset(users)))
        self.copies[node] = set(users)

    def node_gone(self, node: str, at_ms: int) -> None:
        self.calls.append(("gone", node, at_ms))
        self.copies.pop(node, None)

    def digest(self, node: str) -> tuple[int, int]:
        return digest_of(self.local if node == self.id else self.copies.get(node, ()))

    def local_users(self) -> Collection[str]:
        return tuple(self.local)


class Scripted:
    """A node played by the test: its keys and announcements written by a raw client in the
    link's format (set `{prefix}p:{node}`, counter `{prefix}pq:{node}`, one MULTI a batch)."""

    def __init__(self, redis: coredis.Redis[bytes], prefix: str) -> None:
        self.id = f"scripted{secrets.token_hex(4)}"
        self.users: set[str] = set()
        self.seq = 0
        self._redis = redis
        self._members = f"{prefix}p:{self.id}"
        self._counter = f"{prefix}pq:{self.id}"
        self._channel = f"{prefix}presence"

    async def batch(
        self,
        up: Sequence[str] = (),
        down: Sequence[str] = (),
        *,
        announce: bool = True,
        beat: bool = False,
        claimed: Collection[str] | None = None,
    ) -> None:
        """One batch of changes at the next counter value. `announce=False` is a publish that
        never reached anyone; `beat` adds the heartbeat (count and hash of `claimed`, by
        default of the set) at the same value, as a batch on a heartbeat does."""
        self.seq += 1
        at = now_ms()
        self.users.update(up)
        self.users.difference_update(down)
        async with self._redis.pipeline(transaction=True) as pipe:
            if up:
                pipe.sadd(self._members, list(up))
            if down:
                pipe.srem(self._members, list(down))
            pipe.set(self._counter, str(self.seq))
            pipe.expire(self._members, KEY_TTL_S)
            pipe.expire(self._counter, KEY_TTL_S)
            changes = [[user, 1, at] for user in up] + [[user, 0, at] for user in down]
            if announce and changes:
                pipe.publish(self._channel, self._payload(c=changes))
            if announce and beat:
                count, value = digest_of(self.users if claimed is None else claimed)
                pipe.publish(self._channel, self._payload(h=[count, str(value)]))

    def _payload(self, **fields: Any) -> bytes:
        return orjson.dumps({"n": self.id, "q": self.seq, **fields})


class Cluster:
    """Nodes on one key prefix, started in the test's nursery."""

    def __init__(
        self, nursery: trio.Nursery, url: str, prefix: str, redis: coredis.Redis[bytes]
    ) -> None:
        self.nursery = nursery
        self.url = url
        self.prefix = prefix
        self.redis = redis
        self.nodes: list[Node] = []

    async def start(
        self, *, heartbeat_s: float = QUIET_S, users: Sequence[str] = (), name: str = ""
    ) -> Node:
        """A running node, with `users` bound before it starts; `name` is its Redis client
        name (to find its connections)."""
        url = self.url
        if name:
            url += ("&" if "?" in url else "?") + f"client_name={name}"
        node = Node(RedisPresenceLink(url, prefix=self.prefix, heartbeat_s=heartbeat_s))
        node.local.update(users)
        await self.nursery.start(node.run)
        self.nodes.append(node)
        return node

    def scripted(self) -> Scripted:
        return Scripted(self.redis, self.prefix)

    async def keys(self) -> set[str]:
        return {key.decode() async for key in self.redis.scan_iter(match=f"{self.prefix}*")}


@pytest.fixture
async def cluster(nursery: trio.Nursery) -> AsyncIterator[Cluster]:
    url = redis_url()
    prefix = unique_prefix()
    redis: coredis.Redis[bytes] = coredis.Redis.from_url(url)
    async with redis:
        cluster = Cluster(nursery, url, prefix, redis)
        try:
            yield cluster
        finally:
            for node in cluster.nodes:
                await node.stop()
            keys = await cluster.keys()
            if keys:
                await redis.delete(keys)


async def seen(node: Node, other: str, users: set[str]) -> None:
    """Wait until `node`'s copy of `other` is exactly `users`."""
    await wait_until(lambda: node.copy_of(other) == users, WAIT_S)


# ---------------------------------------------------------------------- changes between nodes


async def test_a_user_connected_on_one_node_is_online_on_the_other(cluster: Cluster) -> None:
    a = await cluster.start()
    b = await cluster.start()
    a.connect("alice")
    await seen(b, a.id, {"alice"})
    assert b.sees_online("alice")
    assert a.copy_of(b.id) in (None, set())  # nothing came back the other way
    await wait_until(lambda: a.link.live_nodes() == b.link.live_nodes() == {a.id, b.id}, WAIT_S)


async def test_a_disconnect_reaches_the_other_node_with_its_time(cluster: Cluster) -> None:
    a = await cluster.start()
    b = await cluster.start()
    a.connect("alice")
    a.connect("bob")
    await seen(b, a.id, {"alice", "bob"})
    at = a.disconnect("alice")
    await seen(b, a.id, {"bob"})
    assert not b.sees_online("alice")
    # A node already known sends the change itself, with the time the connection closed.
    assert b.calls_about(a.id)[-1] == ("changes", a.id, (("alice", False, at),))


async def test_changes_of_a_user_within_one_batch_arrive_as_the_last(cluster: Cluster) -> None:
    a = await cluster.start()
    b = await cluster.start()
    a.connect("bob")
    await seen(b, a.id, {"bob"})
    before = len(b.calls)
    a.connect("alice")
    at = a.disconnect("alice")  # before the batch goes out
    await wait_until(lambda: len(b.calls) > before, WAIT_S)
    assert b.calls[before:] == [("changes", a.id, (("alice", False, at),))]
    assert b.copy_of(a.id) == {"bob"}
    assert await cluster.redis.smembers(f"{cluster.prefix}p:{a.id}") == {b"bob"}


async def test_a_user_on_two_nodes_stays_online_while_one_has_them(cluster: Cluster) -> None:
    a = await cluster.start()
    b = await cluster.start()
    watcher = await cluster.start()
    a.connect("alice")
    b.connect("alice")
    await seen(watcher, a.id, {"alice"})
    await seen(watcher, b.id, {"alice"})
    await seen(a, b.id, {"alice"})

    a.disconnect("alice")
    await seen(watcher, a.id, set())
    assert watcher.sees_online("alice")
    assert a.sees_online("alice")  # through b, though a has let her go
    assert watcher.copy_of(b.id) == {"alice"}

    b.disconnect("alice")
    await seen(watcher, b.id, set())
    await seen(a, b.id, set())
    assert not watcher.sees_online("alice")
    assert not a.sees_online("alice")


async def test_a_late_node_reads_the_users_already_online(cluster: Cluster) -> None:
    # No heartbeat comes during the test: the newcomer can only learn them from the keys.
    a = await cluster.start(heartbeat_s=QUIET_S, users=["alice", "bob"])
    b = await cluster.start(heartbeat_s=QUIET_S)
    b.connect("carol")
    await seen(a, b.id, {"carol"})
    await seen(b, a.id, {"alice", "bob"})

    late = await cluster.start(heartbeat_s=QUIET_S, users=["dave"])
    await seen(late, a.id, {"alice", "bob"})
    await seen(late, b.id, {"carol"})
    assert {call[0] for call in late.calls} == {"full"}
    assert late.link.live_nodes() == {a.id, b.id, late.id}
    # And its own users reach the others.
    await seen(a, late.id, {"dave"})
    await seen(b, late.id, {"dave"})


# ---------------------------------------------------------------------- nodes that go


async def test_a_node_that_stops_cleanly_has_its_users_dropped_at_once(cluster: Cluster) -> None:
    """A clean stop deletes the node's keys and publishes `bye`: the others drop its users at
    once. Its heartbeat is long, so the silence (3 heartbeats) could not explain it."""
    leaving = await cluster.start(heartbeat_s=QUIET_S / 3, users=["alice"])
    staying = await cluster.start(heartbeat_s=QUIET_S / 3)
    await seen(staying, leaving.id, {"alice"})
    await leaving.stop()
    with trio.move_on_after(2):
        await wait_until(lambda: staying.calls_about(leaving.id, "gone"), WAIT_S)
    assert staying.calls_about(leaving.id, "gone"), "no bye reached the other node"
    assert not staying.sees_online("alice")
    assert staying.link.live_nodes() == {staying.id}
    assert not {key for key in await cluster.keys() if key.endswith(leaving.id)}


_KILLABLE_NODE = """
import sys
import trio
from handler.bus.redis_presence import RedisPresenceLink
from handler.presence.board import user_hash

url, prefix, heartbeat, *users = sys.argv[1:]


class Sink:
    def remote_changes(self, node, changes): pass
    def remote_full(self, node, users, at_ms): pass
    def node_gone(self, node, at_ms): pass
    def local_users(self): return users

    def digest(self, node):
        if node != link.node_id:
            return 0, 0
        value = 0
        for user in users:
            value ^= user_hash(user)
        return len(users), value


async def main():
    async with trio.open_nursery() as nursery:
        await nursery.start(link.run, Sink())
        print(link.node_id, flush=True)


link = RedisPresenceLink(url, prefix=prefix, heartbeat_s=float(heartbeat))
trio.run(main)
"""


async def _read_line(stream: trio.abc.ReceiveStream) -> str:
    data = b""
    while not data.endswith(b"\n"):
        chunk = await stream.receive_some()
        if not chunk:
            raise EOFError(f"the node process ended after {data!r}")
        data += chunk
    return data.decode().strip()


async def test_a_killed_node_is_gone_after_the_silence(cluster: Cluster) -> None:
    """SIGKILL: no bye, keys left behind; the others let its users go once it has been silent
    for three heartbeats, at the time they last heard it."""
    heartbeat = 1.0
    staying = await cluster.start(heartbeat_s=heartbeat)
    command = [sys.executable, "-c", _KILLABLE_NODE, cluster.url, cluster.prefix, str(heartbeat)]
    process = await trio.lowlevel.open_process(
        [*command, "alice", "bob"], stdout=subprocess.PIPE, cwd=ROOT
    )
    try:
        assert process.stdout is not None
        with trio.fail_after(20):  # the interpreter starting and importing
            killed = await _read_line(process.stdout)
        await seen(staying, killed, {"alice", "bob"})
        assert killed in staying.link.live_nodes()

        process.kill()
        await process.wait()
        killed_at, killed_ms = trio.current_time(), now_ms()
        await wait_until(lambda: staying.calls_about(killed, "gone"), 3 * heartbeat + WAIT_S)
        waited = trio.current_time() - killed_at
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    # The last heartbeat came at most one heartbeat before the kill.
    assert waited >= 2 * heartbeat - 0.1, waited
    ((_, _, gone_ms),) = staying.calls_about(killed, "gone")
    assert gone_ms <= killed_ms
    assert not staying.sees_online("alice")
    assert not staying.sees_online("bob")
    assert staying.link.live_nodes() == {staying.id}
    # Nobody deleted its keys: they expire on their own.
    assert 0 < await cluster.redis.ttl(f"{cluster.prefix}p:{killed}") <= KEY_TTL_S


# ---------------------------------------------------------------------- lost and diverged


async def test_a_gap_in_the_counter_reads_the_node_again(cluster: Cluster) -> None:
    """A batch whose publish was lost (set and counter written, nobody told): the next one's
    counter skips a number, and the receiver reads the set, which has both."""
    node = await cluster.start(heartbeat_s=QUIET_S)
    other = cluster.scripted()
    await other.batch(up=["alice"])
    await seen(node, other.id, {"alice"})  # a node it did not know: read whole

    await other.batch(up=["bob"], announce=False)
    await other.batch(up=["carol"])
    await seen(node, other.id, {"alice", "bob", "carol"})
    assert [call[0] for call in node.calls_about(other.id)] == ["full", "full"]

    # From there on the changes apply one by one again.
    await other.batch(down=["alice"])
    await seen(node, other.id, {"bob", "carol"})
    assert node.calls[-1][0] == "changes"
    assert node.calls_about(other.id, "full")[-1] == ("full", other.id, {"alice", "bob", "carol"})


async def test_a_change_repeated_after_a_read_is_not_applied_twice(cluster: Cluster) -> None:
    """A change whose counter the copy already has (read with the set) is skipped."""
    node = await cluster.start(heartbeat_s=QUIET_S)
    other = cluster.scripted()
    await other.batch(up=["alice"], announce=False)
    await other.batch(up=["bob"])  # unknown node: read, counter 2
    await seen(node, other.id, {"alice", "bob"})
    stale = orjson.dumps({"n": other.id, "q": 1, "c": [["alice", 0, now_ms()]]})
    await cluster.redis.publish(f"{cluster.prefix}presence", stale)
    await other.batch(up=["carol"])  # in order after the stale one
    await seen(node, other.id, {"alice", "bob", "carol"})
    assert [call[0] for call in node.calls_about(other.id)] == ["full", "changes"]


async def test_a_heartbeat_whose_hash_differs_reads_the_node_again(cluster: Cluster) -> None:
    """The copy lost a user (and has one the node never had); the next heartbeat at the copy's
    own counter has another count and hash, and the receiver reads the set."""
    node = await cluster.start(heartbeat_s=QUIET_S)
    other = cluster.scripted()
    await other.batch(up=["alice", "bob"])
    await seen(node, other.id, {"alice", "bob"})
    node.copies[other.id] = {"bob", "ghost"}  # diverged

    await other.batch(up=["carol"], beat=True)
    await seen(node, other.id, {"alice", "bob", "carol"})
    assert [call[0] for call in node.calls_about(other.id)] == ["full", "changes", "full"]
    assert node.calls[-1] == ("full", other.id, frozenset({"alice", "bob", "carol"}))


async def test_a_heartbeat_whose_hash_matches_reads_nothing(cluster: Cluster) -> None:
    node = await cluster.start(heartbeat_s=QUIET_S)
    other = cluster.scripted()
    await other.batch(up=["alice"])
    await seen(node, other.id, {"alice"})
    await other.batch(up=["bob"], beat=True)
    await other.batch(up=["carol"])  # it comes after the heartbeat: once applied, so was that
    await seen(node, other.id, {"alice", "bob", "carol"})
    assert [call[0] for call in node.calls_about(other.id)] == ["full", "changes", "changes"]


async def test_a_diverged_copy_of_a_real_node_converges(cluster: Cluster) -> None:
    heartbeat = 0.3
    a = await cluster.start(heartbeat_s=heartbeat, users=["alice", "bob"])
    b = await cluster.start(heartbeat_s=heartbeat)
    await seen(b, a.id, {"alice", "bob"})
    b.copies[a.id] = {"alice", "ghost"}  # a change lost, one never made
    await wait_until(lambda: b.copy_of(a.id) == {"alice", "bob"}, 3 * heartbeat + WAIT_S)
    assert not b.sees_online("ghost")


async def test_idle_heartbeats_do_not_read_the_node_again(cluster: Cluster) -> None:
    """Per the module docstring only a gap, a newcomer or a differing hash reads a node's set;
    idle heartbeats of a node whose copy is current read nothing."""
    heartbeat = 0.3
    a = await cluster.start(heartbeat_s=heartbeat, users=["alice"])
    b = await cluster.start(heartbeat_s=heartbeat)
    await seen(b, a.id, {"alice"})
    await trio.sleep(2 * heartbeat)  # past the writes of a's start and its rewrite
    reads = len(b.calls_about(a.id, "full"))
    await trio.sleep(4 * heartbeat + heartbeat / 2)  # 4 idle heartbeats
    a.connect("bob")  # applied after whatever those heartbeats started
    await seen(b, a.id, {"alice", "bob"})
    assert len(b.calls_about(a.id, "full")) == reads, b.calls_about(a.id)


# ---------------------------------------------------------------------- reconnecting


async def test_after_a_reconnect_a_node_reads_everyone_again(cluster: Cluster) -> None:
    """Pub/sub keeps nothing for a subscriber that was away: once its connection is back, the
    node reads every node's set again (and what it missed comes with it)."""
    name = f"presence-test-{secrets.token_hex(4)}"
    node = await cluster.start(heartbeat_s=QUIET_S, users=["dave"], name=name)
    real = await cluster.start(heartbeat_s=QUIET_S, users=["alice"])
    other = cluster.scripted()
    await other.batch(up=["bob"])
    await seen(node, other.id, {"bob"})
    await seen(node, real.id, {"alice"})
    await seen(real, node.id, {"dave"})
    reads = len(node.calls_about(real.id, "full"))
    own_counter = f"{cluster.prefix}pq:{node.id}"
    written = int(await cluster.redis.get(own_counter) or 0)

    await other.batch(up=["carol"], announce=False)  # missed whatever happens next
    subscribers = [
        client
        for client in await cluster.redis.client_list(type_=PureToken.PUBSUB)
        if client["name"] == name
    ]
    assert len(subscribers) == 1, subscribers
    await cluster.redis.client_kill(identifier=int(subscribers[0]["id"]))

    await seen(node, other.id, {"bob", "carol"})
    await seen(node, real.id, {"alice"})
    assert len(node.calls_about(real.id, "full")) > reads
    assert not node.calls_about(real.id, "gone")
    # It rewrote its own set too (a write at the next counter), and kept its users online.

    async def rewritten() -> bool:
        return int(await cluster.redis.get(own_counter) or 0) > written

    await wait_until(rewritten, WAIT_S)
    assert real.copy_of(node.id) == {"dave"}
    assert await cluster.redis.smembers(f"{cluster.prefix}p:{node.id}") == {b"dave"}
