"""Blocking end to end on a real server (PROTOCOL.md, "Version 2", "Blocking"): every rule,
from both sides. The same tests run on two nodes from `test_e2e_cluster`."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import trio
from support import Client, Frame, RunningServer
from test_e2e_groups import create_group, say
from test_e2e_presence import (
    GRACE_S,
    PRESENCE_LIMITS,
    fetch,
    fetch_eventually,
    online_is,
    presence_becomes,
    watching,
)
from test_e2e_typing import typing_frame

StartServer = Callable[..., Awaitable[RunningServer]]

BLOCK_MESSAGE = "a block is in place between you and this user"


async def blocked(client: Client, frame_type: str, user_id: str | None = None) -> list[str]:
    """Send `block_user` / `unblock_user` / `fetch_blocked`; the `blocked` answer's list."""
    request: dict[str, Any] = {"type": frame_type, "request_id": frame_type}
    if user_id is not None:
        request["user_id"] = user_id
    await client.send(request)
    reply = await client.recv_aside(lambda f: f.get("request_id") == frame_type)
    assert reply["type"] == "blocked", reply
    return list(reply["data"])


async def refused(client: Client, frame: dict[str, Any]) -> Frame:
    reply = await client.request({**frame, "request_id": "r"})
    assert reply["type"] == "error", reply
    assert reply["code"] == "forbidden", reply
    assert reply["message"] == BLOCK_MESSAGE, reply
    assert reply["request_id"] == "r"
    return reply


async def test_block_list_replies_are_sorted_and_idempotent(server: RunningServer) -> None:
    async with server.connect("alice") as alice, server.connect("alice") as tablet:
        assert await blocked(alice, "fetch_blocked") == []
        assert await blocked(alice, "block_user", "zed") == ["zed"]
        assert await blocked(alice, "block_user", "bob") == ["bob", "zed"]
        assert await blocked(alice, "block_user", "bob") == ["bob", "zed"]
        assert await blocked(alice, "unblock_user", "zed") == ["bob"]
        assert await blocked(alice, "unblock_user", "zed") == ["bob"]
        assert await blocked(alice, "fetch_blocked") == ["bob"]
        # Her other device follows every change (and only the changes).
        lists = [f["data"] for f in await tablet.sync() if f["type"] == "blocked"]
        assert lists == [["zed"], ["bob", "zed"], ["bob"]]
    async with server.connect("alice") as alice:
        assert await blocked(alice, "fetch_blocked") == ["bob"]


async def test_block_errors(start_server: StartServer) -> None:
    server = await start_server(limits={"max_blocked_users": 2})
    async with server.connect("alice") as alice:
        for frame, field in [
            ({"type": "block_user", "user_id": "alice"}, "user_id"),
            ({"type": "block_user"}, "user_id"),
            ({"type": "unblock_user", "user_id": 7}, "user_id"),
            ({"type": "block_user", "user_id": " bob"}, "user_id"),
        ]:
            reply = await alice.request({**frame, "request_id": 1})
            assert (reply["type"], reply["code"], reply["field"]) == (
                "error",
                "bad_request",
                field,
            ), reply
        assert await blocked(alice, "block_user", "u1") == ["u1"]
        assert await blocked(alice, "block_user", "u2") == ["u1", "u2"]
        reply = await alice.request({"type": "block_user", "user_id": "u3", "request_id": 1})
        assert (reply["code"], reply["field"]) == ("bad_request", "user_id"), reply
        assert await blocked(alice, "block_user", "u2") == ["u1", "u2"]  # already: fine
        assert await blocked(alice, "fetch_blocked") == ["u1", "u2"]


async def test_no_chat_can_be_created_across_a_block_either_way(server: RunningServer) -> None:
    async with server.connect("alice") as alice, server.connect("bob") as bob:
        await blocked(alice, "block_user", "bob")
        for client, other in ((alice, "bob"), (bob, "alice")):
            reply = await refused(client, {"type": "create_chat", "recipient_id": other})
            assert reply["field"] == "user_id"
        await blocked(alice, "unblock_user", "bob")
        chat = await bob.create_chat("alice")
        assert chat["participants"] == ["alice", "bob"]


async def test_messages_and_edits_are_refused_both_ways_and_deletes_allowed(
    server: RunningServer,
) -> None:
    async with server.connect("alice") as alice, server.connect("bob") as bob:
        chat = await alice.create_chat("bob")
        chat_id = chat["chat_id"]
        await bob.recv_until("new_chats")
        mine = await alice.send_message(chat_id, "bob", "before")
        assert (await bob.recv_until("message"))["message_id"] == mine["message_id"]
        theirs = await bob.send_message(chat_id, "alice", "hello")
        assert (await alice.recv_until("message"))["message_id"] == theirs["message_id"]
        assert await blocked(bob, "block_user", "alice") == ["alice"]
        # The blocked user is not told.
        assert [f for f in await alice.sync() if f["type"] == "blocked"] == []
        for client, other in ((alice, "bob"), (bob, "alice")):
            await refused(
                client,
                {"type": "send_message", "chat_id": chat_id, "recipient_id": other, "content": "x"},
            )
            await refused(client, {"type": "create_chat", "recipient_id": other})
        for client, own in ((alice, mine), (bob, theirs)):
            reply = await refused(
                client,
                {
                    "type": "edit_message",
                    "chat_id": chat_id,
                    "message_id": own["message_id"],
                    "content": "changed",
                },
            )
            assert reply["field"] == "chat_id"
        # Taking back what one wrote stays possible.
        deleted = await alice.request(
            {"type": "delete_message", "chat_id": chat_id, "message_id": mine["message_id"]}
        )
        assert deleted["type"] == "message_updated", deleted
        assert deleted["deleted"] is True
        assert (await bob.recv_until("message_updated"))["deleted"] is True  # bob sees it go
        await refused(alice, typing_frame(chat_id))
        # Stored messages are kept; the chat stays listed for both.
        for client in (alice, bob):
            all_chats, pages = await client.fetch_chats()
            assert [c["chat_id"] for c in all_chats["data"]] == [chat_id]
            assert [m["message_id"] for m in pages[0]["data"]] == [
                mine["message_id"],
                theirs["message_id"],
            ]
        assert await blocked(bob, "unblock_user", "alice") == []
        again = await alice.send_message(chat_id, "bob", "after")
        assert (await bob.recv_until("message"))["message_id"] == again["message_id"]


async def test_a_block_in_both_directions_needs_both_lifted(server: RunningServer) -> None:
    async with server.connect("alice") as alice, server.connect("bob") as bob:
        chat_id = (await alice.create_chat("bob"))["chat_id"]
        await blocked(alice, "block_user", "bob")
        await blocked(bob, "block_user", "alice")
        await blocked(alice, "unblock_user", "bob")
        message = {"type": "send_message", "chat_id": chat_id, "content": "x"}
        await refused(alice, {**message, "recipient_id": "bob"})
        await blocked(bob, "unblock_user", "alice")
        await alice.send_message(chat_id, "bob", "free")


async def test_groups_are_unaffected_apart_from_typing(server: RunningServer) -> None:
    async with (
        server.connect("alice") as alice,
        server.connect("bob") as bob,
        server.connect("carol") as carol,
    ):
        group = await create_group(alice, "club", ["bob", "carol"])
        await blocked(bob, "block_user", "alice")
        for client in (bob, carol):
            await client.sync()
        sent = await say(alice, group["chat_id"], "hi all")
        for member in (bob, carol):
            assert (await member.recv_until("message"))["message_id"] == sent["message_id"]
        await say(bob, group["chat_id"], "hi")
        # alice types: carol sees it, bob (who blocks her) does not; bob types: not to alice.
        await alice.send(typing_frame(group["chat_id"]))
        assert (await carol.recv_until("typing"))["user_id"] == "alice"
        await bob.send(typing_frame(group["chat_id"]))
        assert (await carol.recv_until("typing"))["user_id"] == "bob"
        await trio.sleep(0.2)
        assert [f for f in await bob.sync() if f["type"] == "typing"] == []
        assert [f for f in await alice.sync() if f["type"] == "typing"] == []


async def test_neither_side_sees_the_others_presence(start_server: StartServer) -> None:
    server = await start_server(limits=PRESENCE_LIMITS)
    async with server.connect("alice") as alice, server.connect("bob") as bob:
        watching(alice)
        watching(bob)
        await alice.create_chat("bob")
        await fetch_eventually(alice, ["bob"], online_is(("bob", True)))
        await blocked(alice, "block_user", "bob")
        # Each is shown the other as a stranger at once.
        await presence_becomes(alice, {"user_id": "bob", "online": False, "last_seen": None})
        await presence_becomes(bob, {"user_id": "alice", "online": False, "last_seen": None})
        for client, other in ((alice, "bob"), (bob, "alice")):
            assert await fetch(client, [other]) == [
                {"user_id": other, "online": False, "last_seen": None}
            ]
            assert await fetch(client) == []
        async with server.connect("carol") as carol:
            await carol.create_chat("alice")
        # bob comes and goes: alice hears nothing of it.
        async with server.connect("bob"):
            pass
        await trio.sleep(GRACE_S + 0.3)
        frames = [f for f in await alice.sync() if f["type"] == "presence"]
        assert all(entry["user_id"] != "bob" for f in frames for entry in f["data"]), frames
        await blocked(alice, "unblock_user", "bob")
        await presence_becomes(alice, {"user_id": "bob", "online": True, "last_seen": None})
        await presence_becomes(bob, {"user_id": "alice", "online": True, "last_seen": None})
