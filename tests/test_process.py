"""The server as a real process: kill -9 under load loses no acknowledged message; SIGTERM
closes clients with 1001 and exits 0; the local bus refuses a second process on one database."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, open_websocket_url

SECRET = "process-test-secret-0123456789abcdef"
pytestmark = pytest.mark.slow


class ServerProcess:
    """`python -m handler` in a subprocess; the bound port is read from its log."""

    def __init__(self, config_path: Path) -> None:
        self.config_path = config_path
        self.process: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.log: IO[bytes] | None = None

    def start(self) -> None:
        log_path = self.config_path.with_suffix(".log")
        self.log = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        offset = self.log.tell()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "handler", "--config", str(self.config_path)],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self.port = _wait_for_port(log_path, offset, self.process)

    def url(self, user: str | None = None) -> str:
        query = "" if user is None else f"?token={token_for(user)}"
        return f"ws://127.0.0.1:{self.port}/ws{query}"

    def stop(self, sig: int = signal.SIGKILL) -> int:
        assert self.process is not None
        self.process.send_signal(sig)
        code = self.process.wait(timeout=30)
        if self.log is not None:
            self.log.close()
        return code


def _wait_for_port(log_path: Path, offset: int, process: subprocess.Popen[bytes]) -> int:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        text = log_path.read_bytes()[offset:].decode(errors="replace")
        matches = re.findall(r"Running on http://127\.0\.0\.1:(\d+)", text)
        if matches:
            return int(matches[-1])
        if process.poll() is not None:
            raise RuntimeError(f"server exited early:\n{text}")
        time.sleep(0.05)
    raise TimeoutError("server did not start")


def token_for(user: str) -> str:
    import jwt

    return jwt.encode({"sub": user}, SECRET, algorithm="HS256")


@pytest.fixture
def config_path(tmp_path: Path) -> Path:
    path = tmp_path / "config.json"
    path.write_text(
        json.dumps(
            {
                "handler_url": "127.0.0.1:0",
                "storage": {"path": "chat.db"},
                "auth": {"jwt_secret": SECRET},
                "limits": {"rate_per_s": 100000, "rate_burst": 100000},
            }
        )
    )
    return path


@pytest.fixture
def server(config_path: Path) -> Iterator[ServerProcess]:
    process = ServerProcess(config_path)
    process.start()
    yield process
    if process.process is not None and process.process.poll() is None:
        process.stop()


async def _recv(ws: WebSocketConnection) -> dict[str, Any]:
    return json.loads(await ws.get_message())  # type: ignore[no-any-return]


async def _close_code(ws: WebSocketConnection) -> int | None:
    """Read until the server closes; its close code."""
    try:
        while True:
            await ws.get_message()
    except ConnectionClosed as closed:
        return closed.reason.code


async def _create_chat(ws: WebSocketConnection, recipient: str) -> str:
    assert (await _recv(ws))["type"] == "authenticated"
    await ws.send_message(json.dumps({"type": "create_chat", "recipient_id": recipient}))
    reply = await _recv(ws)
    return str(reply["data"][0]["chat_id"])


async def test_kill_9_under_load_loses_no_acknowledged_message(server: ServerProcess) -> None:
    acked: dict[str, str] = {}  # content -> message_id, only after the server's ack
    enough = trio.Event()

    async def sender(index: int, task_status: trio.TaskStatus[None]) -> None:
        user = f"sender{index}"
        try:
            async with open_websocket_url(server.url(user)) as ws:
                chat = await _create_chat(ws, "receiver")
                task_status.started()
                for n in range(100_000):
                    content = f"{user}-{n}"
                    await ws.send_message(
                        json.dumps(
                            {
                                "type": "send_message",
                                "chat_id": chat,
                                "recipient_id": "receiver",
                                "content": content,
                            }
                        )
                    )
                    reply = await _recv(ws)
                    acked[reply["content"]] = reply["message_id"]
                    if len(acked) >= 400:
                        enough.set()
        except (ConnectionClosed, OSError, trio.BrokenResourceError):
            return

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for index in range(4):
                await nursery.start(sender, index)
            await enough.wait()
            server.stop(signal.SIGKILL)
        assert len(acked) >= 400

        server.start()
        received: dict[str, str] = {}
        async with open_websocket_url(server.url("receiver")) as ws:
            assert (await _recv(ws))["type"] == "authenticated"
            await ws.send_message(json.dumps({"type": "ping"}))
            while True:
                frame = await _recv(ws)
                if frame["type"] == "pong":
                    break
                if frame["type"] == "new_messages":
                    received.update({m["content"]: m["message_id"] for m in frame["data"]})
    missing = [content for content in acked if content not in received]
    assert not missing, f"{len(missing)} acknowledged messages lost, e.g. {missing[:3]}"
    assert all(received[content] == message_id for content, message_id in acked.items())


async def test_kill_9_right_after_acknowledged_edits_keeps_them(server: ServerProcess) -> None:
    """An edit or delete is acknowledged (`message_updated` with its request id) only after
    commit: what was acknowledged before a kill -9 is there after the restart."""
    last_acked = ""
    deleted_id = ""
    with trio.fail_after(60):
        async with open_websocket_url(server.url("alice")) as ws:
            chat = await _create_chat(ws, "bob")
            ids = []
            for content in ("edited", "deleted"):
                await ws.send_message(
                    json.dumps(
                        {
                            "type": "send_message",
                            "chat_id": chat,
                            "recipient_id": "bob",
                            "content": content,
                        }
                    )
                )
                ids.append((await _recv(ws))["message_id"])
            edited_id, deleted_id = ids
            await ws.send_message(
                json.dumps(
                    {"type": "delete_message", "chat_id": chat, "message_id": deleted_id}
                    | {"request_id": "d"}
                )
            )
            assert (await _recv(ws))["request_id"] == "d"
            for n in range(200):
                await ws.send_message(
                    json.dumps(
                        {
                            "type": "edit_message",
                            "chat_id": chat,
                            "message_id": edited_id,
                            "content": f"v{n}",
                            "request_id": n,
                        }
                    )
                )
                reply = await _recv(ws)
                assert (reply["type"], reply["request_id"]) == ("message_updated", n), reply
                last_acked = reply["content"]
            server.stop(signal.SIGKILL)

        server.start()
        async with open_websocket_url(server.url("alice")) as ws:
            assert (await _recv(ws))["type"] == "authenticated"
            await ws.send_message(json.dumps({"type": "fetch_messages", "chat_id": chat}))
            # (Delivery marks younger than the kill may be lost: alice's own edit can come
            # again in an `updated_messages` frame first, which is allowed.)
            page = await _recv(ws)
            while page["type"] != "all_messages":
                page = await _recv(ws)
    by_id = {m["message_id"]: m for m in page["data"]}
    assert by_id[edited_id]["content"] == last_acked == "v199"
    assert "edited_at" in by_id[edited_id]
    assert (by_id[deleted_id]["content"], by_id[deleted_id]["deleted"]) == ("", True)


async def test_sigterm_closes_clients_with_1001_and_exits_0(server: ServerProcess) -> None:
    with trio.fail_after(20):
        async with (
            open_websocket_url(server.url("alice")) as alice,
            open_websocket_url(server.url("bob")) as bob,
        ):
            chat = await _create_chat(alice, "bob")
            await alice.send_message(
                json.dumps(
                    {
                        "type": "send_message",
                        "chat_id": chat,
                        "recipient_id": "bob",
                        "content": "before shutdown",
                    }
                )
            )
            acked = await _recv(alice)
            assert acked["type"] == "message"
            assert server.process is not None
            os.kill(server.process.pid, signal.SIGTERM)
            assert [await _close_code(ws) for ws in (alice, bob)] == [1001, 1001]
        started = trio.current_time()
        assert await trio.to_thread.run_sync(server.process.wait) == 0
        assert trio.current_time() - started < 3, "shutdown should not wait for a grace period"
        server.start()
        async with open_websocket_url(server.url("bob")) as bob:
            assert (await _recv(bob))["type"] == "authenticated"
            await bob.send_message(json.dumps({"type": "fetch_chats"}))
            assert (await _recv(bob))["type"] == "all_chats"
            history = await _recv(bob)
        assert [m["content"] for m in history["data"]] == ["before shutdown"]


def test_second_process_on_the_same_database_is_refused(
    server: ServerProcess, config_path: Path
) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "handler", "--config", str(config_path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode != 0
    assert "bus.backend" in result.stdout + result.stderr
