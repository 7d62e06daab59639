"""Fixtures: real servers on port 0, started with `nursery.start` and stopped gracefully.

`start_server(**overrides)` starts a server with `support.make_config(tmp_path, **overrides)`;
`server` is one with the test defaults. Starting a server also arms a deadline for the whole
test (`TEST_DEADLINE_S`): a hung end-to-end test fails with `TooSlowError` instead of hanging.

Skips raised inside Trio keep their reason: see `pytest_runtest_makereport` below.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Awaitable, Callable, Generator
from pathlib import Path
from typing import Any, Final

import pytest
import trio
from support import RunningServer, check_received_frames, make_config

from handler.app import create_app
from handler.server import serve

TEST_DEADLINE_S: Final = 30.0
SHUTDOWN_TIMEOUT_S: Final = 15.0

StartServer = Callable[..., Awaitable[RunningServer]]


@pytest.fixture(autouse=True)
def every_received_frame_matches_the_asyncapi_document() -> Generator[None, None, None]:
    """Every frame a test client received during the test validates against the schema of its
    type in `GET /asyncapi.json` (`support.check_received_frames`)."""
    yield
    check_received_frames()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Give back the reason of a skip raised inside Trio (an async fixture or an async test).

    pytest-trio runs a test and its async fixtures in one nursery, so `pytest.skip(reason)` there
    (e.g. `scale_support.redis_url()` without `CHAT_TEST_REDIS_URL`) leaves `trio.run` wrapped
    in an exception group. pytest-trio 0.8 unwraps a group whose only leaf is a skip by calling
    a bare `pytest.skip()`, which drops the reason: the report says `Skipped` at
    `_pytest/python.py`. That bare skip is raised while handling the group, so the original is
    in its `__context__`: report its reason, at the test's own line (as pytest does for a skip
    from a sync fixture). Every other report passes through unchanged.
    """
    report = yield
    if call.excinfo is not None and report.skipped:
        original = _skip_inside_group(call.excinfo.value)
        if original is not None:
            # `item.location` was computed at collection, before pytest-trio replaced the
            # test function by its runner (whose file `item.reportinfo()` now names).
            line = item.location[1]
            report.longrepr = (
                str(item.path),
                0 if line is None else line + 1,
                f"Skipped: {original}",
            )
    return report


def _skip_inside_group(skipped: BaseException) -> BaseException | None:
    """The one skip with a reason inside the group a reasonless `skipped` replaced, or None."""
    if str(skipped) or not isinstance(skipped.__context__, BaseExceptionGroup):
        return None
    leaves: list[BaseException] = []
    groups: list[BaseExceptionGroup[BaseException]] = [skipped.__context__]
    while groups:
        for exception in groups.pop().exceptions:
            if isinstance(exception, BaseExceptionGroup):
                groups.append(exception)
            else:
                leaves.append(exception)
    if len(leaves) != 1 or not isinstance(leaves[0], pytest.skip.Exception) or not str(leaves[0]):
        return None
    return leaves[0]


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
