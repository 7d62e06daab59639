"""The HTTP API against its own OpenAPI document, by schemathesis: generated requests, valid
and not, on a real server and a real socket.

Every answer must be documented: no 500, a documented status code and content type, and a
body that matches its schema. Requests that break the document must be refused (4xx).

Schemathesis is synchronous (it calls the server with `requests`), so the server runs in a
thread of its own with its own Trio loop, started once for the module and stopped at the end
through its trio token. The document is loaded from the server (`GET /api/v1/openapi.json`),
so what is tested is what is served. Examples are few per operation, to keep the module
under a minute; the API's rate limit is raised so that no answer is a 429.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

import pytest
import schemathesis
import trio
from hypothesis import HealthCheck, given, settings
from schemathesis import Case, GenerationMode
from schemathesis.specs.openapi.checks import positive_data_acceptance
from support import make_config

from handler.api.openapi import OPENAPI
from handler.app import create_app
from handler.server import serve

KEY: Final = "schemathesis-key-0123456789abcdef"
HEADERS: Final = {"Authorization": f"Bearer {KEY}"}
START_TIMEOUT_S: Final = 15.0
EXAMPLES: Final = 60


class _ServerThread:
    """A server on port 0 in a thread: `start()` returns its URL, `stop()` shuts it down."""

    def __init__(self, directory: Path) -> None:
        self._config = make_config(
            directory, api={"keys": [KEY], "rate_per_s": 100_000, "rate_burst": 100_000}
        )
        self._ready = threading.Event()
        self._urls: list[str] = []
        self._token: trio.lowlevel.TrioToken | None = None
        self._stop: trio.Event | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="api-server", daemon=True)

    def _run(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as error:  # reported by start() or stop()
            self._error = error
        finally:
            self._ready.set()

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._stop = trio.Event()
        app = create_app(self._config)
        async with trio.open_nursery() as nursery:
            self._urls = await nursery.start(
                lambda task_status: serve(
                    self._config, shutdown_trigger=self._stop.wait, app=app, task_status=task_status
                )
            )
            self._ready.set()

    def start(self) -> str:
        self._thread.start()
        if not self._ready.wait(START_TIMEOUT_S) or self._error is not None or not self._urls:
            raise RuntimeError("the server did not start") from self._error
        return self._urls[0]

    def stop(self) -> None:
        if self._token is not None and self._stop is not None:
            trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
        self._thread.join(START_TIMEOUT_S)
        assert not self._thread.is_alive(), "the server did not stop"
        if self._error is not None:
            raise self._error


@pytest.fixture(scope="module")
def api_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server = _ServerThread(tmp_path_factory.mktemp("schemathesis"))
    url = server.start()
    try:
        yield url
    finally:
        server.stop()


@pytest.fixture(scope="module")
def api_schema(api_url: str) -> Any:
    schema = schemathesis.openapi.from_url(
        f"{api_url}/api/v1/openapi.json", headers=HEADERS, timeout=10
    )
    # The document's server is relative ("/api/v1"); the base is this server's.
    schema.config.update(base_url=f"{api_url}/api/v1")
    return schema


# Rules between two fields of a request, which JSON Schema cannot state (the document says
# them in words): a request that breaks one is valid to the document, and refused with 400.
# Any other 400 to a request the document deems valid is a failure.
CROSS_FIELD_RULES: Final = {
    ("recipient_id", "cannot create a chat with yourself"),
    ("member_ids", "member_ids names the others: the creator is a member already"),
    ("recipient_id", "a group message has no recipient_id: it goes to every member"),
    ("recipient_id", "recipient_id is not the other participant of this chat"),
    # `before` must name a message of the chat in the path (a chat the run created exists).
    ("before", "before is not a message of this chat"),
}


# One test per operation and mode. Not `schemathesis.pytest.from_fixture(...).parametrize()`:
# its lazy loader reads `request.node._nodeid`, which pytest 9 no longer has; each operation's
# Hypothesis strategy (`APIOperation.as_strategy`) is schemathesis' public way around it.
OPERATIONS: Final = [(path, method) for path, item in OPENAPI["paths"].items() for method in item]


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
@pytest.mark.parametrize(("path", "method"), OPERATIONS)
def test_api_answers_as_documented(
    api_schema: Any, path: str, method: str, mode: GenerationMode
) -> None:
    operation = api_schema[path][method.upper()]

    @given(operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )
    def check(case: Case) -> None:
        if mode is GenerationMode.NEGATIVE:
            case.call_and_validate(headers=HEADERS, timeout=10)
            return
        response = case.call_and_validate(
            headers=HEADERS, timeout=10, excluded_checks=[positive_data_acceptance]
        )
        if response.status_code == 400:
            error = response.json()
            assert (error.get("field"), error["message"]) in CROSS_FIELD_RULES, error

    check()
