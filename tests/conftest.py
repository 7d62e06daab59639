"""Fixtures: real servers on port 0, started with `nursery.start` and stopped gracefully.

`start_server(**overrides)` starts a server with `support.make_config(tmp_path, **overrides)`;
`server` is one with the test defaults. Starting a server also arms a deadline for the whole
test (`TEST_DEADLINE_S`): a hung end-to-end test fails with `TooSlowError` instead of hanging.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, Final

import pytest
import trio
from support import RunningServer, make_config

from handler.app import create_app
from handler.server import serve

TEST_DEADLINE_S: Final = 30.0
SHUTDOWN_TIMEOUT_S: Final = 15.0

StartServer = Callable[..., Awaitable[RunningServer]]


async def _deadline(seconds: float) -> None:
    with trio.fail_after(seconds):
        await trio.sleep_forever()


@pytest.fixture
async def start_server(nursery: trio.Nursery, tmp_path: Path) -> AsyncIterator[StartServer]:
    """Factory: `await start_server(limits={...})` -> a `RunningServer` on a free port."""
    stops: list[tuple[trio.Event, trio.Event]] = []
    counter = itertools.count()
    nursery.start_soon(_deadline, TEST_DEADLINE_S)

    async def start(**overrides: Any) -> RunningServer:
        directory = tmp_path / f"server{next(counter)}"
        directory.mkdir()
        config = make_config(directory, **overrides)
        app = create_app(config)
        stop, stopped = trio.Event(), trio.Event()

        async def run(task_status: trio.TaskStatus[list[str]]) -> None:
            try:
                await serve(config, shutdown_trigger=stop.wait, app=app, task_status=task_status)
            finally:
                stopped.set()

        urls: list[str] = await nursery.start(run)
        stops.append((stop, stopped))
        return RunningServer(config, urls[0], app, stop, stopped)

    yield start

    for stop, _ in stops:
        stop.set()
    with trio.fail_after(SHUTDOWN_TIMEOUT_S):
        for _, stopped in stops:
            await stopped.wait()
    nursery.cancel_scope.cancel()  # the deadline task


@pytest.fixture
async def server(start_server: StartServer) -> RunningServer:
    """A running server with the test defaults (see `support.make_config`)."""
    return await start_server()
