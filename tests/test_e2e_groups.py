"""Group chats end to end on a real server: create, add, leave, and every delivery guarantee
for every member's every device.

PROTOCOL.md, "Version 2", "Group chats". The same tests run on two nodes (PostgreSQL + Redis)
from `test_e2e_cluster`, where users' connections are spread over both nodes.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import trio
from support import Client, Frame, RunningServer, wait_nothing_pending
from test_e2e_receipts import chat_list, receipt, see_everything


async def create_group(client: Client, title: str, members: Sequence[str], **extra: Any) -> Frame:
    """`create_group` and its `new_chats` reply; returns the chat object."""
    reply = await client.request(
        {
            "type": "create_group",
            "title": title,
            "member_ids": list(members),
            "request_id": "group",
            **extra,
        }
    )
    assert reply["type"] == "new_chats", reply
    assert reply["request_id"] == "group"
    [chat] = reply["data"]
    return dict(chat)


async def say(client: Client, chat_id: str, content: str, **extra: Any) -> Frame:
    """A group message and its acknowledgement (the next frame: the caller makes sure no
    other frame is on its way)."""
    reply = await client.request(
        {"type": "send_message", "chat_id": chat_id, "content": content, **extra}
    )
    assert reply["type"] == "message", reply
    return reply


async def post(client: Client, chat_id: str, content: str) -> None:
    """A group message, without waiting for its acknowledgement."""
    await client.send({"type": "send_message", "chat_id": chat_id, "content": content})


async def error_of(client: Client, frame: dict[str, Any]) -> tuple[str, str | None]:
    reply = await client.request({**frame, "request_id": "bad"})
    assert reply["type"] == "error", reply
    assert reply["request_id"] == "bad"
    return reply["code"], reply.get("field")


async def messages_of(client: Client, chat_id: str, count: int) -> list[Frame]:
    """The next `count` live messages of the chat (other frames are skipped)."""
    received = []
    while len(received) < count:
        frame = await client.recv()
        if frame["type"] == "message" and frame["chat_id"] == chat_id:
            received.append(frame)
    return received


def backlog_of(client: Client, chat_id: str) -> list[Frame]:
    return [
        message
        for frame in client.backlog
        if frame["type"] == "new_messages" and frame["chat_id"] == chat_id
        for message in frame["data"]
    ]


# --------------------------------------------------------------------------- creating


async def test_a_group_reaches_every_member_live_or_in_their_backlog(
    server: RunningServer,
) -> None:
    async with (
        server.connect("alice") as phone,
        server.connect("alice") as desktop,
        server.connect("bob") as bob,
    ):
        chat = await create_group(phone, "Trip", ["carol", "bob"])
        assert chat["kind"] == "group"
        assert chat["title"] == "Trip"
        assert chat["participants"] == ["alice", "bob", "carol"]
        assert chat["created_by"] == "alice"
        assert chat["read_up_to"] == {"alice": 0, "bob": 0, "carol": 0}
        assert chat["delivered_up_to"] == {"alice": 0, "bob": 0, "carol": 0}
        assert (chat["last_message"], chat["unread_count"]) == (None, 0)
        for device in (desktop, bob):
            pushed = await device.recv_until("new_chats")
            assert pushed["data"] == [chat]
            assert "request_id" not in pushed
        again = await create_group(phone, "Trip", ["carol", "bob"])
        assert again["chat_id"] != chat["chat_id"]  # every call creates a group
    async with server.connect("carol") as carol:
        [new_chats] = carol.backlog
        assert [c["chat_id"] for c in new_chats["data"]] == [chat["chat_id"], again["chat_id"]]
        assert new_chats["data"][0]["participants"] == ["alice", "bob", "carol"]
    async with server.connect("carol") as carol:
        assert carol.backlog == []  # delivered once


async def test_group_frames_are_refused_with_the_field_at_fault(
    start_server: Any,
) -> None:
    server = await start_server(limits={"max_group_members": 3})
    async with server.connect("alice") as alice, server.connect("bob") as bob:
        direct = (await alice.create_chat("bob"))["chat_id"]
        await bob.recv_until("new_chats")
        create = {"type": "create_group", "title": "T"}
        assert await error_of(alice, {**create, "member_ids": ["alice", "bob"]}) == (
            "bad_request",
            "member_ids",
        )
        assert await error_of(alice, {**create, "member_ids": ["b", "c", "d"]}) == (
            "bad_request",
            "member_ids",
        )
        assert await error_of(alice, {**create, "member_ids": ["bob", "bob"]}) == (
            "bad_request",
            "member_ids",
        )
        assert await error_of(alice, {**create, "title": "", "member_ids": ["bob"]}) == (
            "bad_request",
            "title",
        )
        group = (await create_group(alice, "T", ["bob"]))["chat_id"]
        await bob.recv_until("new_chats")
        assert await error_of(
            alice, {"type": "add_members", "chat_id": direct, "member_ids": ["carol"]}
        ) == ("bad_request", "chat_id")
        assert await error_of(
            alice, {"type": "remove_member", "chat_id": direct, "user_id": "bob"}
        ) == ("bad_request", "chat_id")
        assert await error_of(
            alice, {"type": "add_members", "chat_id": group, "member_ids": ["carol", "dave"]}
        ) == ("bad_request", "member_ids")  # 4 > 3
        assert await error_of(
            alice,
            {"type": "send_message", "chat_id": group, "recipient_id": "bob"} | {"content": "x"},
        ) == ("bad_request", "recipient_id")
        assert await error_of(
            alice, {"type": "send_message", "chat_id": direct, "content": "x"}
        ) == ("bad_request", "recipient_id")
        assert await error_of(
            bob, {"type": "remove_member", "chat_id": group, "user_id": "alice"}
        ) == ("forbidden", "user_id")  # only the creator removes others
        assert await error_of(
            alice, {"type": "remove_member", "chat_id": group, "user_id": "carol"}
        ) == ("bad_request", "user_id")  # not a member
    async with server.connect("mallory") as mallory:
        assert await error_of(
            mallory, {"type": "send_message", "chat_id": group, "content": "hi"}
        ) == ("forbidden", "chat_id")
        assert await error_of(
            mallory, {"type": "add_members", "chat_id": group, "member_ids": ["mallory"]}
        ) == ("forbidden", "chat_id")
        assert await error_of(mallory, {"type": "fetch_messages", "chat_id": group}) == (
            "forbidden",
            "chat_id",
        )
    async with server.connect("alice") as alice:
        page = await alice.request({"type": "fetch_messages", "chat_id": group})
        assert page["data"] == []  # nothing refused was stored
        chats = await chat_list(alice)
        assert chats[group]["participants"] == ["alice", "bob"]


# --------------------------------------------------------------------------- messages


async def test_every_member_device_gets_every_group_message_once_in_one_order(
    server: RunningServer,
) -> None:
    async with (
        server.connect("alice") as alice,
        server.connect("bob") as bob_phone,
        server.connect("bob") as bob_desktop,
    ):
        chat_id = (await create_group(alice, "Team", ["bob", "carol"]))["chat_id"]
        for device in (bob_phone, bob_desktop):
            await device.recv_until("new_chats")
        acks = []
        for index in range(4):
            author, reader = (alice, bob_phone) if index % 2 == 0 else (bob_phone, alice)
            ack = await say(author, chat_id, f"m{index}", client_message_id=f"c{index}")
            assert "recipient_id" not in ack
            acks.append(ack)
            [live] = await messages_of(reader, chat_id, 1)
            assert live["message_id"] == ack["message_id"]
            assert "recipient_id" not in live
        assert [ack["seq"] for ack in acks] == [1, 2, 3, 4]
        ids = [ack["message_id"] for ack in acks]
        assert [m["message_id"] for m in await messages_of(bob_desktop, chat_id, 4)] == ids
        again = await say(alice, chat_id, "m0 again", client_message_id="c0")
        assert again["message_id"] == ids[0]  # a resend stores nothing new
        await expect_nothing(bob_phone, bob_desktop)
    async with server.connect("carol") as carol:
        backlog = backlog_of(carol, chat_id)
        assert [m["message_id"] for m in backlog] == ids
        assert all("recipient_id" not in m for m in backlog)
        assert [m["sender_id"] for m in backlog] == ["alice", "bob", "alice", "bob"]
    async with server.connect("carol") as carol:
        assert backlog_of(carol, chat_id) == []


async def expect_nothing(*clients: Client) -> None:
    for client in clients:
        frames = [f for f in await client.sync() if f["type"] in ("message", "new_messages")]
        assert frames == []


async def test_a_fifty_member_group_over_online_and_offline_members(
    server: RunningServer,
) -> None:
    members = [f"member{index:02d}" for index in range(49)]
    online, offline = members[:39], members[39:]
    async with server.connect("owner") as owner:
        chat_id = (await create_group(owner, "Fifty", members))["chat_id"]
    clients: dict[str, Client] = {}
    async with trio.open_nursery() as nursery:
        done = trio.Event()

        async def stay(user: str, ready: trio.Event) -> None:
            async with server.connect(user) as client:
                clients[user] = client
                ready.set()
                await done.wait()

        for user in online:
            ready = trio.Event()
            nursery.start_soon(stay, user, ready)
            await ready.wait()
        senders = online[:3]
        per_sender = 10
        total = len(senders) * per_sender

        async def burst(user: str) -> None:
            for index in range(per_sender):
                await post(clients[user], chat_id, f"{user}:{index}")

        async with trio.open_nursery() as bursts:
            for user in senders:
                bursts.start_soon(burst, user)
        streams: dict[str, list[Frame]] = {}

        async def read_all(user: str) -> None:
            # Every device gets every message once, its own as the acknowledgement.
            streams[user] = await messages_of(clients[user], chat_id, total)

        async with trio.open_nursery() as readers:
            for user in online:
                readers.start_soon(read_all, user)
        order = [m["message_id"] for m in streams[senders[0]]]
        assert [m["seq"] for m in streams[senders[0]]] == list(range(1, total + 1))
        assert Counter(m["sender_id"] for m in streams[senders[0]]) == dict.fromkeys(
            senders, per_sender
        )
        for user in online:
            assert [m["message_id"] for m in streams[user]] == order, user
        for user in online:
            frames = await clients[user].sync()
            assert [f for f in frames if f["type"] == "message"] == [], user
        done.set()
    for user in offline:
        async with server.connect(user) as client:
            assert [m["message_id"] for m in backlog_of(client, chat_id)] == order, user
            [new_chats] = [f for f in client.backlog if f["type"] == "new_chats"]
            assert new_chats["data"][0]["unread_count"] == total


# --------------------------------------------------------------------------- members


async def test_a_joiner_sees_only_what_comes_after_the_join(server: RunningServer) -> None:
    async with server.connect("alice") as alice, server.connect("bob") as bob:
        see_everything(alice, bob)
        chat_id = (await create_group(alice, "Club", ["bob"]))["chat_id"]
        await bob.recv_until("new_chats")
        before = [await say(alice, chat_id, f"before {index}") for index in range(2)]
        await messages_of(bob, chat_id, 2)
        async with server.connect("dave") as dave:
            see_everything(dave)
            reply = await alice.request(
                {"type": "add_members", "chat_id": chat_id, "member_ids": ["dave", "bob"]}
                | {"request_id": "add"}
            )
            assert (reply["type"], reply["request_id"]) == ("chat_updated", "add")
            assert reply["data"]["participants"] == ["alice", "bob", "dave"]
            assert reply["data"]["last_message"]["message_id"] == before[1]["message_id"]
            updated = await bob.recv_until("chat_updated")
            assert updated["data"]["participants"] == ["alice", "bob", "dave"]
            assert updated["data"]["unread_count"] == 2  # bob's own count
            joined = await dave.recv_until("new_chats")
            [view] = joined["data"]
            assert view["participants"] == ["alice", "bob", "dave"]
            assert (view["last_message"], view["unread_count"]) == (None, 0)
            assert view["read_up_to"]["dave"] == 2  # marks start at the join
            page = await dave.request({"type": "fetch_messages", "chat_id": chat_id})
            assert (page["data"], page["has_more"]) == ([], False)
            await alice.request(
                {"type": "edit_message", "chat_id": chat_id, "message_id": before[0]["message_id"]}
                | {"content": "edited before"}
            )
            assert (await bob.recv_until("message_updated"))["content"] == "edited before"
            after = await say(bob, chat_id, "after")
            got = await dave.recv_until("message")
            assert got["message_id"] == after["message_id"]  # no earlier edit came first
            await messages_of(alice, chat_id, 1)  # bob's "after"
            again = await alice.request(
                {"type": "add_members", "chat_id": chat_id, "member_ids": ["dave"]}
                | {"request_id": "again"}
            )
            assert (again["type"], again["request_id"]) == ("chat_updated", "again")
            assert [f for f in await bob.sync() if f["type"] == "chat_updated"] == []
    async with server.connect("dave") as dave:
        assert dave.backlog == []
        _, pages = await dave.fetch_chats()
        [page] = [p for p in pages if p["chat_id"] == chat_id]
        assert [m["message_id"] for m in page["data"]] == [after["message_id"]]
        chats = await chat_list(dave)
        assert chats[chat_id]["last_message"]["message_id"] == after["message_id"]


async def test_a_removed_member_loses_the_chat_and_a_member_can_leave(
    server: RunningServer,
) -> None:
    async with (
        server.connect("alice") as alice,
        server.connect("bob") as bob,
        server.connect("carol") as carol,
    ):
        chat_id = (await create_group(alice, "Club", ["bob", "carol"]))["chat_id"]
        for client in (bob, carol):
            await client.recv_until("new_chats")
        await say(alice, chat_id, "hello")
        await messages_of(carol, chat_id, 1)
        reply = await alice.request(
            {"type": "remove_member", "chat_id": chat_id, "user_id": "carol", "request_id": "rm"}
        )
        assert (reply["type"], reply["request_id"]) == ("chat_updated", "rm")
        assert reply["data"]["participants"] == ["alice", "bob"]
        for client in (bob, carol):
            updated = await client.recv_until("chat_updated")
            assert updated["data"]["participants"] == ["alice", "bob"]
        await say(alice, chat_id, "without carol")
        await messages_of(bob, chat_id, 1)
        frames = await carol.sync()
        assert [f for f in frames if f["type"] == "message"] == []
        assert await error_of(
            carol, {"type": "send_message", "chat_id": chat_id} | {"content": "still here?"}
        ) == ("forbidden", "chat_id")
        left = await bob.request(
            {"type": "remove_member", "chat_id": chat_id, "user_id": "bob", "request_id": "bye"}
        )
        assert (left["type"], left["request_id"]) == ("chat_updated", "bye")
        assert left["data"]["participants"] == ["alice"]
        assert (await alice.recv_until("chat_updated"))["data"]["participants"] == ["alice"]
    async with server.connect("carol") as carol:
        assert carol.backlog == []
        assert chat_id not in await chat_list(carol)
    async with server.connect("bob") as bob:
        assert chat_id not in await chat_list(bob)


async def test_join_and_leave_during_a_burst(server: RunningServer) -> None:
    total = 30
    async with (
        server.connect("alice") as alice,
        server.connect("gone") as gone,
        server.connect("late") as late,
    ):
        chat_id = (await create_group(alice, "Burst", ["gone", "bob"]))["chat_id"]
        await gone.recv_until("new_chats")
        async with server.connect("bob") as bob:
            for index in range(total):
                await post(bob, chat_id, f"b{index}")
                if index == 10:  # the membership changes land among the messages
                    await alice.send(
                        {"type": "add_members", "chat_id": chat_id, "member_ids": ["late"]}
                    )
                    await alice.send(
                        {"type": "remove_member", "chat_id": chat_id, "user_id": "gone"}
                    )
            acks = await messages_of(bob, chat_id, total)
            assert [ack["seq"] for ack in acks] == list(range(1, total + 1))
        # alice: every message once, and her two chat_updated answers.
        frames = [await alice.recv() for _ in range(total + 2)]
        assert Counter(f["type"] for f in frames) == {"message": total, "chat_updated": 2}
        [added, removed] = [f["data"] for f in frames if f["type"] == "chat_updated"]
        removed_at = removed["last_message"]["seq"]
        # late: nothing before its join, everything after, once.
        joined = await late.recv_until("new_chats")
        joined_at = joined["data"][0]["read_up_to"]["late"]
        late_frames = await messages_of(late, chat_id, total - joined_at)
        assert [f["seq"] for f in late_frames] == list(range(joined_at + 1, total + 1))
        # gone: everything up to its removal, nothing after, once.
        gone_frames: list[Frame] = []
        while True:
            frame = await gone.recv()
            if frame["type"] == "chat_updated":
                if "gone" not in frame["data"]["participants"]:
                    break
                continue  # late's join, which gone saw as a member
            gone_frames.append(frame)
        assert [f["seq"] for f in gone_frames] == list(range(1, removed_at + 1))
        assert "gone" not in frame["data"]["participants"]
        assert [f for f in await gone.sync() if f["type"] == "message"] == []
        assert [f for f in await late.sync() if f["type"] == "message"] == []
        assert added["participants"] == ["alice", "bob", "gone", "late"]


# --------------------------------------------------------------------------- receipts


async def test_receipts_per_member_reach_the_members_they_concern(
    server: RunningServer,
) -> None:
    async with (
        server.connect("alice") as alice,
        server.connect("bob") as bob,
        server.connect("carol") as carol,
    ):
        see_everything(alice, bob, carol)
        chat_id = (await create_group(alice, "Read", ["bob", "carol"]))["chat_id"]
        for client in (bob, carol):
            await client.recv_until("new_chats")
        ack = await say(alice, chat_id, "did you read it?")
        for client in (bob, carol):
            await client.recv_until("message")
        delivered_to: set[str] = set()  # alice learns of each member's delivery
        while delivered_to != {"bob", "carol"}:
            frame = await alice.recv()
            if frame["type"] == "receipt" and frame["kind"] == "delivered":
                assert frame["message_id"] == ack["message_id"]
                delivered_to.add(frame["user_id"])
        await bob.send(
            {"type": "mark_read", "chat_id": chat_id, "message_id": ack["message_id"]}
            | {"request_id": "read"}
        )
        answer = await receipt(bob, "read", "bob", ack["seq"])
        assert answer["request_id"] == "read"
        read = await receipt(alice, "read", "bob", ack["seq"])
        assert read["message_id"] == ack["message_id"]
        await wait_nothing_pending(server, "carol")
        # carol wrote nothing read or delivered here: no receipt concerns her.
        others = [f for f in await carol.sync() if f.get("type") == "receipt"]
        others += [f for f in carol.aside if f.get("type") == "receipt"]
        assert [f for f in others if f["user_id"] != "carol"] == []
        chats = await chat_list(alice)
        assert chats[chat_id]["read_up_to"] == {"alice": 1, "bob": 1, "carol": 0}
        assert chats[chat_id]["delivered_up_to"] == {"alice": 1, "bob": 1, "carol": 1}
