"""Without the transport guard the app stays a plain ASGI app.

On a Hypercorn outside the checked range `hypercorn_guard.install()` patches nothing; the
writer must then speak only standard ASGI (`websocket.accept` without our options, one
`websocket.send` per frame, no ping events). Here the guard is reported as not installed
(the patched transport underneath answers standard events the same way Hypercorn does), and
a connection must work end to end: several frames queued together, a backlog, pings due.
"""

from __future__ import annotations

import pytest
import trio
from conftest import StartServer

from handler.transport import hypercorn_guard


async def test_the_writer_speaks_standard_asgi_without_the_guard(
    start_server: StartServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(hypercorn_guard, "_installed", False)
    server = await start_server(limits={"ping_interval_s": 0.05})
    with trio.fail_after(10):
        async with server.connect("alice") as alice:
            chat = await alice.create_chat("bob")
            for n in range(5):  # queued together: the batch goes out as one send per frame
                await alice.send(
                    {
                        "type": "send_message",
                        "chat_id": chat["chat_id"],
                        "recipient_id": "bob",
                        "content": f"m{n}",
                    }
                )
            acks = [await alice.recv() for _ in range(5)]
            assert [a["content"] for a in acks] == [f"m{n}" for n in range(5)]
            await trio.sleep(0.2)  # pings fall due meanwhile: the connection must keep working
            assert (await alice.request({"type": "ping"}))["type"] == "pong"
        async with server.connect("bob") as bob:
            backlog = [f for f in bob.backlog if f["type"] == "new_messages"]
            assert [m["content"] for m in backlog[0]["data"]] == [f"m{n}" for n in range(5)]
