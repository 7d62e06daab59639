"""End to end: a frame whose handling outlasts the connection's next timer is still answered.

The reader waits for client frames under the connection's next deadline (keep-alive ping,
idle and authentication timers); the handling of a frame that arrived must not run under it.
"""

from __future__ import annotations

from typing import Any

import pytest
import trio
from conftest import StartServer


async def test_a_slow_frame_is_answered_across_a_ping_deadline(
    start_server: StartServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = await start_server(limits={"ping_interval_s": 0.05})
    services = server.app.services
    assert services is not None
    original = services.store.messages_before

    async def slow_read(*args: Any) -> Any:
        await trio.sleep(0.3)  # several ping intervals
        return await original(*args)

    async with server.connect("alice") as alice:
        chat = await alice.create_chat("bob")
        monkeypatch.setattr(services.store, "messages_before", slow_read)
        for _ in range(3):
            reply = await alice.request({"type": "fetch_messages", "chat_id": chat["chat_id"]})
            assert reply["type"] == "all_messages", reply
