"""Fan-out runs outside the store: a fault while fanning out one event is contained.

The store commits and hands each commit to the hub's publisher over a bounded channel; a
fault after that (publishing to the bus, or handing the event to one connection) is logged
with a correlation id, the event stays stored, and the connections that may have missed it
rebind, which delivers it from the store exactly once. These tests inject such faults into a
real server and check all of that through real clients.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import pytest
import trio
from support import RunningServer, backlog_messages

from handler.bus.base import Delivery
from handler.connection import Outgoing
from handler.transport.driver import SessionDriver

TIMEOUT_S = 10


def _correlated(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if "correlation=" in r.getMessage()]


async def test_a_fault_publishing_one_message_is_survived(
    server: RunningServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    services = server.app.services
    assert services is not None
    bus = services.hub.bus
    publish: Callable[[Delivery], None] = bus.publish_nowait

    def faulty(event: Delivery) -> None:
        if event.message is not None and event.message.content == "boom":
            raise RuntimeError("injected fan-out fault")
        publish(event)

    monkeypatch.setattr(bus, "publish_nowait", faulty)
    with trio.fail_after(TIMEOUT_S):
        async with server.connect("alice") as alice, server.connect("bob") as bob:
            chat = await alice.create_chat("bob")
            assert (await bob.recv())["type"] == "new_chats"
            await alice.send(
                {
                    "type": "send_message",
                    "chat_id": chat["chat_id"],
                    "recipient_id": "bob",
                    "content": "boom",
                    "client_message_id": "c1",
                }
            )
            # Both users' connections here may have missed it: they are closed to rebind.
            assert await alice.wait_closed() == 1013
            assert await bob.wait_closed() == 1013
        # The store was not touched by the fault: the resend is idempotent and acknowledged,
        # the recipient gets the message once, from its backlog, and live traffic goes on.
        async with server.connect("alice") as alice, server.connect("bob") as bob:
            again = await alice.send_message(chat["chat_id"], "bob", "boom", client_message_id="c1")
            assert [m["message_id"] for m in backlog_messages(bob.backlog)] == [again["message_id"]]
            after = await alice.send_message(chat["chat_id"], "bob", "after")
            live = await bob.recv()
            assert (live["type"], live["message_id"]) == ("message", after["message_id"])
    logged = _correlated(caplog)
    assert logged, "the fault must be logged with a correlation id"
    assert logged[0].levelno == logging.ERROR


async def test_a_fault_handing_an_event_to_one_connection_closes_only_that_one(
    server: RunningServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    broken: set[str] = set()
    deliver = SessionDriver.deliver_nowait

    def faulty(self: SessionDriver, item: Outgoing) -> None:
        if self.connection.id in broken and item.frame_type == "message":
            raise RuntimeError("injected fault in one connection")
        deliver(self, item)

    monkeypatch.setattr(SessionDriver, "deliver_nowait", faulty)
    with trio.fail_after(TIMEOUT_S):
        async with server.connect("alice") as alice:
            chat = await alice.create_chat("bob")
            async with server.connect("bob") as bob, server.connect("bob") as bob2:
                services = server.app.services
                assert services is not None
                connections = list(services.hub.user_connections("bob"))
                assert len(connections) == 2
                broken.add(connections[0].id)
                sent = await alice.send_message(chat["chat_id"], "bob", "hello")
                # The sender is acknowledged; the healthy connection gets it live; the faulty
                # one is closed with 1013 and nothing else is affected.
                codes: list[Any] = []
                for client in (bob, bob2):
                    frame = await client.recv_event_or_close()
                    codes.append(frame if isinstance(frame, int) else frame["type"])
                assert sorted(codes, key=str) == [1013, "message"]
                after = await alice.send_message(chat["chat_id"], "bob", "after")
                healthy = bob if codes[0] == "message" else bob2
                live = await healthy.recv()
                assert live["message_id"] == after["message_id"]
                assert sent["content"] == "hello"
    assert _correlated(caplog), "the fault must be logged with a correlation id"
