"""End to end: the HTTP endpoints, and graceful shutdown."""

from __future__ import annotations

import json

import pytest
import trio
from conftest import StartServer
from support import RunningServer, backlog_messages, http_request

from handler.errors import StoreUnavailable


async def test_healthz(server: RunningServer) -> None:
    response = await http_request(server, "GET", "/healthz")
    assert response.status == 200
    assert response.json() == {"status": "ok"}
    assert response.headers["content-type"].startswith("application/json")


async def test_metrics_count_frames_errors_and_connections(server: RunningServer) -> None:
    async with server.connect("alice") as alice:
        await alice.send_raw("not json")
        assert (await alice.recv())["code"] == "bad_json"
        response = await http_request(server, "GET", "/metrics")
        assert response.status == 200
        assert response.headers["content-type"].startswith("text/plain")
        text = response.body.decode()
        samples = {
            line.rpartition(" ")[0]: float(line.rpartition(" ")[2])
            for line in text.splitlines()
            if line and not line.startswith("#")
        }
        assert samples["chat_connections"] == 1
        assert samples["chat_bound_users"] == 1
        assert samples['chat_frames_in_total{type="ping"}'] >= 1
        assert samples['chat_frames_in_total{type="invalid"}'] >= 1
        assert samples['chat_errors_total{code="bad_json"}'] >= 1
        assert any(name.startswith("chat_frames_out_total") for name in samples)
        assert "# TYPE chat_commit_seconds histogram" in text


async def test_dev_token_when_enabled(server: RunningServer) -> None:
    response = await http_request(
        server,
        "POST",
        "/auth/dev-token",
        json.dumps({"user_id": "alice"}).encode(),
        [("Content-Type", "application/json")],
    )
    assert response.status == 200
    token = response.json()["token"]
    async with server.connect("alice", token=token) as alice:
        assert await alice.request({"type": "ping"}) == {"type": "pong"}


async def test_dev_token_refuses_a_bad_user_id(server: RunningServer) -> None:
    for body in (b'{"user_id": " alice"}', b'{"user_id": 5}', b"[]", b"not json", b""):
        response = await http_request(server, "POST", "/auth/dev-token", body)
        assert response.status == 400, body


async def test_dev_token_is_404_when_disabled(start_server: StartServer) -> None:
    server = await start_server(auth={"dev_tokens": False})
    response = await http_request(
        server, "POST", "/auth/dev-token", json.dumps({"user_id": "alice"}).encode()
    )
    assert response.status == 404
    assert "token" not in response.body.decode()


async def test_index_page(server: RunningServer) -> None:
    response = await http_request(server, "GET", "/")
    assert response.status == 200
    assert response.headers["content-type"].startswith("text/html")


async def test_shutdown_closes_with_1001_and_keeps_acknowledged_messages(
    start_server: StartServer,
) -> None:
    server = await start_server()
    async with server.connect("alice") as alice, server.connect("bob") as bob:
        chat = await alice.create_chat("bob")
        assert (await bob.recv())["type"] == "new_chats"
        await bob.ws.aclose()  # bob goes offline: the next messages wait for him
        acks = [await alice.send_message(chat["chat_id"], "bob", f"m{i}") for i in range(20)]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.stop)
            assert await alice.wait_closed() == 1001
    # A new server on the same database still has every acknowledged message.
    again = await start_server(storage={"path": str(server.config.storage.path)})
    async with again.connect("bob") as bob:
        got = [m["message_id"] for m in backlog_messages(bob.backlog)]
        assert got == [a["message_id"] for a in acks]


async def test_no_new_connections_during_shutdown(start_server: StartServer) -> None:
    server = await start_server()
    async with server.connect("alice") as alice, trio.open_nursery() as nursery:
        nursery.start_soon(server.stop)
        assert await alice.wait_closed() == 1001
    with trio.fail_after(5):
        try:
            stream = await trio.open_tcp_stream("127.0.0.1", server.port)
        except OSError:
            return  # refused: not accepting any more
        await stream.aclose()
        raise AssertionError("the server still accepts connections after shutdown")


async def test_healthz_is_503_when_the_store_does_not_answer(
    server: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    services = server.app.services
    assert services is not None

    async def broken() -> None:
        raise StoreUnavailable("database is gone")

    monkeypatch.setattr(services.store, "check", broken)
    response = await http_request(server, "GET", "/healthz")
    assert response.status == 503
    body = response.json()
    assert body["status"] != "ok"
    assert "store" in body
