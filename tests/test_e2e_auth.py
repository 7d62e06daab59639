"""End to end: authentication, binding, token expiry and refresh, the binding order."""

from __future__ import annotations

import math
import time

import pytest
import trio
from conftest import StartServer
from support import SECRET, RunningServer, backlog_messages, make_token, sign

WRONG_SECRET = "not-the-server-secret-0123456789abcdef0123"


async def test_bind_by_query_token(server: RunningServer) -> None:
    async with server.open(token=server.token("alice")) as alice:
        assert await alice.recv() == {"type": "authenticated", "user_id": "alice"}
        # Bound: later frames need no token.
        reply = await alice.request({"type": "create_chat", "recipient_id": "bob"})
        assert reply["type"] == "new_chats"
        assert reply["data"][0]["participants"] == ["alice", "bob"]
        assert await alice.request({"type": "ping"}) == {"type": "pong"}


async def test_bind_by_frame_token_then_reply(server: RunningServer) -> None:
    async with server.open() as alice:
        await alice.send(
            {
                "type": "create_chat",
                "recipient_id": "bob",
                "token": server.token("alice"),
                "request_id": "r1",
            }
        )
        assert await alice.recv() == {"type": "authenticated", "user_id": "alice"}
        reply = await alice.recv()
        assert reply["type"] == "new_chats"
        assert reply["request_id"] == "r1"
        # Later frames need no token.
        chat_id = reply["data"][0]["chat_id"]
        ack = await alice.send_message(chat_id, "bob", "hello")
        assert ack["content"] == "hello"


async def test_ping_needs_no_token(server: RunningServer) -> None:
    async with server.open() as client:
        assert await client.request({"type": "ping"}) == {"type": "pong"}
        assert await client.request({"type": "ping", "request_id": 3}) == {
            "type": "pong",
            "request_id": 3,
        }
        await client.expect_no_frame(0.1)


async def test_unbound_frame_without_token_is_unauthorized(server: RunningServer) -> None:
    async with server.open() as client:
        for frame in (
            {"type": "create_chat", "recipient_id": "bob", "request_id": "a"},
            {"type": "send_message", "chat_id": "1", "recipient_id": "b", "content": "x"},
            {"type": "fetch_chats", "request_id": "a"},
            {"type": "fetch_messages", "chat_id": "1", "request_id": "a"},
        ):
            error = await client.request(frame)
            assert error["type"] == "error"
            assert error["code"] == "unauthorized"
            assert error.get("request_id") == frame.get("request_id")
        # Still open, still unbound, and can still bind.
        assert await client.request({"type": "ping"}) == {"type": "pong"}
        await client.send({"type": "ping", "token": server.token("alice")})
        assert await client.recv() == {"type": "authenticated", "user_id": "alice"}
        assert await client.recv() == {"type": "pong"}


async def test_invalid_query_token_opens_unbound_with_an_error(server: RunningServer) -> None:
    bad_tokens = [
        "garbage",
        make_token("alice", ttl=-10),
        sign({"sub": "alice"}, WRONG_SECRET),
        sign({"sub": "alice", "nbf": time.time() + 600}),
        sign({"user": "alice"}),
    ]
    for token in bad_tokens:
        async with server.open(token=token) as client:  # the upgrade is not refused
            error = await client.recv()
            assert error["type"] == "error"
            assert error["code"] == "unauthorized"
            assert "request_id" not in error
            # Unbound: a frame without a token is refused, a valid token binds.
            refused = await client.request({"type": "fetch_chats"})
            assert refused["code"] == "unauthorized"
            await client.send({"type": "fetch_chats", "token": server.token("alice")})
            assert await client.recv() == {"type": "authenticated", "user_id": "alice"}
            assert (await client.recv())["type"] == "all_chats"


async def test_alg_none_token_is_unauthorized(server: RunningServer) -> None:
    header = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0"  # {"alg":"none","typ":"JWT"}
    payload = "eyJzdWIiOiJhbGljZSJ9"  # {"sub":"alice"}
    async with server.open(token=f"{header}.{payload}.") as client:
        assert (await client.recv())["code"] == "unauthorized"


async def test_frame_with_invalid_token_is_not_processed_when_unbound(
    server: RunningServer,
) -> None:
    async with server.open() as client:
        error = await client.request(
            {
                "type": "create_chat",
                "recipient_id": "bob",
                "token": sign({"sub": "alice"}, WRONG_SECRET),
                "request_id": 9,
            }
        )
        assert (error["type"], error["code"], error["request_id"]) == ("error", "unauthorized", 9)
    # No chat was created: bob has no backlog, alice has no chats.
    async with server.connect("bob") as bob:
        assert bob.backlog == []
    async with server.connect("alice") as alice:
        all_chats, _ = await alice.fetch_chats()
        assert all_chats["data"] == []


async def test_frame_with_invalid_token_is_not_processed_when_bound(
    server: RunningServer,
) -> None:
    async with server.connect("alice") as alice, server.connect("bob") as bob:
        chat = await alice.create_chat("bob")
        assert (await bob.recv())["type"] == "new_chats"
        for bad in (
            "garbage",
            make_token("alice", ttl=-5),
            sign({"sub": "alice"}, WRONG_SECRET),
            sign({"sub": "alice", "nbf": time.time() + 600}),
        ):
            error = await alice.request(
                {
                    "type": "send_message",
                    "chat_id": chat["chat_id"],
                    "recipient_id": "bob",
                    "content": "must not be stored",
                    "token": bad,
                    "request_id": "x",
                }
            )
            assert (error["code"], error["request_id"]) == ("unauthorized", "x")
        await bob.expect_no_frame(0.2)
        page = await alice.request({"type": "fetch_messages", "chat_id": chat["chat_id"]})
        assert page["data"] == []
        # The connection stays bound as alice.
        ack = await alice.send_message(chat["chat_id"], "bob", "fine")
        assert ack["sender_id"] == "alice"


async def test_bound_connection_accepts_another_valid_token_of_the_same_user(
    server: RunningServer,
) -> None:
    async with server.connect("alice") as alice:
        other = make_token("alice", ttl=7200)
        reply = await alice.request(
            {"type": "create_chat", "recipient_id": "bob", "token": other, "request_id": 1}
        )
        assert (reply["type"], reply["request_id"]) == ("new_chats", 1)
        await alice.expect_no_frame(0.1)  # no second `authenticated`


async def test_token_of_another_user_on_a_bound_connection_is_forbidden(
    server: RunningServer,
) -> None:
    async with server.connect("alice") as alice:
        error = await alice.request(
            {
                "type": "create_chat",
                "recipient_id": "carol",
                "token": server.token("bob"),
                "request_id": "f",
            }
        )
        assert (error["type"], error["code"], error["request_id"]) == ("error", "forbidden", "f")
        # Not processed, not rebound.
        all_chats, _ = await alice.fetch_chats()
        assert all_chats["data"] == []
        chat = await alice.create_chat("dave")
        assert chat["created_by"] == "alice"
    async with server.connect("bob") as bob:
        all_chats, _ = await bob.fetch_chats()
        assert all_chats["data"] == []
    async with server.connect("carol") as carol:
        assert carol.backlog == []


async def test_auth_timeout_closes_with_1008(start_server: StartServer) -> None:
    server = await start_server(limits={"auth_timeout_s": 0.3})
    async with server.open() as client:
        start = trio.current_time()
        # Pings do not bind, so they do not stop the auth timer.
        for _ in range(3):
            assert await client.request({"type": "ping"}) == {"type": "pong"}
        assert await client.wait_closed(timeout=3) == 1008
        assert trio.current_time() - start >= 0.25


async def test_auth_timeout_does_not_close_a_bound_connection(start_server: StartServer) -> None:
    server = await start_server(limits={"auth_timeout_s": 0.3})
    async with server.open() as client:
        await client.send({"type": "ping", "token": server.token("alice")})
        assert (await client.recv())["type"] == "authenticated"
        assert await client.recv() == {"type": "pong"}
        await client.expect_no_frame(0.5)
        assert await client.request({"type": "ping"}) == {"type": "pong"}


async def test_invalid_token_does_not_stop_the_auth_timer(start_server: StartServer) -> None:
    server = await start_server(limits={"auth_timeout_s": 0.3})
    async with server.open(token="garbage") as client:
        assert (await client.recv())["code"] == "unauthorized"
        assert await client.wait_closed(timeout=3) == 1008


async def test_token_expiry_closes_with_1008(server: RunningServer) -> None:
    async with server.connect("alice", token=make_token("alice", ttl=0.6)) as alice:
        assert await alice.request({"type": "ping"}) == {"type": "pong"}
        assert await alice.wait_closed(timeout=4) == 1008


async def test_token_expiry_applies_to_a_frame_bound_connection(server: RunningServer) -> None:
    async with server.open() as alice:
        await alice.send({"type": "ping", "token": make_token("alice", ttl=0.6)})
        assert (await alice.recv())["type"] == "authenticated"
        assert await alice.recv() == {"type": "pong"}
        assert await alice.wait_closed(timeout=4) == 1008


async def test_in_band_refresh_keeps_the_connection_open(server: RunningServer) -> None:
    first_exp = math.ceil(time.time() + 0.6)
    async with server.connect("alice", token=make_token("alice", exp=first_exp)) as alice:
        refreshed = await alice.request(
            {"type": "ping", "token": make_token("alice", ttl=60), "request_id": "refresh"}
        )
        assert refreshed == {"type": "pong", "request_id": "refresh"}
        await alice.expect_no_frame(first_exp + 0.3 - time.time())  # past the first exp
        assert await alice.request({"type": "ping"}) == {"type": "pong"}


async def test_refresh_with_an_earlier_exp_does_not_extend(server: RunningServer) -> None:
    first_exp = math.ceil(time.time() + 1.5)
    async with server.connect("alice", token=make_token("alice", exp=first_exp)) as alice:
        earlier = make_token("alice", exp=first_exp - 1)
        assert await alice.request({"type": "ping", "token": earlier}) == {"type": "pong"}
        await alice.expect_no_frame(first_exp - 1 + 0.2 - time.time())  # the earlier one passed
        assert await alice.request({"type": "ping"}) == {"type": "pong"}
        assert await alice.wait_closed(timeout=3) == 1008
        assert time.time() >= first_exp - 0.1


async def test_refresh_for_another_user_does_not_extend(server: RunningServer) -> None:
    async with server.connect("alice", token=make_token("alice", ttl=0.6)) as alice:
        error = await alice.request({"type": "ping", "token": make_token("bob", ttl=60)})
        assert error["code"] == "forbidden"
        assert await alice.wait_closed(timeout=4) == 1008


async def test_token_without_exp_does_not_expire(server: RunningServer) -> None:
    async with server.connect("alice", token=make_token("alice", ttl=None)) as alice:
        await alice.expect_no_frame(0.3)
        assert await alice.request({"type": "ping"}) == {"type": "pong"}


async def test_authenticated_then_backlog_then_reply(server: RunningServer) -> None:
    async with server.connect("alice") as alice:
        chat = await alice.create_chat("bob")
        first = await alice.send_message(chat["chat_id"], "bob", "one")
        second = await alice.send_message(chat["chat_id"], "bob", "two")
    async with server.open() as bob:
        await bob.send({"type": "fetch_chats", "token": server.token("bob"), "request_id": "fc"})
        frames = [await bob.recv() for _ in range(5)]
        assert frames[0] == {"type": "authenticated", "user_id": "bob"}
        assert frames[1]["type"] == "new_chats"
        assert [c["chat_id"] for c in frames[1]["data"]] == [chat["chat_id"]]
        assert frames[2]["type"] == "new_messages"
        assert frames[2]["chat_id"] == chat["chat_id"]
        assert [m["message_id"] for m in frames[2]["data"]] == [
            first["message_id"],
            second["message_id"],
        ]
        assert (frames[3]["type"], frames[3]["request_id"]) == ("all_chats", "fc")
        assert (frames[4]["type"], frames[4]["request_id"]) == ("all_messages", "fc")
        assert "request_id" not in frames[0]
        assert "request_id" not in frames[1]
        assert "request_id" not in frames[2]
        await bob.expect_no_frame(0.1)


async def test_query_binding_sends_backlog_before_any_reply(server: RunningServer) -> None:
    async with server.connect("alice") as alice:
        chat = await alice.create_chat("bob")
        await alice.send_message(chat["chat_id"], "bob", "queued")
    async with server.open(token=server.token("bob")) as bob:
        await bob.send({"type": "ping", "request_id": "p"})  # sent before reading anything
        frames = [await bob.recv() for _ in range(4)]
        assert [f["type"] for f in frames] == ["authenticated", "new_chats", "new_messages", "pong"]
        assert [m["content"] for m in backlog_messages(frames)] == ["queued"]


async def test_dev_token_signs_with_the_configured_secret(server: RunningServer) -> None:
    assert server.config.auth.jwt_secret == SECRET


async def test_issuer_and_audience_when_configured(start_server: StartServer) -> None:
    server = await start_server(auth={"issuer": "chat-auth", "audience": "chat"})
    good = make_token("alice", iss="chat-auth", aud="chat")
    async with server.connect("alice", token=good) as alice:
        assert await alice.request({"type": "ping"}) == {"type": "pong"}
    for bad in (
        make_token("alice", aud="chat"),
        make_token("alice", iss="chat-auth"),
        make_token("alice", iss="elsewhere", aud="chat"),
        make_token("alice", iss="chat-auth", aud="other"),
    ):
        async with server.open(token=bad) as client:
            assert (await client.recv())["code"] == "unauthorized"


async def test_only_configured_algorithms(start_server: StartServer) -> None:
    long_secret = SECRET * 2  # HS512 wants 64+ bytes
    server = await start_server(
        auth={"jwt_secret": long_secret, "algorithms": ["HS512"], "dev_tokens": False}
    )
    async with server.open(token=sign({"sub": "alice"}, long_secret, "HS256")) as client:
        assert (await client.recv())["code"] == "unauthorized"
    async with server.open(token=sign({"sub": "alice"}, long_secret, "HS512")) as client:
        assert await client.recv() == {"type": "authenticated", "user_id": "alice"}


async def test_unexpected_fault_while_binding_by_query_is_internal(
    server: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    services = server.app.services
    assert services is not None

    def explode(token: str, now: float | None = None) -> None:
        raise RuntimeError("simulated fault")

    monkeypatch.setattr(services.authority, "verify", explode)
    async with server.open(token=server.token("alice")) as client:
        reply = await client.recv_event_or_close()
        assert reply in ({"type": "error", "code": "internal"}, 1011), reply
