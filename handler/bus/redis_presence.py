"""Presence between nodes through Redis: each node's users in a key that expires, and its
changes on one channel.

Theory of operation:
- Each node keeps its bound users in the set `{prefix}p:{node}` and a counter of its changes
  in `{prefix}pq:{node}`, both expiring after `KEY_TTL_S` unless refreshed (every heartbeat).
  A batch of changes (every `BATCH_S`, the same user's changes within it coalesced to the
  last) is one MULTI: the set changes, the counter, and the announcement on
  `{prefix}presence` carrying that counter value. So a copy read in one MULTI (members and
  counter together) is exact as of that counter: what came after it is what has a higher one.
  A heartbeat alone refreshes the keys and announces the count and hash of the users under
  the current counter, which it does not move.
- A receiving node applies a node's changes in counter order. A gap (a number skipped: pub/sub
  lost something, or the node rewrote its set after an error), a node it has not seen, or a
  heartbeat whose count and hash of users differ from the board's copy of that node: it reads
  the node's set and counter, replaces its copy, and applies what came after.
- A node that is silent for `SILENT_S` (three heartbeats) is gone: its users are let go at
  its last heartbeat (each node's board then waits the grace before saying so). A node that
  stops cleanly says `bye` first.
- After its own subscriber reconnects, a node reads every node's set again (pub/sub keeps
  nothing for the disconnected) and rewrites its own.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Sequence
from typing import Any, Final

import coredis
import orjson
import trio
from coredis.patterns.pubsub import PubSub
from coredis.retry import NoRetryPolicy

from handler.bus.redis_errors import reraise_cancellation
from handler.presence.link import Change, PresenceSink
from handler.timefmt import now_ms

log = logging.getLogger("handler.bus.presence")

BATCH_S: Final = 0.05
HEARTBEAT_S: Final = 5.0
SILENT_S: Final = 3 * HEARTBEAT_S
KEY_TTL_S: Final = 30
_COMMAND_TIMEOUT_S: Final = 5.0
_BACKOFF_MIN_S: Final = 0.1
_BACKOFF_MAX_S: Final = 5.0


class RedisPresenceLink:
    """See the module docstring."""

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "chat:",
        heartbeat_s: float = HEARTBEAT_S,
        batch_s: float = BATCH_S,
    ) -> None:
        self.node_id = secrets.token_hex(8)
        self._url = url
        self._prefix = prefix
        self._channel = f"{prefix}presence".encode()
        self._heartbeat_s = heartbeat_s
        self._silent_s = 3 * heartbeat_s
        self._batch_s = batch_s
        self._sink: PresenceSink | None = None
        self._client: coredis.Redis[bytes] | None = None
        self._pending: dict[str, tuple[bool, int]] = {}
        self._pending_set = trio.Event()
        self._seq = 0
        self._rewrite = True  # the key must be written whole (first start, after an error)
        self._known: dict[str, int] = {}  # node -> last counter applied
        self._heard: dict[str, tuple[float, int]] = {}  # node -> (monotonic, wall ms) last heard
        self._syncing: dict[str, list[dict[str, Any]]] = {}  # node -> messages held meanwhile
        self._nursery: trio.Nursery | None = None

    # ------------------------------------------------------------------ keys

    def _members_key(self, node: str) -> str:
        return f"{self._prefix}p:{node}"

    def _seq_key(self, node: str) -> str:
        return f"{self._prefix}pq:{node}"

    def _node_of(self, counter_key: bytes) -> str:
        return counter_key.decode().removeprefix(f"{self._prefix}pq:")

    # ------------------------------------------------------------------ lifecycle

    async def run(
        self, sink: PresenceSink, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        self._sink = sink
        client = self._connect()
        try:
            async with client, trio.open_nursery() as nursery:
                self._client = client
                self._nursery = nursery
                nursery.start_soon(self._publisher, client)
                nursery.start_soon(self._watch_silence)
                await nursery.start(self._subscriber, client)
                task_status.started()
        finally:
            self._client = None
            self._nursery = None
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                await self._say_bye()

    async def _say_bye(self) -> None:
        """Drop our keys and tell the others, on a client of its own: the running one's
        connections belong to the nursery being cancelled."""
        try:
            async with self._connect() as client, client.pipeline(transaction=True) as pipe:
                pipe.delete([self._members_key(self.node_id), self._seq_key(self.node_id)])
                pipe.publish(self._channel, orjson.dumps({"n": self.node_id, "bye": now_ms()}))
        except BaseException as error:
            reraise_cancellation(error)
            log.info("presence: could not say bye: %r", error)

    def _connect(self) -> coredis.Redis[bytes]:
        return coredis.Redis.from_url(
            self._url,
            retry_policy=NoRetryPolicy(),
            connect_timeout=_COMMAND_TIMEOUT_S,
            stream_timeout=_COMMAND_TIMEOUT_S,
        )

    def live_nodes(self) -> frozenset[str]:
        now = trio.current_time()
        alive = {node for node, (at, _) in self._heard.items() if now - at < self._silent_s}
        return frozenset({self.node_id, *alive})

    # ------------------------------------------------------------------ publishing

    def announce(self, user_id: str, online: bool, at_ms: int) -> None:
        self._pending[user_id] = (online, at_ms)
        self._pending_set.set()

    async def _publisher(self, client: coredis.Redis[bytes]) -> None:
        """Batches of changes, and the heartbeat when there are none; an error makes the next
        write a whole rewrite (others notice the counter's jump and read it)."""
        delay = 0.0
        next_beat = trio.current_time()
        while True:
            with trio.move_on_at(next_beat):
                await self._pending_set.wait()
                await trio.sleep(self._batch_s)
            self._pending_set = trio.Event()
            batch, self._pending = self._pending, {}
            beat = trio.current_time() >= next_beat
            try:
                with trio.fail_after(_COMMAND_TIMEOUT_S):
                    await self._write(client, batch, beat)
            except BaseException as error:
                reraise_cancellation(error)
                log.warning("presence: publishing %d changes failed: %r", len(batch), error)
                self._rewrite = True
                delay = min(max(delay * 2, _BACKOFF_MIN_S), _BACKOFF_MAX_S)
                await trio.sleep(delay)
                continue
            delay = 0.0
            if beat:
                next_beat = trio.current_time() + self._heartbeat_s

    async def _write(
        self, client: coredis.Redis[bytes], batch: dict[str, tuple[bool, int]], beat: bool
    ) -> None:
        assert self._sink is not None
        members, counter = self._members_key(self.node_id), self._seq_key(self.node_id)
        rewrite = self._rewrite
        if batch or rewrite:
            self._seq += 1  # a heartbeat alone keeps the counter: nobody needs to read us
        async with client.pipeline(transaction=True) as pipe:
            if rewrite:
                users = list(self._sink.local_users())
                pipe.delete([members])
                if users:
                    pipe.sadd(members, users)
            else:
                ups = [user for user, (online, _) in batch.items() if online]
                downs = [user for user, (online, _) in batch.items() if not online]
                if ups:
                    pipe.sadd(members, ups)
                if downs:
                    pipe.srem(members, downs)
            pipe.set(counter, str(self._seq))
            pipe.expire(members, KEY_TTL_S)
            pipe.expire(counter, KEY_TTL_S)
            if batch and not rewrite:
                changes = [[user, int(online), at] for user, (online, at) in batch.items()]
                pipe.publish(
                    self._channel, orjson.dumps({"n": self.node_id, "q": self._seq, "c": changes})
                )
            if beat or rewrite:
                count, digest = self._sink.digest(self.node_id)
                pipe.publish(
                    self._channel,
                    orjson.dumps({"n": self.node_id, "q": self._seq, "h": [count, str(digest)]}),
                )
        self._rewrite = False

    # ------------------------------------------------------------------ receiving

    async def _subscriber(
        self, client: coredis.Redis[bytes], task_status: trio.TaskStatus[None]
    ) -> None:
        started = False
        delay = 0.0
        while True:
            try:
                async with client.pubsub(
                    retry_policy=NoRetryPolicy(),
                    ignore_subscribe_messages=True,
                    subscription_timeout=_COMMAND_TIMEOUT_S,
                ) as pubsub:
                    with trio.fail_after(_COMMAND_TIMEOUT_S * 2):
                        await pubsub.subscribe(self._channel)
                        await self._read_everyone(client)
                    self._rewrite = True  # what we wrote while away may be lost
                    self._pending_set.set()
                    delay = 0.0
                    if not started:
                        task_status.started()
                        started = True
                    await self._consume(pubsub)
            except BaseException as error:
                reraise_cancellation(error)
                log.warning("presence: redis subscriber connection lost: %r", error)
            if not started:
                log.warning("presence: redis is unreachable; retrying")
                task_status.started()
                started = True
            delay = min(max(delay * 2, _BACKOFF_MIN_S), _BACKOFF_MAX_S)
            await trio.sleep(delay)

    async def _consume(self, pubsub: PubSub[bytes]) -> None:
        silence = self._heartbeat_s * 3
        with trio.CancelScope(deadline=trio.current_time() + silence) as watchdog:
            while True:
                message = await pubsub.get_message()
                watchdog.deadline = trio.current_time() + silence
                if message is None or message["type"] != "message":
                    continue
                data = message["data"]
                if isinstance(data, bytes):
                    self._received(data)
        raise TimeoutError(f"no presence traffic for {silence:.1f}s")

    def _received(self, data: bytes) -> None:
        try:
            decoded = orjson.loads(data)
            node = decoded["n"]
            if not isinstance(node, str):
                raise TypeError("node id")
        except (orjson.JSONDecodeError, LookupError, TypeError) as error:
            log.warning("presence: ignoring a malformed payload: %r", error)
            return
        if node == self.node_id:
            return
        assert self._sink is not None
        if "bye" in decoded:
            self._forget(node)
            self._sink.node_gone(node, int(decoded["bye"]))
            return
        self._heard[node] = (trio.current_time(), now_ms())
        held = self._syncing.get(node)
        if held is not None:
            held.append(decoded)
            return
        if node not in self._known:
            self._sync(node, [decoded])
            return
        self._apply(node, decoded)

    def _apply(self, node: str, decoded: dict[str, Any]) -> None:
        """One payload of a node whose copy is current; a gap or a mismatch reads it again."""
        assert self._sink is not None
        try:
            seq = int(decoded["q"])
            known = self._known[node]
            if "c" in decoded:
                if seq <= known:
                    return
                if seq != known + 1:
                    self._sync(node, [decoded])
                    return
                self._sink.remote_changes(node, _changes(decoded["c"]))
                self._known[node] = seq
            elif "h" in decoded:
                count, digest = decoded["h"]
                if seq > known or (
                    seq == known and self._sink.digest(node) != (int(count), int(digest))
                ):
                    self._sync(node, [])
        except (LookupError, TypeError, ValueError) as error:
            log.warning("presence: ignoring a malformed payload: %r", error)

    def _sync(self, node: str, held: list[dict[str, Any]]) -> None:
        if node in self._syncing or self._nursery is None:
            return
        self._syncing[node] = held
        self._nursery.start_soon(self._read_node, node)

    async def _read_node(self, node: str) -> None:
        """Replace the board's copy of `node` with its key, then apply what came after."""
        client, sink = self._client, self._sink
        try:
            if client is None or sink is None:
                return
            try:
                with trio.fail_after(_COMMAND_TIMEOUT_S):
                    async with client.pipeline(transaction=True) as pipe:
                        pipe.smembers(self._members_key(node))
                        pipe.get(self._seq_key(node))
                    results = pipe.results or ((), None)
            except BaseException as error:
                reraise_cancellation(error)
                log.warning("presence: reading node %s failed: %r", node, error)
                self._known.pop(node, None)  # read again on its next payload
                return
            if node not in self._syncing:
                return  # it said bye while we read: what we read is stale
            members, counter = results
            if counter is None:  # the node is gone (its keys expired, or it said bye)
                self._forget(node)
                sink.node_gone(node, now_ms())
                return
            users = [member.decode() for member in members]
            sink.remote_full(node, users, now_ms())
            self._known[node] = int(counter)
        finally:
            held = self._syncing.pop(node, [])
        for decoded in held:
            if node in self._known:
                self._apply(node, decoded)

    async def _read_everyone(self, client: coredis.Redis[bytes]) -> None:
        """Every node's copy, read again (at start and after a reconnect)."""
        nodes = set()
        # By the counters: a node with nobody online has no set, but is alive.
        async for key in client.scan_iter(match=f"{self._prefix}pq:*".encode()):
            node = self._node_of(key)
            if node != self.node_id:
                nodes.add(node)
        assert self._sink is not None
        for node in set(self._known) - nodes:
            self._forget(node)
            self._sink.node_gone(node, now_ms())
        for node in nodes:
            self._heard.setdefault(node, (trio.current_time(), now_ms()))
            self._known.pop(node, None)
            self._sync(node, [])

    async def _watch_silence(self) -> None:
        while True:
            await trio.sleep(min(1.0, self._heartbeat_s))
            now = trio.current_time()
            for node, (heard, heard_ms) in list(self._heard.items()):
                if now - heard >= self._silent_s and self._sink is not None:
                    log.warning("presence: node %s silent for %.0f s", node, now - heard)
                    self._forget(node)
                    self._sink.node_gone(node, heard_ms)

    def _forget(self, node: str) -> None:
        self._known.pop(node, None)
        self._heard.pop(node, None)
        self._syncing.pop(node, None)  # a read under way is stale


def _changes(items: Any) -> Sequence[Change]:
    if not isinstance(items, list):
        raise TypeError("changes")
    changes: list[Change] = []
    for item in items:
        user, online, at = item
        if not isinstance(user, str) or online not in (0, 1):
            raise ValueError(f"not a change: {item!r}")
        changes.append((user, bool(online), int(at)))
    return changes
