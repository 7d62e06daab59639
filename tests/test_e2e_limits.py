"""End to end: rate limits, idle timeout, keep-alive pings, origins, message size, UTF-8,
compression."""

from __future__ import annotations

import contextlib
import json
from typing import Any

import pytest
import trio
from conftest import StartServer
from support import (
    Client,
    RunningServer,
    backlog_messages,
    http_request,
    make_token,
    wait_marked,
)
from trio_websocket import ConnectionRejected
from wsproto.extensions import PerMessageDeflate

EMOJI = "\U0001f600"


# --------------------------------------------------------------------------- rate limiting


async def _flood(client: Client, frames: list[dict[str, Any]]) -> list[dict[str, Any]]:
    for frame in frames:
        await client.send(frame)
    return [await client.recv() for _ in frames]


async def test_rate_limited_frames_are_refused_and_not_processed(
    start_server: StartServer,
) -> None:
    server = await start_server(limits={"rate_per_s": 2, "rate_burst": 5})
    async with server.connect("alice") as alice:  # the sync ping of connect() took 1 token
        chat = await alice.create_chat("bob")  # and this one: 3 left
        frames = [
            {
                "type": "send_message",
                "chat_id": chat["chat_id"],
                "recipient_id": "bob",
                "content": f"m{i}",
                "request_id": i,
            }
            for i in range(8)
        ]
        replies = await _flood(alice, frames)
        assert [r["request_id"] for r in replies] == list(range(8))
        served = [r for r in replies if r["type"] == "message"]
        refused = [r for r in replies if r["type"] == "error"]
        assert 3 <= len(served) <= 4  # 4 only if the bucket refilled during the flood
        assert replies == served + refused
        for error in refused:
            assert error["code"] == "rate_limited"
            assert isinstance(error["retry_after_ms"], int)
            assert 0 < error["retry_after_ms"] <= 500
        # The connection stays open; after the advertised wait, frames are served again, and
        # the refused ones were not processed.
        await trio.sleep(refused[-1]["retry_after_ms"] / 1000)
        page = await alice.request(
            {"type": "fetch_messages", "chat_id": chat["chat_id"], "request_id": "after"}
        )
        assert page["type"] == "all_messages", page
        assert [m["content"] for m in page["data"]] == [r["content"] for r in served]


async def test_rate_limit_is_per_user_not_per_connection(start_server: StartServer) -> None:
    server = await start_server(limits={"rate_per_s": 0.1, "rate_burst": 4})
    async with (
        server.connect("alice") as laptop,  # 1 token
        server.connect("alice") as phone,  # 1 token
        server.connect("carol") as carol,
    ):
        replies = await _flood(laptop, [{"type": "ping"}] * 3)
        assert [r["type"] for r in replies] == ["pong", "pong", "error"]
        error = await phone.request({"type": "ping", "request_id": "p"})
        assert (error["code"], error["request_id"]) == ("rate_limited", "p")
        # Another user is not affected.
        assert await carol.request({"type": "ping"}) == {"type": "pong"}


async def test_invalid_frames_count_too(start_server: StartServer) -> None:
    server = await start_server(limits={"rate_per_s": 0.1, "rate_burst": 3})
    async with server.connect("alice") as alice:  # 1 token
        for _ in range(2):
            await alice.send_raw("not json")
        await alice.send_raw("not json either")
        replies = [await alice.recv() for _ in range(3)]
        assert [r["code"] for r in replies] == ["bad_json", "bad_json", "rate_limited"]


async def test_unbound_connections_are_rate_limited(start_server: StartServer) -> None:
    server = await start_server(limits={"rate_per_s": 0.1, "rate_burst": 3})
    async with server.open() as client:
        replies = await _flood(client, [{"type": "ping", "request_id": i} for i in range(5)])
        assert [r["type"] for r in replies] == ["pong"] * 3 + ["error"] * 2
        assert all(r["code"] == "rate_limited" for r in replies[3:])
        assert [r["request_id"] for r in replies] == list(range(5))


async def test_rate_limited_frame_with_a_token_does_not_bind(start_server: StartServer) -> None:
    server = await start_server(limits={"rate_per_s": 0.1, "rate_burst": 1})
    async with server.open() as client:
        assert await client.request({"type": "ping"}) == {"type": "pong"}
        error = await client.request({"type": "fetch_chats", "token": server.token("alice")})
        assert error["code"] == "rate_limited"
        await client.expect_no_frame(0.1)  # no `authenticated`


# --------------------------------------------------------------------------- idle timeout


async def test_idle_connection_is_closed_with_1008(start_server: StartServer) -> None:
    server = await start_server(limits={"idle_timeout_s": 0.4})
    async with server.connect("alice") as alice:
        start = trio.current_time()
        assert await alice.wait_closed(timeout=3) == 1008
        assert trio.current_time() - start >= 0.3


async def test_idle_unbound_connection_is_closed_with_1008(start_server: StartServer) -> None:
    server = await start_server(limits={"idle_timeout_s": 0.4})
    async with server.open() as client:
        assert await client.wait_closed(timeout=3) == 1008


async def test_ping_frames_keep_a_connection_alive(start_server: StartServer) -> None:
    server = await start_server(limits={"idle_timeout_s": 0.4})
    async with server.connect("alice") as alice:
        for _ in range(5):  # 0.75 s in all, about twice the idle timeout
            await trio.sleep(0.15)
            assert await alice.request({"type": "ping"}) == {"type": "pong"}
        assert await alice.wait_closed(timeout=3) == 1008  # then silence: closed


async def test_any_data_frame_counts_as_activity(start_server: StartServer) -> None:
    server = await start_server(limits={"idle_timeout_s": 0.4})
    async with server.connect("alice") as alice:
        for _ in range(6):
            await trio.sleep(0.15)
            await alice.send_raw(b"binary counts as data")
            assert (await alice.recv())["code"] == "bad_json"
        assert await alice.request({"type": "ping"}) == {"type": "pong"}


async def test_websocket_control_frames_do_not_count(start_server: StartServer) -> None:
    server = await start_server(limits={"idle_timeout_s": 0.4, "ping_interval_s": 0.05})
    async with server.connect("alice") as alice:
        # The server pings every 50 ms and trio-websocket answers each with a pong; the client
        # also sends its own pings and unsolicited pongs. None of it is a data frame.
        async def chatter() -> None:
            while True:
                await alice.ws.ping()
                await alice.ws.pong()
                await trio.sleep(0.05)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(chatter)
            assert await alice.wait_closed(timeout=3) == 1008
            nursery.cancel_scope.cancel()


async def test_server_sends_keepalive_pings(start_server: StartServer) -> None:
    server = await start_server(limits={"ping_interval_s": 0.05})
    async with server.open_raw(token=server.token("alice")) as raw:
        assert (await raw.recv())["type"] == "authenticated"
        with trio.move_on_after(0.4):
            await raw.recv()
        assert raw.pings_received >= 3


# --------------------------------------------------------------------------- origin


async def _upgrade_status(server: RunningServer, origin: str | None) -> int:
    headers = [] if origin is None else [(b"Origin", origin.encode())]
    try:
        async with server.open(headers=headers) as client:
            assert await client.request({"type": "ping"}) == {"type": "pong"}
    except ConnectionRejected as rejected:
        return rejected.status_code
    return 101


async def test_default_origin_policy(server: RunningServer) -> None:
    port = server.port
    assert await _upgrade_status(server, None) == 101
    assert await _upgrade_status(server, f"http://127.0.0.1:{port}") == 101
    assert await _upgrade_status(server, f"https://127.0.0.1:{port}") == 101
    assert await _upgrade_status(server, "http://evil.example") == 403
    assert await _upgrade_status(server, f"http://evil.example:{port}") == 403
    assert await _upgrade_status(server, f"http://127.0.0.1:{port + 1}") == 403
    assert await _upgrade_status(server, f"http://localhost:{port}") == 403
    assert await _upgrade_status(server, "null") == 403


async def test_allowed_origins_replace_the_default(start_server: StartServer) -> None:
    server = await start_server(allowed_origins=["https://chat.example", "http://other.example"])
    assert await _upgrade_status(server, "https://chat.example") == 101
    assert await _upgrade_status(server, "http://other.example") == 101
    assert await _upgrade_status(server, None) == 101  # non-browser clients stay allowed
    assert await _upgrade_status(server, f"http://127.0.0.1:{server.port}") == 403
    assert await _upgrade_status(server, "https://evil.example") == 403
    assert await _upgrade_status(server, "http://chat.example") == 403


async def test_refused_origin_gets_nothing_bound(server: RunningServer) -> None:
    token = server.token("alice")
    with pytest.raises(ConnectionRejected) as info:
        async with server.open(token=token, headers=[(b"Origin", b"http://evil.example")]):
            pass
    assert info.value.status_code == 403


# --------------------------------------------------------------------------- message size


def pad_to(frame: dict[str, Any], size: int, pad_char: str = "a") -> str:
    """`frame` as JSON text of exactly `size` UTF-8 bytes, padded with an ignored extra field."""
    base = json.dumps({**frame, "pad": ""}, ensure_ascii=False)
    room = size - len(base.encode())
    count, rest = divmod(room, len(pad_char.encode()))
    text = base[:-2] + pad_char * count + "a" * rest + '"}'
    assert len(text.encode()) == size
    return text


def padded_ping(size: int, pad_char: str = "a") -> str:
    return pad_to({"type": "ping", "request_id": "big"}, size, pad_char)


SIZES = pytest.mark.parametrize(
    "pad_char", ["a", "\u00e9", "\u20ac", EMOJI], ids=["1B", "2B", "3B", "4B"]
)


@SIZES
async def test_message_of_exactly_the_limit_is_accepted(
    server: RunningServer, pad_char: str
) -> None:
    async with server.connect("alice") as alice:
        await alice.send_raw(padded_ping(65536, pad_char))
        assert await alice.recv() == {"type": "pong", "request_id": "big"}


@SIZES
async def test_message_over_the_limit_closes_with_1009(
    server: RunningServer, pad_char: str
) -> None:
    async with server.connect("alice") as alice:
        text = padded_ping(65537, pad_char)
        if pad_char != "a":
            assert len(text) < 65536  # fewer characters than bytes
        await alice.send_raw(text)
        assert await alice.wait_closed() == 1009


async def test_a_frame_at_the_limit_gets_its_reply_or_error(server: RunningServer) -> None:
    async with server.connect("alice") as alice:
        chat = await alice.create_chat("bob")
        frame = {"type": "send_message", "chat_id": chat["chat_id"], "recipient_id": "bob"}
        await alice.send_raw(pad_to({**frame, "content": EMOJI * 4096}, 65536))
        ack = await alice.recv()
        assert (ack["type"], ack["content"]) == ("message", EMOJI * 4096)
        await alice.send_raw(pad_to({**frame, "content": "x" * 4097, "request_id": 1}, 65536))
        error = await alice.recv()
        assert (error["type"], error["code"], error["request_id"]) == ("error", "too_large", 1)
        await alice.send_raw(pad_to({"type": "nope"}, 65536, "\u00e9"))
        assert (await alice.recv())["code"] == "unknown_type"


async def test_fragmented_message_counts_once_reassembled(server: RunningServer) -> None:
    async with server.open_raw(token=server.token("alice")) as raw:
        assert (await raw.recv())["type"] == "authenticated"
        await raw.send_text(padded_ping(65536), fragments=7)
        assert await raw.recv() == {"type": "pong", "request_id": "big"}
        await raw.send_text(padded_ping(65537), fragments=7)
        assert await raw.wait_closed() == 1009


async def test_configured_frame_limit(start_server: StartServer) -> None:
    server = await start_server(limits={"max_frame_bytes": 2048})
    async with server.connect("alice") as alice:
        await alice.send_raw(padded_ping(2048, "\u00e9"))
        assert await alice.recv() == {"type": "pong", "request_id": "big"}
        await alice.send_raw(padded_ping(2049, "\u00e9"))
        assert await alice.wait_closed() == 1009


async def test_binary_frame_is_bad_json_and_the_connection_stays_open(
    server: RunningServer,
) -> None:
    async with server.connect("alice") as alice:
        for payload in (b"\x00\x01\x02", b'{"type": "ping"}', b""):
            await alice.send_raw(payload)
            error = await alice.recv()
            assert (error["type"], error["code"]) == ("error", "bad_json")
        assert await alice.request({"type": "ping"}) == {"type": "pong"}


async def test_invalid_utf8_in_a_text_frame_closes_with_1007(server: RunningServer) -> None:
    async with server.open_raw(token=server.token("alice")) as raw:
        assert (await raw.recv())["type"] == "authenticated"
        await raw.send_frame(0x1, b'{"type": "ping", "x": "\xff\xfe"}')
        assert await raw.wait_closed() == 1007


# --------------------------------------------------------------------------- compression


async def test_compression_is_not_negotiated_by_default(server: RunningServer) -> None:
    async with server.open_raw(extensions=[PerMessageDeflate()]) as raw:
        assert raw.accepted is not None
        assert raw.accepted.extensions == []


async def test_compression_when_enabled(start_server: StartServer) -> None:
    server = await start_server(limits={"compression": True})
    async with server.open_raw(
        token=server.token("alice"), extensions=[PerMessageDeflate()]
    ) as raw:
        assert raw.accepted is not None
        assert [e.name for e in raw.accepted.extensions] == ["permessage-deflate"]
        assert (await raw.recv())["type"] == "authenticated"
        await raw.send_text(padded_ping(65536))  # compresses to a few hundred bytes
        assert await raw.recv() == {"type": "pong", "request_id": "big"}


async def test_compression_bomb_closes_with_1009(start_server: StartServer) -> None:
    server = await start_server(limits={"compression": True})
    async with server.open_raw(
        token=server.token("alice"), extensions=[PerMessageDeflate()]
    ) as raw:
        assert (await raw.recv())["type"] == "authenticated"
        bomb = '{"type": "ping", "pad": "' + "a" * 50_000_000 + '"}'  # ~50 KB compressed
        await raw.send_text(bomb)
        assert await raw.wait_closed() == 1009


async def test_token_in_the_query_is_not_required_for_a_raw_client(
    server: RunningServer,
) -> None:
    """Sanity check of the raw client itself: plain JSON both ways."""
    async with server.open_raw() as raw:
        await raw.send({"type": "ping", "token": make_token("alice")})
        assert await raw.recv() == {"type": "authenticated", "user_id": "alice"}
        assert await raw.recv() == {"type": "pong"}


# --------------------------------------------------------------------------- slow consumers


async def _slow_consumers_dropped(server: RunningServer) -> float:
    response = await http_request(server, "GET", "/metrics")
    for line in response.body.decode().splitlines():
        if line.startswith("chat_slow_consumers_dropped_total "):
            return float(line.split()[1])
    return 0.0


@pytest.mark.parametrize(
    "queue",
    [{"send_queue": 8}, {"send_queue": 100_000, "send_queue_bytes": 65536}],
    ids=["frames", "bytes"],
)
async def test_a_client_that_stops_reading_is_dropped(
    start_server: StartServer, queue: dict[str, int]
) -> None:
    """The send queue is bounded in frames and in bytes, whichever is reached first; what the
    dropped client did not take stays undelivered, exactly: nothing lost, nothing twice."""
    server = await start_server(limits=queue)
    big = EMOJI * 4096  # 16 KiB of UTF-8 per message: socket buffers fill quickly
    async with server.connect("alice") as alice, server.connect("carol") as carol:
        chat = await alice.create_chat("bob")
        carols = await alice.create_chat("carol")
        assert (await carol.recv())["type"] == "new_chats"
        sent: list[str] = []
        async with server.open_raw(token=server.token("bob")) as bob:
            assert (await bob.recv())["type"] == "authenticated"
            assert (await bob.recv())["type"] == "new_chats"
            # bob stops reading. Other users keep their latency while his queue fills.
            with trio.fail_after(10):
                while await _slow_consumers_dropped(server) < 1:
                    for _ in range(10):
                        ack = await alice.send_message(chat["chat_id"], "bob", big)
                        sent.append(ack["message_id"])
                    start = trio.current_time()
                    await alice.send_message(carols["chat_id"], "carol", "still fast?")
                    assert (await carol.recv())["content"] == "still fast?"
                    assert trio.current_time() - start < 0.5
                    assert len(sent) < 1000, "never dropped"
            # bob now reads what reached him: a close with 1013, or an aborted connection.
            read: list[str] = []
            with trio.fail_after(5):
                try:
                    while True:
                        event = await bob.recv_event()
                        if isinstance(event, int):
                            assert event == 1013
                            break
                        assert event["type"] == "message"
                        read.append(event["message_id"])
                except ConnectionError:
                    pass  # aborted: written but unread frames are gone with the socket
        for i in range(3):  # bob is offline now
            ack = await alice.send_message(chat["chat_id"], "bob", f"after {i}")
            sent.append(ack["message_id"])
    await wait_marked(server, "bob", message_ids=read)
    async with server.connect("bob") as bob_again:
        backlog = [m["message_id"] for m in backlog_messages(bob_again.backlog)]
    # What bob read is the start of the stream; what he missed comes back in the backlog, in
    # order and without anything he read: frames the abort discarded from the server's send
    # buffer were never acknowledged by bob's TCP stack, so they are not marked delivered.
    assert read == sent[: len(read)]
    assert backlog == sent[len(read) :]
    assert len(backlog) >= 4  # at least the message that overflowed, and the 3 sent offline


@pytest.mark.slow
async def test_a_client_that_sends_but_never_reads_is_dropped(start_server: StartServer) -> None:
    server = await start_server(limits={"send_queue": 4})
    async with server.connect("carol") as carol, server.connect("bob") as setup:
        chat = await setup.create_chat("carol")
        assert (await carol.recv())["type"] == "new_chats"
        for _ in range(20):  # each fetch_messages reply is then ~330 KB
            await setup.send_message(chat["chat_id"], "carol", EMOJI * 4096)
            await carol.recv()
    async with server.connect("carol") as carol, server.open_raw(token=server.token("bob")) as bob:
        request = json.dumps({"type": "fetch_messages", "chat_id": chat["chat_id"]})

        async def flood() -> None:
            # Never reads: the replies fill the socket, then the outbox, then reply() waits.
            with contextlib.suppress(OSError, trio.BrokenResourceError, trio.ClosedResourceError):
                while True:
                    await bob.send_text(request)

        start = trio.current_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(flood)
            with trio.fail_after(15):
                while await _slow_consumers_dropped(server) < 1:
                    before = trio.current_time()
                    assert await carol.request({"type": "ping"}) == {"type": "pong"}
                    assert trio.current_time() - before < 0.5
                    await trio.sleep(0.05)
            nursery.cancel_scope.cancel()
        assert trio.current_time() - start < 10  # "within a few seconds"
        assert await carol.request({"type": "ping"}) == {"type": "pong"}
        # bob's side ends too: a close frame, or a reset of the TCP connection.
        with trio.fail_after(5):
            try:
                while not isinstance(await bob.recv_event(), int):
                    pass
            except ConnectionError:
                pass
