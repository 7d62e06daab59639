"""End to end: `/healthz` says 503 while the store cannot write (a full disk), and recovers.

The SQLite file lives on a 2 MiB tmpfs that the test fills; mounting one needs root (CI runs
as root), otherwise the test is skipped with that reason.
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import StartServer
from support import http_request


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    mount_point = tmp_path / "tiny"
    mount_point.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        pytest.skip(f"needs root to mount a small tmpfs (mount said: {result.stderr.strip()})")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def _fill(directory: Path) -> Path:
    """Take every free byte of the filesystem."""
    filler = directory / "filler"
    with contextlib.suppress(OSError), filler.open("wb", buffering=0) as handle:
        while True:
            handle.write(b"\0" * 4096)
    return filler


async def test_healthz_is_503_while_writes_fail_and_recovers(
    start_server: StartServer, tiny_disk: Path
) -> None:
    server = await start_server(storage={"path": str(tiny_disk / "chat.db")})
    async with server.connect("alice") as alice:
        chat = await alice.create_chat("bob")
        kept = await alice.send_message(chat["chat_id"], "bob", "before the disk filled up")
        assert (await http_request(server, "GET", "/healthz")).status == 200

        filler = _fill(tiny_disk)
        codes = []
        for index in range(50):
            await alice.send(
                {
                    "type": "send_message",
                    "chat_id": chat["chat_id"],
                    "recipient_id": "bob",
                    "content": f"{index} " + "x" * 4000,
                }
            )
            codes.append((await alice.recv()).get("code"))
            if codes[-1] == "internal":
                break
        assert codes[-1] == "internal"
        health = await http_request(server, "GET", "/healthz")
        assert health.status == 503
        assert "writes are failing" in health.json()["store"]
        assert (await http_request(server, "GET", "/healthz")).status == 503  # still failing

        filler.unlink()
        assert (await http_request(server, "GET", "/healthz")).status == 200
        again = await alice.send_message(chat["chat_id"], "bob", "after")
        await alice.send({"type": "fetch_messages", "chat_id": chat["chat_id"]})
        page = await alice.recv_until("all_messages")
        contents = [m["content"] for m in page["data"]]
        assert contents[0] == kept["content"]
        assert contents[-1] == again["content"]
