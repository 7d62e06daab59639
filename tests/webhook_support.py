"""A real HTTP receiver for the webhook tests: raw Trio and h11 on 127.0.0.1, port 0.

It records every request it answers and can be told to be down (not listening: connections
are refused), to answer 500, or to hang (read the request, never answer).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final, Literal

import attrs
import h11
import orjson
import trio


async def until(predicate: Callable[[], bool], step_s: float = 0.01) -> None:
    """Poll `predicate` (the caller bounds the wait with `fail_after`)."""
    while True:
        if predicate():
            return
        await trio.sleep(step_s)


Mode = Literal["ok", "error", "hang"]
_MAX_REQUEST: Final = 1 << 20


@attrs.frozen
class Received:
    headers: dict[str, str]
    body: bytes

    @property
    def event(self) -> dict[str, object]:
        event: dict[str, object] = orjson.loads(self.body)
        return event


@attrs.define
class Receiver:
    mode: Mode = "ok"
    received: list[Received] = attrs.field(factory=list)
    attempts: int = 0  # requests read, whatever they were answered
    port: int = 0
    _scope: trio.CancelScope | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def start(self, nursery: trio.Nursery) -> None:
        """Listen (on the same port as before, if it listened before)."""
        listeners = await trio.open_tcp_listeners(self.port, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        scope = trio.CancelScope()
        self._scope = scope

        async def serve() -> None:
            with scope:
                await trio.serve_listeners(self._handle, listeners)

        nursery.start_soon(serve)

    def stop(self) -> None:
        """Go down: stop listening and drop every open connection."""
        if self._scope is not None:
            self._scope.cancel()
            self._scope = None

    def event_ids(self) -> list[str]:
        return [str(request.event["id"]) for request in self.received]

    async def _handle(self, stream: trio.SocketStream) -> None:
        connection = h11.Connection(h11.SERVER, max_incomplete_event_size=_MAX_REQUEST)
        async with stream:
            while True:
                request: h11.Request | None = None
                body = b""
                while True:
                    event = connection.next_event()
                    if event is h11.NEED_DATA:
                        data = await stream.receive_some(65536)
                        if not data:
                            return
                        connection.receive_data(data)
                    elif isinstance(event, h11.Request):
                        request = event
                    elif isinstance(event, h11.Data):
                        body += bytes(event.data)
                    elif isinstance(event, h11.EndOfMessage):
                        break
                    else:
                        return
                assert request is not None
                self.attempts += 1
                if self.mode == "hang":
                    await trio.sleep_forever()
                status = 200 if self.mode == "ok" else 500
                if status == 200:
                    headers = {k.decode().lower(): v.decode() for k, v in request.headers}
                    self.received.append(Received(headers, body))
                await stream.send_all(
                    connection.send(
                        h11.Response(status_code=status, headers=[("Content-Length", "0")])
                    )
                    + connection.send(h11.EndOfMessage())
                )
                if connection.our_state is h11.MUST_CLOSE:
                    return
                connection.start_next_cycle()
