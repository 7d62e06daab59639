"""End to end: send_message, content rules, request_id echo, ordering, idempotent resends."""

from __future__ import annotations

import json
import logging
import re
import time
from typing import Any

import pytest
import trio
from support import Client, Frame, RunningServer, expect_silence, wait_nothing_pending

from handler.store import sqlite as sqlite_store

TIMESTAMP = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")
EMOJI = "\U0001f600"
MESSAGE_KEYS = {
    "message_id",
    "chat_id",
    "sender_id",
    "recipient_id",
    "content",
    "timestamp",
    "seq",
}


def without(frame: Frame, *keys: str) -> Frame:
    return {k: v for k, v in frame.items() if k not in keys}


def id_key(message_id: str) -> tuple[int, str]:
    """Ids are opaque strings; "never backwards" is checked as (length, text) order, which is
    numeric order for decimal ids and plain order for fixed-width ids."""
    return len(message_id), message_id


async def chat_between(alice: Client, bob: Client) -> Frame:
    chat = await alice.create_chat("bob")
    assert (await bob.recv())["type"] == "new_chats"
    return chat


async def test_ack_push_and_copies(server: RunningServer) -> None:
    async with (
        server.connect("alice") as alice,
        server.connect("alice") as alice_phone,
        server.connect("bob") as bob,
        server.connect("bob") as bob_phone,
        server.connect("carol") as carol,
    ):
        chat = await alice.create_chat("bob")
        for other in (alice_phone, bob, bob_phone):
            assert (await other.recv())["type"] == "new_chats"

        ack = await alice.send_message(chat["chat_id"], "bob", "hello", request_id="s1")
        assert set(ack) == {"type", "request_id", *MESSAGE_KEYS}
        assert ack["request_id"] == "s1"
        assert (ack["chat_id"], ack["sender_id"], ack["recipient_id"], ack["content"]) == (
            chat["chat_id"],
            "alice",
            "bob",
            "hello",
        )
        assert TIMESTAMP.match(ack["timestamp"])
        copy = without(ack, "request_id")
        # The recipient's connections and the sender's other connections get the same frame,
        # without the request_id.
        for other in (bob, bob_phone, alice_phone):
            assert await other.recv() == copy
        await expect_silence(alice, alice_phone, bob, bob_phone, carol)


async def test_reply_in_the_other_direction(server: RunningServer) -> None:
    async with server.connect("alice") as alice, server.connect("bob") as bob:
        chat = await chat_between(alice, bob)
        ack = await bob.send_message(chat["chat_id"], "alice", "hi back")
        assert (ack["sender_id"], ack["recipient_id"]) == ("bob", "alice")
        assert await alice.recv() == without(ack, "request_id")


async def test_message_for_an_offline_recipient_waits(server: RunningServer) -> None:
    async with server.connect("alice") as alice:
        chat = await alice.create_chat("bob")
        ack = await alice.send_message(chat["chat_id"], "bob", "later")
    async with server.connect("bob") as bob:
        assert bob.backlog[1] == {
            "type": "new_messages",
            "chat_id": chat["chat_id"],
            "data": [without(ack, "type", "request_id")],
        }


async def test_client_message_id_is_echoed(server: RunningServer) -> None:
    async with server.connect("alice") as alice, server.connect("bob") as bob:
        chat = await chat_between(alice, bob)
        ack = await alice.send_message(chat["chat_id"], "bob", "x", client_message_id="c-1")
        assert ack["client_message_id"] == "c-1"
        assert (await bob.recv())["client_message_id"] == "c-1"
        page = await alice.request({"type": "fetch_messages", "chat_id": chat["chat_id"]})
        assert page["data"][0]["client_message_id"] == "c-1"
        plain = await alice.send_message(chat["chat_id"], "bob", "y")
        assert "client_message_id" not in plain


async def test_recipient_must_be_the_other_participant(server: RunningServer) -> None:
    async with server.connect("alice") as alice, server.connect("bob") as bob:
        chat = await chat_between(alice, bob)
        for recipient in ("carol", "alice", "Bob"):
            error = await alice.request(
                {
                    "type": "send_message",
                    "chat_id": chat["chat_id"],
                    "recipient_id": recipient,
                    "content": "no",
                    "request_id": "r",
                }
            )
            assert (error["code"], error["field"], error["request_id"]) == (
                "bad_request",
                "recipient_id",
                "r",
            )
        await expect_silence(bob)
        page = await alice.request({"type": "fetch_messages", "chat_id": chat["chat_id"]})
        assert page["data"] == []


async def test_non_participant_is_forbidden(server: RunningServer) -> None:
    async with (
        server.connect("alice") as alice,
        server.connect("bob") as bob,
        server.connect("carol") as carol,
    ):
        chat = await chat_between(alice, bob)
        for recipient in ("bob", "alice"):
            error = await carol.request(
                {
                    "type": "send_message",
                    "chat_id": chat["chat_id"],
                    "recipient_id": recipient,
                    "content": "intrusion",
                    "request_id": 4,
                }
            )
            assert (error["code"], error["request_id"]) == ("forbidden", 4)
        await expect_silence(alice, bob)


async def test_unknown_chat_is_not_found(server: RunningServer) -> None:
    async with server.connect("alice") as alice:
        for chat_id in ("999999", "nope", "-1", "1.0", EMOJI):
            error = await alice.request(
                {
                    "type": "send_message",
                    "chat_id": chat_id,
                    "recipient_id": "bob",
                    "content": "x",
                    "request_id": "nf",
                }
            )
            assert (error["code"], error["request_id"]) == ("not_found", "nf")


async def test_content_rules(server: RunningServer) -> None:
    async with server.connect("alice") as alice, server.connect("bob") as bob:
        chat = await chat_between(alice, bob)
        base = {"type": "send_message", "chat_id": chat["chat_id"], "recipient_id": "bob"}
        cases: list[tuple[Any, str]] = [
            ("", "bad_request"),
            (None, "bad_request"),
            (5, "bad_request"),
            (["a"], "bad_request"),
            ("x" * 4097, "too_large"),
            (EMOJI * 4097, "too_large"),
        ]
        for content, code in cases:
            error = await alice.request({**base, "content": content, "request_id": "c"})
            assert (error["code"], error["field"], error["request_id"]) == (code, "content", "c")
        # A lone surrogate cannot be encoded as UTF-8: only reachable through a JSON escape.
        await alice.send_raw(json.dumps({**base, "content": "a\ud800b", "request_id": "s"}))
        error = await alice.recv()
        assert (error["code"], error["field"], error["request_id"]) == (
            "bad_request",
            "content",
            "s",
        )
        await expect_silence(bob)


async def test_content_boundaries_are_code_points(server: RunningServer) -> None:
    async with server.connect("alice") as alice, server.connect("bob") as bob:
        chat = await chat_between(alice, bob)
        for content in ("x" * 4096, EMOJI * 4096, "\u00e9" * 4096, "\u0000" * 4096):
            ack = await alice.send_message(chat["chat_id"], "bob", content)
            assert ack["content"] == content
            assert (await bob.recv())["content"] == content


async def test_content_round_trips_exactly(server: RunningServer) -> None:
    contents = [
        "\u0000",
        "nul \u0000 inside",
        EMOJI,
        "\U0001f468\u200d\U0001f469\u200d\U0001f467 family",
        "e\u0301 combining",
        "\u2028\u2029 separators",
        '"quotes" \\ backslash / slash',
        "  leading and trailing spaces  ",
        "\r\n\t control",
        "\ufeff bom",
        "\U0010ffff last code point",
        "\u202e right-to-left override",
    ]
    async with server.connect("alice") as alice, server.connect("bob") as bob:
        chat = await chat_between(alice, bob)
        for content in contents:
            for ascii_only in (True, False):
                frame = {
                    "type": "send_message",
                    "chat_id": chat["chat_id"],
                    "recipient_id": "bob",
                    "content": content,
                }
                await alice.send_raw(json.dumps(frame, ensure_ascii=ascii_only))
                assert (await alice.recv())["content"] == content
                assert (await bob.recv())["content"] == content
        page = await alice.request(
            {"type": "fetch_messages", "chat_id": chat["chat_id"], "limit": 1000}
        )
        assert [m["content"] for m in page["data"]] == [c for c in contents for _ in range(2)]
    async with server.connect("carol") as carol:
        offline = await carol.create_chat("dave")
        for content in contents:
            await carol.send_message(offline["chat_id"], "dave", content)
    async with server.connect("dave") as dave:
        [batch] = [f for f in dave.backlog if f["type"] == "new_messages"]
        assert [m["content"] for m in batch["data"]] == contents


async def test_request_id_is_echoed_on_replies_and_errors(server: RunningServer) -> None:
    async with server.connect("alice") as alice, server.connect("bob") as bob:
        for request_id in ("r-1", 17, 0, -5, "x" * 64, EMOJI * 64):
            reply = await alice.request({"type": "ping", "request_id": request_id})
            assert reply == {"type": "pong", "request_id": request_id}
        reply = await alice.request({"type": "create_chat", "recipient_id": "bob", "request_id": 1})
        assert (reply["type"], reply["request_id"]) == ("new_chats", 1)
        chat_id = reply["data"][0]["chat_id"]
        assert "request_id" not in await bob.recv()
        reply = await alice.request(
            {
                "type": "send_message",
                "chat_id": chat_id,
                "recipient_id": "bob",
                "content": "x",
                "request_id": 2,
            }
        )
        assert (reply["type"], reply["request_id"]) == ("message", 2)
        assert "request_id" not in await bob.recv()
        all_chats, pages = await alice.fetch_chats(request_id=3)
        assert all_chats["request_id"] == 3
        assert [p["request_id"] for p in pages] == [3]
        reply = await alice.request({"type": "fetch_messages", "chat_id": chat_id, "request_id": 4})
        assert (reply["type"], reply["request_id"]) == ("all_messages", 4)
        errors: list[tuple[dict[str, Any], str]] = [
            ({"type": "nope", "request_id": 5}, "unknown_type"),
            ({"request_id": 6}, "unknown_type"),
            ({"type": "create_chat", "request_id": 7}, "bad_request"),
            ({"type": "fetch_messages", "chat_id": "404", "request_id": 8}, "not_found"),
            ({"type": "ping", "token": "bad", "request_id": 9}, "unauthorized"),
            ({"type": "ping", "token": server.token("zed"), "request_id": 10}, "forbidden"),
        ]
        for frame, code in errors:
            error = await alice.request(frame)
            assert (error["type"], error["code"], error["request_id"]) == (
                "error",
                code,
                frame["request_id"],
            )


async def test_invalid_request_id_is_bad_request_without_echo(server: RunningServer) -> None:
    async with server.connect("alice") as alice:
        for request_id in ("", "x" * 65, 1.5, True, [1], {"a": 1}):
            error = await alice.request({"type": "ping", "request_id": request_id})
            assert (error["type"], error["code"], error["field"]) == (
                "error",
                "bad_request",
                "request_id",
            )
            assert "request_id" not in error


async def test_errors_have_a_readable_message(server: RunningServer) -> None:
    async with server.connect("alice") as alice:
        for text in ("{", "[]", '{"type": "nope"}', '{"type": "create_chat"}'):
            await alice.send_raw(text)
            error = await alice.recv()
            assert error["type"] == "error"
            assert isinstance(error["message"], str)
            assert error["message"]
            assert "Traceback" not in error["message"]


async def test_bad_json_keeps_the_connection_open(server: RunningServer) -> None:
    async with server.connect("alice") as alice:
        for text in ("not json", "[1, 2]", '"ping"', "null", '{"type": "ping"', "{'a': 1}"):
            await alice.send_raw(text)
            error = await alice.recv()
            assert (error["type"], error["code"]) == ("error", "bad_json")
        await alice.send_raw(b'{"type": "ping"}')  # binary frame, even of valid JSON
        assert (await alice.recv())["code"] == "bad_json"
        assert await alice.request({"type": "ping"}) == {"type": "pong"}


async def test_unknown_type_keeps_the_connection_open(server: RunningServer) -> None:
    async with server.connect("alice") as alice:
        for frame in ({"type": "delete_chat"}, {"type": 5}, {}, {"type": "pong"}):
            assert (await alice.request(frame))["code"] == "unknown_type"
        assert await alice.request({"type": "ping", "extra": [1, {"x": None}]}) == {"type": "pong"}


# --------------------------------------------------------------------------- ordering


async def test_ids_and_timestamps_never_go_backwards(server: RunningServer) -> None:
    count = 60
    async with (
        server.connect("alice") as alice,
        server.connect("bob") as bob,
        server.connect("bob") as observer,
    ):
        chat = await chat_between(alice, bob)
        assert (await observer.recv())["type"] == "new_chats"
        chat_id = chat["chat_id"]

        async def stream(client: Client, sender: str, recipient: str) -> None:
            for i in range(count):
                frame = {
                    "type": "send_message",
                    "chat_id": chat_id,
                    "recipient_id": recipient,
                    "content": f"{sender}-{i}",
                }
                await client.send(frame)

        async def collect(client: Client, into: list[Frame]) -> None:
            while len(into) < 2 * count:
                frame = await client.recv()
                assert frame["type"] == "message", frame
                into.append(frame)

        seen: dict[str, list[Frame]] = {"alice": [], "bob": [], "observer": []}
        async with trio.open_nursery() as nursery:
            nursery.start_soon(collect, alice, seen["alice"])
            nursery.start_soon(collect, bob, seen["bob"])
            nursery.start_soon(collect, observer, seen["observer"])
            nursery.start_soon(stream, alice, "alice", "bob")
            nursery.start_soon(stream, bob, "bob", "alice")

        page = await alice.request({"type": "fetch_messages", "chat_id": chat_id, "limit": 1000})
        canonical = [m["message_id"] for m in page["data"]]
        assert len(canonical) == 2 * count
        assert len(set(canonical)) == 2 * count
        assert canonical == sorted(canonical, key=id_key)
        stamps = [m["timestamp"] for m in page["data"]]
        assert stamps == sorted(stamps)
        assert all(TIMESTAMP.match(stamp) for stamp in stamps)
        for name, frames in seen.items():  # every client sees the same order
            assert [m["message_id"] for m in frames] == canonical, name
        # Each sender's own messages are in the order sent.
        for sender in ("alice", "bob"):
            mine = [m["content"] for m in page["data"] if m["sender_id"] == sender]
            assert mine == [f"{sender}-{i}" for i in range(count)]


# --------------------------------------------------------------------------- idempotency


async def test_resend_with_client_message_id_stores_nothing_new(server: RunningServer) -> None:
    async with server.connect("alice") as alice, server.connect("bob") as bob:
        chat = await chat_between(alice, bob)
        first = await alice.send_message(
            chat["chat_id"], "bob", "once", client_message_id="k1", request_id="a"
        )
        assert await bob.recv() == without(first, "request_id")
        again = await alice.send_message(
            chat["chat_id"], "bob", "once, edited", client_message_id="k1", request_id="b"
        )
        assert again == {**first, "request_id": "b"}  # the stored message, same id and content
        await expect_silence(bob)
        page = await alice.request({"type": "fetch_messages", "chat_id": chat["chat_id"]})
        assert [m["message_id"] for m in page["data"]] == [first["message_id"]]


async def test_client_message_id_is_scoped_to_sender_and_chat(server: RunningServer) -> None:
    async with (
        server.connect("alice") as alice,
        server.connect("bob") as bob,
        server.connect("carol") as carol,
    ):
        chat = await chat_between(alice, bob)
        other = await alice.create_chat("carol")
        assert (await carol.recv())["type"] == "new_chats"
        first = await alice.send_message(chat["chat_id"], "bob", "1", client_message_id="k")
        assert (await bob.recv())["message_id"] == first["message_id"]
        from_bob = await bob.send_message(chat["chat_id"], "alice", "2", client_message_id="k")
        assert from_bob["message_id"] != first["message_id"]
        assert (await alice.recv())["message_id"] == from_bob["message_id"]
        elsewhere = await alice.send_message(other["chat_id"], "carol", "3", client_message_id="k")
        assert elsewhere["message_id"] != first["message_id"]
        assert (await carol.recv())["content"] == "3"


async def test_resend_while_the_recipient_is_offline(server: RunningServer) -> None:
    async with server.connect("alice") as alice:
        chat = await alice.create_chat("bob")
        first = await alice.send_message(chat["chat_id"], "bob", "hi", client_message_id="k")
        again = await alice.send_message(chat["chat_id"], "bob", "hi", client_message_id="k")
        assert again["message_id"] == first["message_id"]
    async with server.connect("bob") as bob:
        messages = [m for f in bob.backlog if f["type"] == "new_messages" for m in f["data"]]
        assert [m["message_id"] for m in messages] == [first["message_id"]]


async def test_resend_after_delivery_does_not_push_again(server: RunningServer) -> None:
    async with server.connect("alice") as alice:
        chat = await alice.create_chat("bob")
        first = await alice.send_message(chat["chat_id"], "bob", "hi", client_message_id="k")
    async with server.connect("bob") as bob:
        assert [
            m["message_id"] for f in bob.backlog if f["type"] == "new_messages" for m in f["data"]
        ] == [first["message_id"]]
        async with server.connect("alice") as alice:
            again = await alice.send_message(chat["chat_id"], "bob", "hi", client_message_id="k")
            assert again["message_id"] == first["message_id"]
        await expect_silence(bob)
    await wait_nothing_pending(server, "bob")
    async with server.connect("bob") as bob:
        assert bob.backlog == []


async def test_unexpected_fault_is_internal_with_a_correlation_id(
    server: RunningServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    services = server.app.services
    assert services is not None

    async def explode(*args: object, **kwargs: object) -> None:
        raise RuntimeError("simulated fault")

    async with server.connect("alice") as alice:
        chat = await alice.create_chat("bob")
        monkeypatch.setattr(services.store, "add_message", explode)
        error = await alice.request(
            {
                "type": "send_message",
                "chat_id": chat["chat_id"],
                "recipient_id": "bob",
                "content": "boom",
                "request_id": "i",
            }
        )
        assert (error["type"], error["code"], error["request_id"]) == ("error", "internal", "i")
        assert "simulated fault" not in error["message"]
        assert "Traceback" not in error["message"]
        logged = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert logged
        correlation = re.search(r"correlation[ _]?(?:id)?[ =]*([0-9a-f]{6,})", error["message"])
        assert correlation, error["message"]
        assert any(correlation.group(1) in r.getMessage() for r in logged)
        # One client's fault does not take anything down.
        monkeypatch.undo()
        assert await alice.request({"type": "ping"}) == {"type": "pong"}
        ack = await alice.send_message(chat["chat_id"], "bob", "fine again")
        assert ack["content"] == "fine again"


async def test_timestamps_never_go_backwards_even_if_the_clock_does(
    server: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    start = time.time_ns() // 1_000_000
    steps = iter(range(0, 10_000_000, 1000))

    def clock_going_backwards() -> int:
        return start - next(steps)  # a second earlier at every call

    async with server.connect("alice") as alice, server.connect("bob") as bob:
        chat = await chat_between(alice, bob)
        first = await alice.send_message(chat["chat_id"], "bob", "before")
        monkeypatch.setattr(sqlite_store, "now_ms", clock_going_backwards)
        acks = [first] + [
            await alice.send_message(chat["chat_id"], "bob", f"m{i}") for i in range(5)
        ]
        stamps = [a["timestamp"] for a in acks]
        assert stamps == sorted(stamps)
        ids = [a["message_id"] for a in acks]
        assert ids == sorted(ids, key=id_key)
        assert all(TIMESTAMP.match(stamp) for stamp in stamps)
