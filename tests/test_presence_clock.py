"""The presence grace period at its default length, on a virtual clock: the server runs in
this process, so trio's `MockClock` jumps over the 5 s wait whenever every task (the server's
and the test's) is idle, and the test still sees every step in order."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest
import trio
import trio.testing
from support import RunningServer
from test_e2e_presence import fetch, next_presence, presence_frames, start_watching

StartServer = Callable[..., Awaitable[RunningServer]]


@pytest.fixture
def virtual_clock() -> trio.testing.MockClock:
    """Jumps once every task has waited 20 ms of real time (socket round trips and the
    store's threads on this machine take less), so a wait of seconds costs almost none."""
    return trio.testing.MockClock(autojump_threshold=0.02)


async def test_offline_is_announced_after_the_default_grace_and_not_before(
    virtual_clock: trio.testing.MockClock, start_server: StartServer
) -> None:
    server = await start_server(limits={"ping_interval_s": 20})
    grace = server.config.limits.presence_grace_s
    assert grace == 5.0
    async with server.connect("bob") as bob:
        await bob.create_chat("alice")
    await trio.sleep(grace + 1)
    async with server.connect("alice") as alice:
        await start_watching(alice)
        async with server.connect("bob"):
            assert (await next_presence(alice))["online"] is True
        left = trio.current_time()
        # A reconnect within the grace is no change at all.
        await trio.sleep(grace - 1)
        async with server.connect("bob"):
            pass
        assert await presence_frames(alice, grace - 0.5) == []
        offline = await next_presence(alice, timeout=grace + 5)
        waited = trio.current_time() - left
        assert offline["online"] is False
        assert offline["last_seen"] is not None
        # Announced one grace after the last connection closed (at grace - 1 + a moment).
        assert 2 * grace - 1 <= waited < 2 * grace + 1, waited
        assert await fetch(alice, ["bob"]) == [offline]
