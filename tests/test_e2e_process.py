"""End to end against `python -m handler` processes: SIGTERM shutdown and SIGKILL durability."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import attrs
import pytest
import trio
from support import SECRET, Client, RunningServer, backlog_messages, make_config

pytestmark = pytest.mark.slow

STARTUP_TIMEOUT_S = 20.0
TEST_DEADLINE_S = 60.0
_RUNNING = re.compile(r"Running on (http://127\.0\.0\.1:\d+)")


@attrs.define
class HandlerProcess:
    process: trio.Process
    server: RunningServer  # used for its URLs and connect helpers only
    stderr: list[str]


def write_config(tmp_path: Path) -> Path:
    path = tmp_path / "config.json"
    path.write_text(
        json.dumps(
            {
                "handler_url": "127.0.0.1:0",
                "storage": {"path": "chat.db"},
                "auth": {"jwt_secret": SECRET},
                "limits": {"rate_per_s": 10_000, "rate_burst": 10_000},
            }
        )
    )
    return path


@asynccontextmanager
async def handler_process(config_path: Path) -> AsyncIterator[HandlerProcess]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHAT_")}
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "handler", "--config", str(config_path)],
        stderr=subprocess.PIPE,
        env=env,
        cwd=config_path.parent,
    )
    assert process.stderr is not None
    lines: list[str] = []
    url = trio.Event()
    found: list[str] = []

    async def drain() -> None:
        assert process.stderr is not None
        buffer = b""
        async for chunk in process.stderr:
            buffer += chunk
            *complete, buffer = buffer.split(b"\n")
            for raw in complete:
                line = raw.decode(errors="replace")
                lines.append(line)
                match = _RUNNING.search(line)
                if match and not url.is_set():
                    found.append(match.group(1))
                    url.set()

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(drain)
            with trio.fail_after(STARTUP_TIMEOUT_S):
                await url.wait()
            config = make_config(config_path.parent)  # only for the client helpers
            fake = RunningServer(config, found[0], None, trio.Event(), trio.Event())  # type: ignore[arg-type]
            yield HandlerProcess(process, fake, lines)
            nursery.cancel_scope.cancel()
    finally:
        if process.returncode is None:
            process.kill()
        with trio.move_on_after(5):
            await process.wait()


async def test_sigterm_closes_connections_with_1001_and_exits(tmp_path: Path) -> None:
    config_path = write_config(tmp_path)
    with trio.fail_after(TEST_DEADLINE_S):
        await _sigterm(config_path)


async def _sigterm(config_path: Path) -> None:
    async with handler_process(config_path) as handler:
        async with handler.server.connect("alice") as alice:
            handler.process.send_signal(signal.SIGTERM)
            assert await alice.wait_closed(timeout=10) == 1001
        with trio.fail_after(15):
            code = await handler.process.wait()
        assert code == 0, "\n".join(handler.stderr)


async def test_acknowledged_messages_survive_sigkill(tmp_path: Path) -> None:
    config_path = write_config(tmp_path)
    acked: list[str] = []
    with trio.fail_after(TEST_DEADLINE_S):
        await _ack_then_kill(config_path, acked)
        async with handler_process(config_path) as handler, handler.server.connect("bob") as bob:
            received = [m["message_id"] for m in backlog_messages(bob.backlog)]
    assert received[: len(acked)] == acked


async def _ack_then_kill(config_path: Path, acked: list[str]) -> None:
    async with handler_process(config_path) as handler:
        server = handler.server
        async with server.connect("alice") as alice:
            chat = await alice.create_chat("bob")

            async def stream(client: Client) -> None:
                for i in range(2000):
                    await client.send(
                        {
                            "type": "send_message",
                            "chat_id": chat["chat_id"],
                            "recipient_id": "bob",
                            "content": f"m{i}",
                        }
                    )

            async with trio.open_nursery() as nursery:
                nursery.start_soon(stream, alice)
                while len(acked) < 200:
                    frame = await alice.recv()
                    assert frame["type"] == "message"
                    acked.append(frame["message_id"])
                handler.process.kill()  # right after an acknowledgement, mid-stream
                nursery.cancel_scope.cancel()
