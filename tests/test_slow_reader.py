"""A client that stops reading is dropped, and what it missed stays undelivered.

PROTOCOL.md ("Delivery", "Errors and limits"): a message counts as delivered once the
client's TCP stack took it; bytes still unacknowledged in the server's send buffer when the
connection is aborted do not count. So however the slow consumer is dropped (close 1013, or
a TCP reset), every message acknowledged to its sender reaches the victim exactly once:
in what it can still read from its socket, or in its next backlog; never both, never neither.

The victim is a bare socket with a 64 KiB receive buffer that reads nothing after binding;
three senders send it 19 messages a second each (just under the default per-user rate).
Once the server drops it, the victim reads whatever is still readable from its socket,
reconnects, and the two are compared with what the senders were acknowledged. Once on one
process (SQLite), once on two nodes (PostgreSQL + Redis) with the victim on one and the
senders on the other.
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Final

import attrs
import pytest
import trio
from attack_support import (
    ServerProcess,
    SilentClient,
    mib,
    server_process,
    slow_consumers_dropped,
    write_config,
)
from scale_support import database_url, fresh_schema, redis_url, unique_prefix
from support import Client, RunningServer, backlog_messages, make_token

pytestmark = pytest.mark.slow

VICTIM: Final = "victim"
SENDERS: Final = 3
RATE: Final = 19.0  # messages a second per sender
VICTIM_RCVBUF: Final = 64 * 1024
# Two shapes of the same run: short messages (~200 characters) and a small queue, so the drop
# comes soon after the socket buffers are full and many messages are in flight when it
# comes; and the default queues (256 frames, 1 MiB) with ~8 KB messages (2,000 emoji), which
# fill them within seconds.
QUEUES = pytest.mark.parametrize(
    ("limits", "content"),
    [
        ({"send_queue": 16, "send_queue_bytes": 64 * 1024}, "x" * 180),
        ({}, "\U0001f600" * 2000),
    ],
    ids=["small-queue-short-messages", "default-queue-8KB-messages"],
)
DROP_TIMEOUT_S: Final = 30.0
# A client reconnects after a short backoff; the server records deliveries asynchronously
# (batched), and this is not the test of an immediate rebind.
RECONNECT_DELAY_S: Final = 1.0


@attrs.define
class Outcome:
    acknowledged: list[str]
    live: list[str]
    backlog: list[str]
    drop_after_s: float
    how: str
    bytes_read: int

    def report(self, title: str) -> tuple[list[str], list[str]]:
        live, backlog = collections.Counter(self.live), collections.Counter(self.backlog)
        missing = [m for m in self.acknowledged if not live[m] and not backlog[m]]
        duplicated = [m for m in self.acknowledged if live[m] + backlog[m] > 1]
        unexpected = sorted((set(live) | set(backlog)) - set(self.acknowledged))
        print(
            f"\n{title}: dropped after {self.drop_after_s:.1f} s ({self.how});"
            f" victim read {mib(self.bytes_read)} from its socket afterwards"
        )
        print(
            f"  acknowledged {len(self.acknowledged)}, read live {len(self.live)}, read in"
            f" backlog {len(self.backlog)}, missing {len(missing)}, duplicated"
            f" {len(duplicated)}, not acknowledged but received {len(unexpected)}"
        )
        if missing:
            print(f"  missing, e.g. {missing[:5]}")
        if duplicated:
            print(f"  duplicated, e.g. {duplicated[:5]}")
        return missing, duplicated


async def _send(
    client: Client,
    chat_id: str,
    index: int,
    content: str,
    acknowledged: list[str],
    stop: trio.Event,
) -> None:
    """Send at `RATE` until told to stop; each message waits for its acknowledgement."""
    started = trio.current_time()
    sent = 0
    while not stop.is_set():
        ack = await client.send_message(chat_id, VICTIM, f"sender{index} #{sent} {content}")
        acknowledged.append(ack["message_id"])
        sent += 1
        with trio.move_on_at(started + sent / RATE):
            await stop.wait()


async def _wait_dropped(victim: SilentClient, node: RunningServer) -> str:
    """Until the server let go of the victim: seen on its socket (a reset, or a close that
    reached it) or, when its own unread data holds the close back, in the server's count."""
    while True:
        for _ in range(5):
            if victim.peer_gone():
                return "seen on the socket"
            await trio.sleep(0.1)
        if await slow_consumers_dropped(node) >= 1:
            return "counted by the server"


async def slow_reader_run(
    victim_node: ServerProcess, sender_node: ServerProcess, content: str
) -> Outcome:
    victim_server, sender_server = victim_node.server, sender_node.server
    acknowledged: list[str] = []
    stop = trio.Event()
    victim = await SilentClient.connect(
        victim_node.port, make_token(VICTIM), rcvbuf=VICTIM_RCVBUF
    )  # bound: `authenticated` was read; nothing more is
    try:
        async with contextlib.AsyncExitStack() as stack:
            senders = [
                await stack.enter_async_context(sender_server.connect(f"sender{i}"))
                for i in range(SENDERS)
            ]
            chats = [await sender.create_chat(VICTIM) for sender in senders]
            started = trio.current_time()
            with trio.fail_after(DROP_TIMEOUT_S + 15):
                async with trio.open_nursery() as nursery:
                    for index, (sender, chat) in enumerate(zip(senders, chats, strict=True)):
                        nursery.start_soon(
                            _send, sender, chat["chat_id"], index, content, acknowledged, stop
                        )
                    how = "not dropped"
                    with trio.move_on_after(DROP_TIMEOUT_S):
                        how = await _wait_dropped(victim, victim_server)
                    drop_after = trio.current_time() - started
                    stop.set()  # the senders finish their message in flight
        frames = await victim.drain()
        how += f"; close code {victim.close_code}, reset {victim.reset}"
    finally:
        victim.close()
    assert how.startswith(("seen", "counted")), f"the victim was not dropped within {how}"
    live = [f["message_id"] for f in frames if f.get("type") == "message"]
    await trio.sleep(RECONNECT_DELAY_S)
    async with victim_server.connect(VICTIM) as again:
        backlog = [m["message_id"] for m in backlog_messages(again.backlog)]
    return Outcome(acknowledged, live, backlog, drop_after, how, victim.bytes_read)


def _check(outcome: Outcome, title: str) -> None:
    missing, duplicated = outcome.report(title)
    assert outcome.acknowledged, "nothing was sent"
    assert not missing, f"{len(missing)} acknowledged messages never reached the victim"
    assert not duplicated, f"{len(duplicated)} messages reached the victim twice"


@QUEUES
async def test_what_a_dropped_slow_reader_missed_stays_undelivered(
    tmp_path: Path, limits: dict[str, int], content: str
) -> None:
    config = write_config(tmp_path, limits=limits)
    async with server_process(config) as handler:
        outcome = await slow_reader_run(handler, handler, content)
    _check(outcome, "one process (SQLite)")


@asynccontextmanager
async def _two_nodes(
    tmp_path: Path, limits: dict[str, int]
) -> AsyncIterator[Sequence[ServerProcess]]:
    database, redis = database_url(), redis_url()
    prefix = unique_prefix()
    with fresh_schema(database) as dsn:
        shared: dict[str, Any] = {
            "storage": {"backend": "postgres", "dsn": dsn, "pool_size": 4},
            "bus": {"backend": "redis", "url": redis, "prefix": prefix},
        }
        configs = [write_config(tmp_path / f"node{i}", limits=limits, **shared) for i in (0, 1)]
        async with server_process(configs[0]) as one, server_process(configs[1]) as two:
            yield one, two


@pytest.mark.scale
@QUEUES
async def test_what_a_dropped_slow_reader_missed_stays_undelivered_across_nodes(
    tmp_path: Path, limits: dict[str, int], content: str
) -> None:
    async with _two_nodes(tmp_path, limits) as (victim_node, sender_node):
        outcome = await slow_reader_run(victim_node, sender_node, content)
    _check(outcome, "two nodes (PostgreSQL + Redis), victim on one, senders on the other")
