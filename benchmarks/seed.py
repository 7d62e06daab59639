"""Large datasets for the backlog (e) and history (f) scenarios.

Seeding 10k-200k messages through WebSocket frames costs as long as the benchmark itself, so
the preferred path writes them through the handler's own store API (`handler.store`), which
keeps the schema and delivery rules exactly the server's. That happens in a child process
(`python -m benchmarks.seed`) with the tree under test first on its path: in a comparison the
baseline's database must be written by the baseline's store, and the orchestrator itself
never imports `handler`. When the store cannot be imported (or fails), the same dataset is
sent as frames through a running server of that tree instead.

Shapes (`owner` is the user the scenario then binds as):

- `sender="peer"`: each of `chats` peers creates a chat with the owner and sends
  `messages_per_chat` messages; nothing is delivered to the owner yet (their backlog).
- `sender="owner"`: the owner creates the chats and sends every message; all of it counts as
  delivered to them, so binding sends no backlog and `fetch_chats` is measured alone.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Final

import trio

from benchmarks.loadgen import make_content
from benchmarks.servers import REPO, handler_config, server_env

SEED_TIMEOUT_S: Final = 900.0


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
    db_path: Path,
    *,
    owner: str,
    chats: int,
    per_chat: int,
    sender: str,
    size: int = 100,
    root: Path = REPO,
) -> None:
    """Write the dataset through the `handler.store` of the tree at `root`, in a child process;
    raises RuntimeError, quoting its last error line, when that fails."""
    job = {
        "db_path": str(db_path),
        "owner": owner,
        "chats": chats,
        "per_chat": per_chat,
        "sender": sender,
        "size": size,
        "root": str(root),
    }
    # The child's own modules (`benchmarks`) come from this tree; `main` then puts `root`
    # first for `handler`.
    child = subprocess.run(
        [sys.executable, "-m", "benchmarks.seed", json.dumps(job)],
        cwd=REPO,
        env=server_env(REPO),
        capture_output=True,
        text=True,
        timeout=SEED_TIMEOUT_S,
        check=False,
    )
    if child.returncode != 0:
        lines = child.stderr.strip().splitlines() or [f"exit status {child.returncode}"]
        raise RuntimeError(f"seeding through the store of {root}: {lines[-1]}")


def seed(
    db_path: Path,
    *,
    owner: str,
    chats: int,
    per_chat: int,
    sender: str,
    size: int = 100,
    workdir: Path,
    root: Path = REPO,
) -> dict[str, Any]:
    """Build the dataset in `db_path` for the server of the tree at `root`, by the fastest
    path available; says which it took."""
    started = time.monotonic()
    try:
        seed_with_store(
            db_path,
            owner=owner,
            chats=chats,
            per_chat=per_chat,
            sender=sender,
            size=size,
            root=root,
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
            root=root,
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
    root: Path = REPO,
) -> None:
    """Send the dataset through a handler of the tree at `root`, started on `db_path` for the
    purpose."""
    from benchmarks.runner import run_loadgen
    from benchmarks.servers import handler_server

    with handler_server(
        workdir,
        db_path=db_path,
        cpus=None,
        log_path=workdir / "seed.log",
        stop_grace_s=5.0,
        root=root,
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


def main() -> None:
    """`python -m benchmarks.seed JOB`: seed through the store of the tree that JOB names."""
    job = json.loads(sys.argv[1])
    root = Path(job["root"]).resolve()
    sys.path.insert(0, str(root))
    import handler

    where = Path(next(iter(handler.__path__))).resolve()
    if not where.is_relative_to(root):
        raise SystemExit(f"`handler` was imported from {where}, not from {root}")
    trio.run(
        _seed_store,
        Path(job["db_path"]),
        job["owner"],
        job["chats"],
        job["per_chat"],
        job["sender"],
        job["size"],
    )


if __name__ == "__main__":
    main()
