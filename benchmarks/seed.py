"""Large datasets for the backlog (e) and history (f) scenarios.

Seeding 10k-200k messages through WebSocket frames costs as long as the benchmark itself, so
the preferred path writes them through the handler's own store API (`handler.store`), which
keeps the schema and delivery rules exactly the server's. When the store cannot be imported
(or fails), the same dataset is sent as frames through a running server instead.

Shapes (`owner` is the user the scenario then binds as):

- `sender="peer"`: each of `chats` peers creates a chat with the owner and sends
  `messages_per_chat` messages; nothing is delivered to the owner yet (their backlog).
- `sender="owner"`: the owner creates the chats and sends every message; all of it counts as
  delivered to them, so binding sends no backlog and `fetch_chats` is measured alone.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any

import trio

from benchmarks.loadgen import make_content
from benchmarks.servers import handler_config


def copy_database(source: Path, target: Path) -> None:
    """Copy an SQLite database with its WAL files, so every run starts from the same state."""
    for suffix in ("", "-wal", "-shm"):
        src = source.with_name(source.name + suffix)
        if src.exists():
            shutil.copyfile(src, target.with_name(target.name + suffix))


async def _seed_store(
    db_path: Path, owner: str, chats: int, per_chat: int, sender: str, size: int
) -> None:
    from handler.config import parse_config
    from handler.store import open_store

    raw = handler_config(0, db_path, "x" * 32)
    config = parse_config(raw, base_dir=db_path.parent)
    store = open_store(config.storage)

    async def fill(index: int) -> None:
        peer = f"{owner}-peer{index}"
        creator, recipient = (owner, peer) if sender == "owner" else (peer, owner)
        chat, _ = await store.create_chat(creator, recipient)
        for _ in range(per_chat):
            await store.add_message(chat, creator, make_content(0.0, size), None)

    async with trio.open_nursery() as services:
        await store.open(services)  # its background writer lives in `services`
        try:
            limiter = trio.CapacityLimiter(256)

            async def limited(index: int) -> None:
                async with limiter:
                    await fill(index)

            async with trio.open_nursery() as nursery:
                for index in range(chats):
                    nursery.start_soon(limited, index)
        finally:
            await store.aclose()


def seed_with_store(
    db_path: Path, *, owner: str, chats: int, per_chat: int, sender: str, size: int = 100
) -> None:
    """Write the dataset through `handler.store` (raises ImportError if there is none)."""
    trio.run(_seed_store, db_path, owner, chats, per_chat, sender, size)


def seed(
    db_path: Path,
    *,
    owner: str,
    chats: int,
    per_chat: int,
    sender: str,
    size: int = 100,
    workdir: Path,
) -> dict[str, Any]:
    """Build the dataset in `db_path` by the fastest path available; says which it took."""
    import time

    started = time.monotonic()
    try:
        seed_with_store(
            db_path, owner=owner, chats=chats, per_chat=per_chat, sender=sender, size=size
        )
        method = "store"
    except Exception as error:  # any store failure: fall back to the wire, and say why
        print(f"  seeding through the store failed ({error!r}); sending frames", file=sys.stderr)
        for suffix in ("", "-wal", "-shm"):
            db_path.with_name(db_path.name + suffix).unlink(missing_ok=True)
        seed_with_frames(
            db_path,
            owner=owner,
            chats=chats,
            per_chat=per_chat,
            sender=sender,
            size=size,
            workdir=workdir,
        )
        method = "frames"
    return {"method": method, "seconds": time.monotonic() - started}


def seed_with_frames(
    db_path: Path,
    *,
    owner: str,
    chats: int,
    per_chat: int,
    sender: str,
    size: int,
    workdir: Path,
) -> None:
    """Send the dataset through a handler started on `db_path` for the purpose."""
    from benchmarks.runner import run_loadgen
    from benchmarks.servers import handler_server

    with handler_server(
        workdir, db_path=db_path, cpus=None, log_path=workdir / "seed.log", stop_grace_s=5.0
    ) as (
        server,
        secret,
    ):
        job = {
            "kind": "seed",
            "port": server.port,
            "secret": secret,
            "owner": owner,
            "chats": chats,
            "messages_per_chat": per_chat,
            "sender": sender,
            "content_bytes": size,
        }
        run_loadgen(job, server=server, cpus=None, log_path=workdir / "seed-loadgen.log")
