"""End to end: create_chat, fetch_chats and fetch_messages."""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio
from conftest import StartServer
from support import (
    Client,
    Frame,
    RunningServer,
    backlog_messages,
    static,
    wait_marked,
    wait_nothing_pending,
)

from handler.protocol import Chat, ChatView
from handler.services import Services
from handler.store import Store, open_store

TIMESTAMP = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")


async def next_millisecond() -> None:
    """Timestamps have millisecond resolution: make the next event's strictly later."""
    now_ns = time.time_ns()
    await trio.sleep((1_000_000 - now_ns % 1_000_000) / 1e9 + 0.0002)


def services_of(server: RunningServer) -> Services:
    services = server.app.services
    assert services is not None
    return services


async def stored_chat(server: RunningServer, chat_id: str) -> Chat:
    chat = await services_of(server).store.get_chat(chat_id)
    assert chat is not None
    return chat


@asynccontextmanager
async def behind_the_hubs_back(server: RunningServer) -> AsyncIterator[Store]:
    """A second store on the server's database, whose writes no hub hears of: as if every
    write of them to the user's connections had failed (or another tool wrote them)."""
    store = open_store(server.app.chat_config.storage)
    async with trio.open_nursery() as nursery:
        await store.open(nursery)
        try:
            yield store
        finally:
            await store.aclose()


async def send_many(client: Client, chat: Frame, recipient: str, count: int) -> list[Frame]:
    return [await client.send_message(chat["chat_id"], recipient, f"m{i}") for i in range(count)]


# --------------------------------------------------------------------------- create_chat


async def test_create_chat_reply_and_chat_object(server: RunningServer) -> None:
    async with server.connect("bob") as bob:
        reply = await bob.request({"type": "create_chat", "recipient_id": "alice", "request_id": 1})
    assert reply["type"] == "new_chats"
    assert reply["request_id"] == 1
    [chat] = reply["data"]
    assert set(chat) == {
        "chat_id",
        "participants",
        "created_by",
        "created_at",
        # version 2: server state, computed for bob
        "kind",
        "title",
        "last_message",
        "unread_count",
        "read_up_to",
        "delivered_up_to",
    }
    assert (chat["kind"], chat["title"], chat["last_message"], chat["unread_count"]) == (
        "direct",
        None,
        None,
        0,
    )
    assert chat["read_up_to"] == chat["delivered_up_to"] == {"alice": 0, "bob": 0}
    assert isinstance(chat["chat_id"], str)
    assert chat["chat_id"]
    assert chat["participants"] == ["alice", "bob"]  # sorted
    assert chat["created_by"] == "bob"
    assert TIMESTAMP.match(chat["created_at"]), chat["created_at"]


async def test_create_chat_is_idempotent_and_always_replies(server: RunningServer) -> None:
    async with server.connect("alice") as alice, server.connect("bob") as bob:
        first = await alice.create_chat("bob")
        assert (await bob.recv())["data"] == [first]
        again = await alice.create_chat("bob")
        from_bob = await bob.create_chat("alice")
        assert again == first
        assert from_bob == first  # one chat per pair, whoever asks
        await alice.expect_no_frame(0.1)
        await bob.expect_no_frame(0.1)


async def test_new_chat_goes_to_every_other_connection_of_both_participants(
    server: RunningServer,
) -> None:
    async with (
        server.connect("alice") as alice1,
        server.connect("alice") as alice2,
        server.connect("bob") as bob1,
        server.connect("bob") as bob2,
        server.connect("carol") as carol,
    ):
        reply = await alice1.request({"type": "create_chat", "recipient_id": "bob"})
        chat = reply["data"][0]
        for other in (alice2, bob1, bob2):
            pushed = await other.recv()
            assert pushed == {"type": "new_chats", "data": [chat]}  # no request_id
        for connection in (alice1, alice2, bob1, bob2, carol):
            await connection.expect_no_frame(0.1)
        # Existing chat: only the requester hears about it.
        assert await bob2.create_chat("alice") == chat
        for connection in (alice1, alice2, bob1, carol):
            await connection.expect_no_frame(0.1)


async def test_chat_with_yourself_is_bad_request(server: RunningServer) -> None:
    async with server.connect("alice") as alice:
        error = await alice.request(
            {"type": "create_chat", "recipient_id": "alice", "request_id": "self"}
        )
        assert error["type"] == "error"
        assert (error["code"], error["field"], error["request_id"]) == (
            "bad_request",
            "recipient_id",
            "self",
        )
        all_chats, _ = await alice.fetch_chats()
        assert all_chats["data"] == []


async def test_invalid_recipient_is_bad_request(server: RunningServer) -> None:
    async with server.connect("alice") as alice:
        for recipient in ("", " bob", "x" * 129, "b\u0000b", 5, None):
            error = await alice.request({"type": "create_chat", "recipient_id": recipient})
            assert (error["code"], error["field"]) == ("bad_request", "recipient_id")


async def test_chat_for_an_offline_recipient_waits_in_the_backlog(server: RunningServer) -> None:
    async with server.connect("alice") as alice:
        chat = await alice.create_chat("bob")
    async with server.connect("bob") as bob:
        assert bob.backlog == [{"type": "new_chats", "data": [chat]}]
    await wait_nothing_pending(server, "bob")
    async with server.connect("bob") as bob:
        assert bob.backlog == []
    async with server.connect("alice") as alice:
        assert alice.backlog == []  # the creator's copy counts as delivered


# --------------------------------------------------------------------------- fetch_chats


async def test_fetch_chats_orders_by_last_activity_then_one_page_per_chat(
    server: RunningServer,
) -> None:
    async with server.connect("alice") as alice:
        carol = await alice.create_chat("carol")
        await next_millisecond()
        bob = await alice.create_chat("bob")
        await next_millisecond()
        dave = await alice.create_chat("dave")
        await next_millisecond()
        to_carol = await send_many(alice, carol, "carol", 2)
        await next_millisecond()
        to_bob = await send_many(alice, bob, "bob", 3)

        all_chats, pages = await alice.fetch_chats(request_id="fc")
        assert all_chats["request_id"] == "fc"
        assert [c["chat_id"] for c in all_chats["data"]] == [
            bob["chat_id"],
            carol["chat_id"],
            dave["chat_id"],
        ]
        assert static(all_chats["data"][0]) == static(bob)
        assert all_chats["data"][0]["last_message"]["message_id"] == to_bob[-1]["message_id"]
        assert [p["chat_id"] for p in pages] == [c["chat_id"] for c in all_chats["data"]]
        assert all(p["request_id"] == "fc" for p in pages)
        assert all(p["has_more"] is False for p in pages)
        ids = [[m["message_id"] for m in p["data"]] for p in pages]
        assert ids == [
            [m["message_id"] for m in to_bob],
            [m["message_id"] for m in to_carol],
            [],
        ]
        first = pages[0]["data"][0]
        expected = {k: v for k, v in to_bob[0].items() if k not in ("type", "request_id")}
        assert first == expected

        # New activity moves a chat to the front.
        await next_millisecond()
        await alice.send_message(dave["chat_id"], "dave", "now")
        all_chats, _ = await alice.fetch_chats()
        assert [c["chat_id"] for c in all_chats["data"]] == [
            dave["chat_id"],
            bob["chat_id"],
            carol["chat_id"],
        ]


async def test_fetch_chats_with_no_chats(server: RunningServer) -> None:
    async with server.connect("loner") as loner:
        await loner.send({"type": "fetch_chats", "request_id": 1})
        assert await loner.recv() == {"type": "all_chats", "data": [], "request_id": 1}
        await loner.expect_no_frame(0.1)


async def test_fetch_chats_limit_and_history_cap(start_server: StartServer) -> None:
    server = await start_server(limits={"history_limit": 5})
    async with server.connect("alice") as alice:
        chat = await alice.create_chat("bob")
        sent = await send_many(alice, chat, "bob", 8)
        ids = [m["message_id"] for m in sent]

        _, [page] = await alice.fetch_chats()
        assert [m["message_id"] for m in page["data"]] == ids[-5:]  # capped, oldest first
        assert page["has_more"] is True
        _, [page] = await alice.fetch_chats(limit=100)
        assert [m["message_id"] for m in page["data"]] == ids[-5:]
        assert page["has_more"] is True
        _, [page] = await alice.fetch_chats(limit=3)
        assert [m["message_id"] for m in page["data"]] == ids[-3:]
        assert page["has_more"] is True


async def test_fetch_chats_has_more_is_exact(server: RunningServer) -> None:
    async with server.connect("alice") as alice:
        chat = await alice.create_chat("bob")
        await send_many(alice, chat, "bob", 3)
        _, [page] = await alice.fetch_chats(limit=3)
        assert (len(page["data"]), page["has_more"]) == (3, False)
        _, [page] = await alice.fetch_chats(limit=2)
        assert (len(page["data"]), page["has_more"]) == (2, True)


async def test_fetch_chats_bad_limit(server: RunningServer) -> None:
    async with server.connect("alice") as alice:
        for limit in (-1, "10", 1.5, True):  # 0 is version 2's "chat list alone"
            error = await alice.request({"type": "fetch_chats", "limit": limit, "request_id": 2})
            assert (error["code"], error["field"], error["request_id"]) == (
                "bad_request",
                "limit",
                2,
            )


async def test_fetch_chats_only_shows_the_users_chats(server: RunningServer) -> None:
    async with server.connect("alice") as alice, server.connect("carol") as carol:
        await alice.create_chat("bob")
        chat = await carol.create_chat("dave")
        all_chats, _ = await carol.fetch_chats()
        assert all_chats["data"] == [chat]


async def test_fetch_chats_counts_as_delivered(server: RunningServer) -> None:
    """What fetch_chats returns is not offered again in the next binding's backlog."""
    async with server.connect("alice") as alice:
        chat = await alice.create_chat("bob")
    async with server.connect("bob") as bob, behind_the_hubs_back(server) as store:
        assert [f["type"] for f in bob.backlog] == ["new_chats"]
        # Items the server never wrote to bob (stored behind the hub's back, as if every write
        # had failed): a new chat and a message in the existing one.
        other, created = await store.create_chat("carol", "bob")
        assert created
        message, _ = await store.add_message(
            await stored_chat(server, chat["chat_id"]), "alice", "unseen", None
        )
        await bob.expect_no_frame(0.1)
        all_chats, pages = await bob.fetch_chats()
        assert {c["chat_id"] for c in all_chats["data"]} == {chat["chat_id"], other.chat_id}
        fetched = [m["message_id"] for p in pages for m in p["data"]]
        assert message.message_id in fetched
    await wait_nothing_pending(server, "bob")
    async with server.connect("bob") as bob:
        assert bob.backlog == []


async def test_unwritten_items_come_back_in_the_next_backlog(server: RunningServer) -> None:
    async with server.connect("alice") as alice:
        chat = await alice.create_chat("bob")
    async with server.connect("bob") as bob, behind_the_hubs_back(server) as store:
        assert [f["type"] for f in bob.backlog] == ["new_chats"]
        await wait_marked(server, "bob", chat_ids=[chat["chat_id"]])
        other, _ = await store.create_chat("carol", "bob")
        message, _ = await store.add_message(
            await stored_chat(server, chat["chat_id"]), "alice", "unseen", None
        )
    async with server.connect("bob") as bob:
        # (carol's new chat, with nothing in it yet: a fresh chat object for bob)
        assert bob.backlog[0] == {"type": "new_chats", "data": [ChatView.fresh(other).to_wire()]}
        assert backlog_messages(bob.backlog) == [message.to_wire()]


# --------------------------------------------------------------------------- fetch_messages


async def test_fetch_messages_pages_backwards(server: RunningServer) -> None:
    async with server.connect("alice") as alice:
        chat = await alice.create_chat("bob")
        ids = [m["message_id"] for m in await send_many(alice, chat, "bob", 25)]
        chat_id = chat["chat_id"]

        page = await alice.request(
            {"type": "fetch_messages", "chat_id": chat_id, "limit": 10, "request_id": "p1"}
        )
        assert page["type"] == "all_messages"
        assert (page["chat_id"], page["request_id"], page["has_more"]) == (chat_id, "p1", True)
        assert [m["message_id"] for m in page["data"]] == ids[15:]

        page = await alice.request(
            {"type": "fetch_messages", "chat_id": chat_id, "limit": 10, "before": ids[15]}
        )
        assert [m["message_id"] for m in page["data"]] == ids[5:15]
        assert page["has_more"] is True

        page = await alice.request(
            {"type": "fetch_messages", "chat_id": chat_id, "limit": 10, "before": ids[5]}
        )
        assert [m["message_id"] for m in page["data"]] == ids[:5]
        assert page["has_more"] is False

        page = await alice.request({"type": "fetch_messages", "chat_id": chat_id, "before": ids[0]})
        assert (page["data"], page["has_more"]) == ([], False)

        page = await alice.request({"type": "fetch_messages", "chat_id": chat_id})
        assert [m["message_id"] for m in page["data"]] == ids  # default limit 100
        assert page["has_more"] is False
        assert "request_id" not in page


async def test_fetch_messages_default_limit_is_100(server: RunningServer) -> None:
    async with server.connect("alice") as alice:
        chat = await alice.create_chat("bob")
        ids = [m["message_id"] for m in await send_many(alice, chat, "bob", 101)]
        page = await alice.request({"type": "fetch_messages", "chat_id": chat["chat_id"]})
        assert [m["message_id"] for m in page["data"]] == ids[1:]
        assert page["has_more"] is True
        page = await alice.request(
            {"type": "fetch_messages", "chat_id": chat["chat_id"], "limit": 1000}
        )
        assert len(page["data"]) == 101
        assert page["has_more"] is False


async def test_fetch_messages_has_more_is_exact(server: RunningServer) -> None:
    async with server.connect("alice") as alice:
        chat = await alice.create_chat("bob")
        await send_many(alice, chat, "bob", 4)
        page = await alice.request(
            {"type": "fetch_messages", "chat_id": chat["chat_id"], "limit": 4}
        )
        assert (len(page["data"]), page["has_more"]) == (4, False)


async def test_fetch_messages_of_an_empty_chat(server: RunningServer) -> None:
    async with server.connect("alice") as alice:
        chat = await alice.create_chat("bob")
        page = await alice.request({"type": "fetch_messages", "chat_id": chat["chat_id"]})
        assert page == {
            "type": "all_messages",
            "chat_id": chat["chat_id"],
            "data": [],
            "has_more": False,
        }


async def test_fetch_messages_bad_before(server: RunningServer) -> None:
    async with server.connect("alice") as alice:
        chat = await alice.create_chat("bob")
        other = await alice.create_chat("carol")
        [in_other] = await send_many(alice, other, "carol", 1)
        await send_many(alice, chat, "bob", 2)
        for before in ("999999", "abc", in_other["message_id"], "", 5, "-1"):
            error = await alice.request(
                {
                    "type": "fetch_messages",
                    "chat_id": chat["chat_id"],
                    "before": before,
                    "request_id": "b",
                }
            )
            assert error["type"] == "error", before
            assert (error["code"], error["field"], error["request_id"]) == (
                "bad_request",
                "before",
                "b",
            )


async def test_fetch_messages_bad_limit(server: RunningServer) -> None:
    async with server.connect("alice") as alice:
        chat = await alice.create_chat("bob")
        for limit in (0, 1001, -3, "5", 2.0, False):
            error = await alice.request(
                {"type": "fetch_messages", "chat_id": chat["chat_id"], "limit": limit}
            )
            assert (error["code"], error["field"]) == ("bad_request", "limit")


async def test_fetch_messages_unknown_chat_and_non_participant(server: RunningServer) -> None:
    async with server.connect("alice") as alice, server.connect("carol") as carol:
        chat = await alice.create_chat("bob")
        for chat_id in ("999999", "not-a-chat", "0"):
            error = await alice.request(
                {"type": "fetch_messages", "chat_id": chat_id, "request_id": "n"}
            )
            assert (error["code"], error["request_id"]) == ("not_found", "n")
        error = await carol.request(
            {"type": "fetch_messages", "chat_id": chat["chat_id"], "request_id": "f"}
        )
        assert (error["code"], error["request_id"]) == ("forbidden", "f")


async def test_fetch_messages_counts_as_delivered(server: RunningServer) -> None:
    async with server.connect("alice") as alice:
        chat = await alice.create_chat("bob")
    async with server.connect("bob") as bob, behind_the_hubs_back(server) as store:
        message, _ = await store.add_message(
            await stored_chat(server, chat["chat_id"]), "alice", "unseen", None
        )
        page = await bob.request({"type": "fetch_messages", "chat_id": chat["chat_id"]})
        assert page["data"] == [message.to_wire()]
    await wait_nothing_pending(server, "bob")
    async with server.connect("bob") as bob:
        assert bob.backlog == []
