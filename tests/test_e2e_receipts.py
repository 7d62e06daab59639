"""Version 2 end to end on a real server: seq, chat objects with server state, receipts,
unread counts, edits and deletes, and the change log of a binding.

PROTOCOL.md, "Version 2": "Sequence numbers and the chat object", "Receipts", "Editing and
deleting". The same tests run on two nodes (PostgreSQL + Redis) from `test_e2e_cluster`,
where a user's second device and the other user land on the other node.
"""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import trio
from support import Client, Frame, RunningServer, wait_nothing_pending, wait_until
from test_e2e_delivery import slow_commits

RECEIPT_KEYS = {"type", "chat_id", "user_id", "kind", "seq", "message_id", "timestamp"}


def see_everything(*clients: Client) -> None:
    """These clients read receipts like any other frame (version 2 clients); presence, which
    comes and goes with the other tests' users, stays aside (its own tests read it)."""
    for client in clients:
        client.set_aside = frozenset({"presence"})


async def receipt(client: Client, kind: str, user_id: str, seq: int, timeout: float = 5.0) -> Frame:
    """The next receipt of `kind` for `user_id` reaching `seq` (earlier ones are skipped:
    deliveries in quick succession may be reported by one receipt)."""

    def matches(frame: Frame) -> bool:
        return (
            frame.get("type") == "receipt"
            and frame["kind"] == kind
            and frame["user_id"] == user_id
            and frame["seq"] >= seq
        )

    return await client.recv_aside(matches, timeout)


async def chat_list(client: Client) -> dict[str, Frame]:
    """`fetch_chats` with `limit: 0`: the chat objects by id (and nothing else is sent)."""
    reply = await client.request({"type": "fetch_chats", "limit": 0, "request_id": "list"})
    assert reply["type"] == "all_chats", reply
    assert reply["request_id"] == "list"
    assert [f for f in await client.sync() if f["type"] != "receipt"] == []
    return {chat["chat_id"]: chat for chat in reply["data"]}


async def change(client: Client, frame_type: str, **fields: Any) -> Frame:
    """An edit or a delete and its answer (`message_updated` with the request id, or error)."""
    reply = await client.request({"type": frame_type, "request_id": frame_type, **fields})
    assert reply.get("request_id") == frame_type, reply
    return reply


async def talking(server: RunningServer) -> tuple[str, list[Frame]]:
    """alice and bob's chat with three messages bob has received; returns (chat id, acks)."""
    async with server.connect("alice") as alice, server.connect("bob") as bob:
        chat_id = (await alice.create_chat("bob"))["chat_id"]
        acks = [await alice.send_message(chat_id, "bob", f"m{i}") for i in range(3)]
        for ack in acks:
            assert (await bob.recv_until("message"))["message_id"] == ack["message_id"]
    await wait_nothing_pending(server, "bob")
    return chat_id, acks


# --------------------------------------------------------------------------- seq and chats


async def test_every_message_frame_carries_its_seq(server: RunningServer) -> None:
    async with server.connect("alice") as alice:
        chat_id = (await alice.create_chat("bob"))["chat_id"]
        acks = [await alice.send_message(chat_id, "bob", f"m{i}") for i in range(3)]
        assert [ack["seq"] for ack in acks] == [1, 2, 3]
        page = await alice.request({"type": "fetch_messages", "chat_id": chat_id})
        assert [m["seq"] for m in page["data"]] == [1, 2, 3]
        assert all("edited_at" not in m and "deleted" not in m for m in page["data"])
    async with server.connect("bob") as bob:
        [new_chats, new_messages] = bob.backlog
        assert new_chats["data"][0]["last_message"]["seq"] == 3
        assert [m["seq"] for m in new_messages["data"]] == [1, 2, 3]


async def test_fetch_chats_with_limit_zero_sends_the_chat_list_with_counts(
    server: RunningServer,
) -> None:
    async with server.connect("alice") as alice:
        with_bob = (await alice.create_chat("bob"))["chat_id"]
        with_carol = (await alice.create_chat("carol"))["chat_id"]
        await alice.send_message(with_bob, "bob", "one")
        await alice.send_message(with_bob, "bob", "two")
    async with server.connect("bob") as bob:
        chats = await chat_list(bob)
        assert list(chats) == [with_bob]
        chat = chats[with_bob]
        assert chat["unread_count"] == 2
        assert chat["last_message"]["content"] == "two"
        assert chat["read_up_to"] == {"alice": 2, "bob": 0}
        assert chat["delivered_up_to"]["alice"] == 2  # sending moved alice's own marks
    async with server.connect("alice") as alice:
        chats = await chat_list(alice)
        assert list(chats) == [with_carol, with_bob] or list(chats) == [with_bob, with_carol]
        assert chats[with_bob]["unread_count"] == 0  # one's own messages are never unread
        assert chats[with_carol]["last_message"] is None


# --------------------------------------------------------------------------- receipts


async def test_ticks_move_sent_delivered_read_on_every_device_of_the_sender(
    server: RunningServer,
) -> None:
    async with (
        server.connect("alice") as phone,
        server.connect("alice") as desktop,
        server.connect("bob") as bob,
    ):
        see_everything(phone, desktop, bob)
        chat_id = (await phone.create_chat("bob"))["chat_id"]
        await desktop.recv_until("new_chats")
        await bob.recv_until("new_chats")
        ack = await phone.send_message(chat_id, "bob", "hello")  # sent: committed
        assert (await desktop.recv_until("message"))["message_id"] == ack["message_id"]
        assert (await bob.recv_until("message"))["message_id"] == ack["message_id"]
        for device in (phone, desktop):  # delivered: bob's device took it
            delivered = await receipt(device, "delivered", "bob", ack["seq"])
            assert set(delivered) == RECEIPT_KEYS
            assert (delivered["chat_id"], delivered["message_id"]) == (chat_id, ack["message_id"])
        await bob.send(
            {"type": "mark_read", "chat_id": chat_id, "message_id": ack["message_id"]}
            | {"request_id": "r1"}
        )
        answer = await receipt(bob, "read", "bob", ack["seq"])
        assert answer["request_id"] == "r1"
        for device in (phone, desktop):  # read
            read = await receipt(device, "read", "bob", ack["seq"])
            assert "request_id" not in read
            assert read["message_id"] == ack["message_id"]
        chat = (await chat_list(phone))[chat_id]
        assert chat["read_up_to"]["bob"] == chat["delivered_up_to"]["bob"] == ack["seq"]


async def test_delivered_receipt_for_a_backlog_and_no_receipts_on_binding(
    server: RunningServer,
) -> None:
    async with server.connect("alice") as alice:
        see_everything(alice)
        chat_id = (await alice.create_chat("bob"))["chat_id"]
        acks = [await alice.send_message(chat_id, "bob", f"m{i}") for i in range(3)]
        async with server.connect("bob") as bob:
            see_everything(bob)
            assert [f["type"] for f in bob.backlog] == ["new_chats", "new_messages"]
            delivered = await receipt(alice, "delivered", "bob", 3)
            assert delivered["message_id"] == acks[-1]["message_id"]
    async with server.connect("alice") as again:
        # Receipts are live notifications: the marks are in the chat objects instead.
        assert again.backlog == []
        assert (await chat_list(again))[chat_id]["delivered_up_to"]["bob"] == 3


async def test_unread_counts_agree_across_devices_and_reconnects(server: RunningServer) -> None:
    async with server.connect("alice") as alice:
        chat_id = (await alice.create_chat("bob"))["chat_id"]
        acks = [await alice.send_message(chat_id, "bob", f"m{i}") for i in range(4)]
    async with server.connect("bob") as phone, server.connect("bob") as laptop:
        see_everything(phone, laptop)
        assert (await chat_list(phone))[chat_id]["unread_count"] == 4
        assert (await chat_list(laptop))[chat_id]["unread_count"] == 4
        read = {"type": "mark_read", "chat_id": chat_id, "message_id": acks[1]["message_id"]}
        await phone.send(read)
        await receipt(phone, "read", "bob", 2)
        cleared = await receipt(laptop, "read", "bob", 2)  # the other device, live
        assert cleared["seq"] == 2
        assert (await chat_list(laptop))[chat_id]["unread_count"] == 2
    async with server.connect("bob") as tablet:
        assert (await chat_list(tablet))[chat_id]["unread_count"] == 2
        see_everything(tablet)
        await tablet.send({**read, "message_id": acks[3]["message_id"]})
        await receipt(tablet, "read", "bob", 4)
        assert (await chat_list(tablet))[chat_id]["unread_count"] == 0
    async with server.connect("bob") as phone:
        assert (await chat_list(phone))[chat_id]["unread_count"] == 0


async def test_mark_read_only_moves_forward_and_checks_the_message(
    server: RunningServer,
) -> None:
    chat_id, acks = await talking(server)
    async with server.connect("bob") as bob, server.connect("alice") as alice:
        see_everything(bob, alice)
        read = {"type": "mark_read", "chat_id": chat_id, "request_id": "r"}
        await bob.send({**read, "message_id": acks[2]["message_id"]})
        assert (await receipt(bob, "read", "bob", 3))["request_id"] == "r"
        await receipt(alice, "read", "bob", 3)
        # An older message changes nothing but is still answered, with the mark as it is.
        await bob.send({**read, "message_id": acks[0]["message_id"]})
        answer = await receipt(bob, "read", "bob", 0)
        assert (answer["seq"], answer["message_id"], answer["request_id"]) == (
            3,
            acks[2]["message_id"],
            "r",
        )
        await alice.expect_no_frame(0.3)  # nothing moved: nobody else is told
        other = (await bob.create_chat("carol"))["chat_id"]
        wrong = await bob.request({**read, "chat_id": other, "message_id": acks[0]["message_id"]})
        assert (wrong["code"], wrong["field"]) == ("bad_request", "message_id")
    async with server.connect("carol") as carol:
        denied = await carol.request({**read, "message_id": acks[0]["message_id"]})
        assert (denied["code"], denied["field"]) == ("forbidden", "chat_id")
        missing = await carol.request({**read, "chat_id": "999999", "message_id": "1"})
        assert missing["code"] == "not_found"


# --------------------------------------------------------------------------- edit and delete


async def test_edit_and_delete_reach_every_device_live(server: RunningServer) -> None:
    chat_id, acks = await talking(server)
    first, second = acks[0]["message_id"], acks[1]["message_id"]
    async with (
        server.connect("alice") as alice,
        server.connect("alice") as alice_desktop,
        server.connect("bob") as bob,
    ):
        edited = await change(
            alice, "edit_message", chat_id=chat_id, message_id=first, content="fixed"
        )
        assert edited["type"] == "message_updated"
        assert (edited["content"], edited["seq"], edited["timestamp"]) == (
            "fixed",
            1,
            acks[0]["timestamp"],
        )
        assert "edited_at" in edited
        assert "deleted" not in edited
        for other in (alice_desktop, bob):
            update = await other.recv_until("message_updated")
            assert "request_id" not in update
            assert {k: v for k, v in update.items()} == {
                k: v for k, v in edited.items() if k != "request_id"
            }
        deleted = await change(alice, "delete_message", chat_id=chat_id, message_id=second)
        assert (deleted["content"], deleted["deleted"], deleted["message_id"]) == (
            "",
            True,
            second,
        )
        for other in (alice_desktop, bob):
            assert (await other.recv_until("message_updated"))["deleted"] is True
        # Deleting again changes nothing and is answered the same; nobody else hears of it.
        again = await change(alice, "delete_message", chat_id=chat_id, message_id=second)
        assert again == deleted
        await bob.expect_no_frame(0.3)
        # Refusals change nothing.
        not_yours = await change(
            bob, "edit_message", chat_id=chat_id, message_id=first, content="mine"
        )
        assert (not_yours["code"], not_yours["field"]) == ("forbidden", "message_id")
        gone = await change(
            alice, "edit_message", chat_id=chat_id, message_id=second, content="back"
        )
        assert (gone["code"], gone["field"]) == ("bad_request", "message_id")
        too_long = await change(
            alice, "edit_message", chat_id=chat_id, message_id=first, content="x" * 4097
        )
        assert too_long["code"] == "too_large"
        page = await bob.request({"type": "fetch_messages", "chat_id": chat_id})
        assert [(m["content"], m.get("deleted", False)) for m in page["data"]] == [
            ("fixed", False),
            ("", True),
            ("m2", False),
        ]
        chat = (await chat_list(bob))[chat_id]
        assert chat["last_message"]["content"] == "m2"


async def test_changes_made_while_away_arrive_once_on_binding(server: RunningServer) -> None:
    chat_id, acks = await talking(server)
    first, second = acks[0]["message_id"], acks[1]["message_id"]
    async with server.connect("alice") as alice:
        for content in ("v1", "v2", "final"):
            await change(alice, "edit_message", chat_id=chat_id, message_id=first, content=content)
        await change(alice, "delete_message", chat_id=chat_id, message_id=second)
        new = await alice.send_message(chat_id, "bob", "while away")
        await change(
            alice, "edit_message", chat_id=chat_id, message_id=new["message_id"], content="new!"
        )
    async with server.connect("bob") as bob:
        types = [frame["type"] for frame in bob.backlog]
        assert types == ["new_messages", "updated_messages"]  # updates after new messages
        [new_messages, updated] = bob.backlog
        # Never received: comes once, in its current state, and not again as an update.
        assert [(m["message_id"], m["content"]) for m in new_messages["data"]] == [
            (new["message_id"], "new!")
        ]
        # Received before: only its final state, once, by seq.
        assert [(m["message_id"], m["content"]) for m in updated["data"]] == [
            (first, "final"),
            (second, ""),
        ]
        assert updated["data"][1]["deleted"] is True
    await wait_nothing_pending(server, "bob")
    async with server.connect("bob") as bob:
        assert bob.backlog == []  # exactly once

    async with server.connect("alice") as alice:
        # The change log is per user: alice's devices had the changes live.
        assert alice.backlog == []


async def test_a_change_the_device_saw_live_is_not_in_its_next_backlog(
    server: RunningServer,
) -> None:
    chat_id, acks = await talking(server)
    async with server.connect("alice") as alice, server.connect("bob") as bob:
        await change(
            alice,
            "edit_message",
            chat_id=chat_id,
            message_id=acks[2]["message_id"],
            content="seen live",
        )
        assert (await bob.recv_until("message_updated"))["content"] == "seen live"

    async def nothing_for_bob() -> bool:
        store = server.app.services.store if server.app.services else None
        assert store is not None
        return not (await store.backlog("bob")).updates

    await wait_until(nothing_for_bob, 5.0)
    async with server.connect("bob") as bob:
        assert bob.backlog == []


async def test_an_edit_racing_the_binding_arrives_exactly_once(server: RunningServer) -> None:
    """bob's device reconnects over and over while alice edits bob's received messages:
    every state of a message reaches bob at most once (live or in a backlog), and the final
    state of every message reaches him."""
    rng = random.Random(10)
    chat_id, acks = await talking(server)
    message_ids = [ack["message_id"] for ack in acks]
    seen: list[tuple[str, str]] = []
    done = trio.Event()

    def record(frames: list[Frame]) -> None:
        for frame in frames:
            if frame["type"] == "updated_messages":
                seen.extend((m["message_id"], m["content"]) for m in frame["data"])
            elif frame["type"] == "message_updated":
                seen.append((frame["message_id"], frame["content"]))

    async def edit_all(alice: Client) -> None:
        for index in range(30):
            target = message_ids[index % len(message_ids)]
            await change(
                alice, "edit_message", chat_id=chat_id, message_id=target, content=f"e{index}"
            )
            await trio.sleep(rng.uniform(0, 0.01))
        done.set()

    async def reconnect(bindings: list[int]) -> None:
        while not done.is_set():
            async with server.open_raw(token=server.token("bob")) as raw:
                frames = [await raw.recv()]
                with trio.move_on_after(rng.choice([0, 0.002, 0.01, 0.03])):
                    while True:
                        frames.append(await raw.recv())
                frames += await raw.sync()
                frames += await raw.close_and_drain()
            record(frames)
            bindings.append(len(frames))
            await wait_nothing_pending(server, "bob")

    bindings: list[int] = []
    with slow_commits(server, lambda: rng.uniform(0, 0.003)):
        async with server.connect("alice") as alice, trio.open_nursery() as nursery:
            nursery.start_soon(edit_all, alice)
            nursery.start_soon(reconnect, bindings)
    async with server.connect("bob") as bob:
        record(bob.backlog)
    assert len(bindings) >= 5, "the race needs several bindings during the edits"
    twice = {state: n for state, n in Counter(seen).items() if n > 1}
    assert not twice, f"a state reached bob more than once: {twice}"
    final = {message_ids[i % 3]: f"e{i}" for i in range(30)}
    missing = set(final.items()) - set(seen)
    assert not missing, f"final states never delivered: {missing}"


# --------------------------------------------------------------------------- sending marks


async def test_sending_moves_the_senders_own_marks(server: RunningServer) -> None:
    async with server.connect("alice") as alice:
        chat_id = (await alice.create_chat("bob"))["chat_id"]
        await alice.send_message(chat_id, "bob", "from alice")
    async with server.connect("bob") as bob:
        before = (await chat_list(bob))[chat_id]
        assert before["unread_count"] == 1
        await bob.send_message(chat_id, "alice", "reply")  # replying reads what came before
        after = (await chat_list(bob))[chat_id]
        assert after["unread_count"] == 0
        assert after["read_up_to"]["bob"] == 2
        # The delivered mark follows once the backlog's delivery is recorded (batched).

        async def delivered_to_bob() -> bool:
            return (await chat_list(bob))[chat_id]["delivered_up_to"]["bob"] == 2

        await wait_until(delivered_to_bob, 5.0)
