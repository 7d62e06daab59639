"""Typing indicators end to end on a real server (PROTOCOL.md, "Version 2", "Typing").

The same tests run on two nodes (PostgreSQL + Redis) from `test_e2e_cluster`, with the
users' connections spread over both.
"""

from __future__ import annotations

from typing import Any

import trio
from support import Client, Frame, RunningServer
from test_e2e_groups import create_group


def typing_frame(chat_id: str, **extra: Any) -> dict[str, Any]:
    return {"type": "typing", "chat_id": chat_id, **extra}


async def next_typing(client: Client, timeout: float = 5.0) -> Frame:
    return await client.recv_until("typing", timeout=timeout)


async def test_typing_reaches_every_device_of_the_other_side_and_nobody_else(
    server: RunningServer,
) -> None:
    async with (
        server.connect("alice") as alice,
        server.connect("alice") as alice_tablet,
        server.connect("bob") as bob_phone,
        server.connect("bob") as bob_laptop,
        server.connect("carol") as carol,
    ):
        chat = await alice.create_chat("bob")
        await carol.create_chat("alice")  # carol shares a chat with alice, not this one
        for client, chats in ((alice_tablet, 2), (bob_phone, 1), (bob_laptop, 1), (alice, 1)):
            for _ in range(chats):
                await client.recv_until("new_chats")
        await alice.send(typing_frame(chat["chat_id"]))
        expected = {
            "type": "typing",
            "chat_id": chat["chat_id"],
            "user_id": "alice",
            "active": True,
            "expires_in_ms": 6000,
        }
        assert await next_typing(bob_phone) == expected
        assert await next_typing(bob_laptop) == expected
        # Not answered, and not echoed to the typist's own devices or to anyone else.
        assert await alice.sync() == []
        assert await alice_tablet.sync() == []
        assert await carol.sync() == []

        await alice.send(typing_frame(chat["chat_id"], active=False))
        for bob in (bob_phone, bob_laptop):
            assert (await next_typing(bob))["active"] is False


async def test_a_renewal_within_a_second_is_not_sent_again(server: RunningServer) -> None:
    async with server.connect("alice") as alice, server.connect("bob") as bob:
        chat = await alice.create_chat("bob")
        await bob.sync()
        for _ in range(5):  # one per key press
            await alice.send(typing_frame(chat["chat_id"]))
        await alice.sync()
        assert (await next_typing(bob))["active"] is True
        assert [f for f in await bob.sync() if f["type"] == "typing"] == []
        await trio.sleep(1.1)
        await alice.send(typing_frame(chat["chat_id"]))
        assert (await next_typing(bob))["active"] is True


async def test_a_typist_who_drops_off_is_shown_stopping_at_once(server: RunningServer) -> None:
    """The typist's socket closes without `active: false`: the server says it for them, long
    before the receiver's 6 s expiry would."""
    async with server.connect("bob") as bob:
        async with server.connect("alice") as alice:
            chat = await alice.create_chat("bob")
            await bob.sync()
            await alice.send(typing_frame(chat["chat_id"]))
            assert (await next_typing(bob))["active"] is True
        started = trio.current_time()
        stopped = await next_typing(bob, timeout=6.0)
        assert stopped == {
            "type": "typing",
            "chat_id": chat["chat_id"],
            "user_id": "alice",
            "active": False,
            "expires_in_ms": 6000,
        }
        assert trio.current_time() - started < 2.0


async def test_typing_after_the_expiry_is_not_repeated_on_close(server: RunningServer) -> None:
    """`active: false` already said: closing says nothing more."""
    async with server.connect("bob") as bob:
        async with server.connect("alice") as alice:
            chat = await alice.create_chat("bob")
            await alice.send(typing_frame(chat["chat_id"]))
            await alice.send(typing_frame(chat["chat_id"], active=False))
            await alice.sync()
            await bob.recv_until("typing")
            assert (await next_typing(bob))["active"] is False
        await trio.sleep(0.3)
        assert [f for f in await bob.sync() if f["type"] == "typing"] == []


async def test_typing_in_a_group_reaches_every_other_member(server: RunningServer) -> None:
    async with (
        server.connect("alice") as alice,
        server.connect("bob") as bob,
        server.connect("carol") as carol,
    ):
        group = await create_group(alice, "trip", ["bob", "carol"])
        await bob.sync()
        await carol.sync()
        await bob.send(typing_frame(group["chat_id"]))
        for member in (alice, carol):
            frame = await next_typing(member)
            assert (frame["user_id"], frame["chat_id"]) == ("bob", group["chat_id"])
        assert [f for f in await bob.sync() if f["type"] == "typing"] == []


async def test_typing_errors(server: RunningServer) -> None:
    async with server.connect("alice") as alice, server.connect("mallory") as mallory:
        chat = await alice.create_chat("bob")
        cases = [
            (mallory, typing_frame(chat["chat_id"]), "forbidden", "chat_id"),
            (alice, typing_frame("999999"), "not_found", "chat_id"),
            (alice, typing_frame(chat["chat_id"], active="yes"), "bad_request", "active"),
            (alice, {"type": "typing"}, "bad_request", "chat_id"),
        ]
        for client, frame, code, field in cases:
            reply = await client.request({**frame, "request_id": "t"})
            assert reply["type"] == "error", reply
            assert (reply["code"], reply["field"], reply["request_id"]) == (code, field, "t")
        # The connection is fine afterwards.
        assert await alice.sync() == []
