"""Large datasets for the backlog (e), history (f), chat list (h) and presence (j) scenarios.

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

The contact graph of (j) (`seed_contacts`) has no messages: `users` users on a ring, each
sharing a direct chat with its `contacts` nearest (`benchmarks.loadgen.ring_contacts`), so
every user has exactly that many contacts.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, Final

import trio

from benchmarks.loadgen import contact_user, make_content, ring_contacts
from benchmarks.servers import REPO, handler_config, server_env

SEED_TIMEOUT_S: Final = 900.0


def copy_database(source: Path, target: Path) -> None:
    """Copy an SQLite database with its WAL files, so every run starts from the same state."""
    for suffix in ("", "-wal", "-shm"):
        src = source.with_name(source.name + suffix)
        if src.exists():
            shutil.copyfile(src, target.with_name(target.name + suffix))


@contextlib.asynccontextmanager
async def _open_store(db_path: Path) -> AsyncIterator[Any]:
    """The handler's store on `db_path`, configured as the benchmark servers configure it."""
    from handler.config import parse_config
    from handler.store import open_store

    raw = handler_config(0, db_path, "x" * 32)
    config = parse_config(raw, base_dir=db_path.parent)
    store = open_store(config.storage)
    async with trio.open_nursery() as services:
        await store.open(services)  # its background writer lives in `services`
        try:
            yield store
        finally:
            await store.aclose()


async def _in_parallel(count: int, work: Callable[[int], Awaitable[None]]) -> None:
    """`work(0)` .. `work(count - 1)`, 256 at a time (the store's writer batches them)."""
    limiter = trio.CapacityLimiter(256)

    async def limited(index: int) -> None:
        async with limiter:
            await work(index)

    async with trio.open_nursery() as nursery:
        for index in range(count):
            nursery.start_soon(limited, index)


async def _seed_store(
    db_path: Path, owner: str, chats: int, per_chat: int, sender: str, size: int
) -> None:
    async with _open_store(db_path) as store:

        async def fill(index: int) -> None:
            peer = f"{owner}-peer{index}"
            creator, recipient = (owner, peer) if sender == "owner" else (peer, owner)
            chat, _ = await store.create_chat(creator, recipient)
            for _ in range(per_chat):
                await store.add_message(chat, creator, make_content(0.0, size), None)

        await _in_parallel(chats, fill)


async def _seed_contacts_store(db_path: Path, prefix: str, users: int, contacts: int) -> None:
    pairs = ring_contacts(users, contacts)
    async with _open_store(db_path) as store:

        async def open_chat(index: int) -> None:
            a, b = pairs[index]
            await store.create_chat(contact_user(prefix, a), contact_user(prefix, b))

        await _in_parallel(len(pairs), open_chat)


def seed_with_store(db_path: Path, *, root: Path = REPO, **shape: Any) -> None:
    """Write a dataset through the `handler.store` of the tree at `root`, in a child process;
    `shape` is a history (`owner`, `chats`, `per_chat`, `sender`, `size`) or a contact ring
    (`contacts_of`: `prefix`, `users`, `contacts`). Raises RuntimeError, quoting the child's
    last error line, when that fails."""
    job = {"db_path": str(db_path), "root": str(root), **shape}
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


def _by_store_or_frames(
    db_path: Path, store: Callable[[], None], frames: Callable[[], None]
) -> dict[str, Any]:
    """Seed by `store`, or by `frames` when that fails; says which it took, and how long."""
    started = time.monotonic()
    try:
        store()
        method = "store"
    except Exception as error:  # any store failure: fall back to the wire, and say why
        print(f"  seeding through the store failed ({error!r}); sending frames", file=sys.stderr)
        for suffix in ("", "-wal", "-shm"):
            db_path.with_name(db_path.name + suffix).unlink(missing_ok=True)
        frames()
        method = "frames"
    return {"method": method, "seconds": time.monotonic() - started}


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
    """Build the history in `db_path` for the server of the tree at `root`, by the fastest
    path available; says which it took."""
    history = {
        "owner": owner,
        "chats": chats,
        "per_chat": per_chat,
        "sender": sender,
        "size": size,
    }
    return _by_store_or_frames(
        db_path,
        lambda: seed_with_store(db_path, root=root, **history),
        lambda: seed_with_frames(
            db_path,
            {
                "kind": "seed",
                "owner": owner,
                "chats": chats,
                "messages_per_chat": per_chat,
                "sender": sender,
                "content_bytes": size,
            },
            workdir=workdir,
            root=root,
        ),
    )


def seed_contacts(
    db_path: Path, *, prefix: str, users: int, contacts: int, workdir: Path, root: Path = REPO
) -> dict[str, Any]:
    """Build the contact ring of (j) in `db_path` for the server of the tree at `root`, by the
    fastest path available; says which it took."""
    ring = {"prefix": prefix, "users": users, "contacts": contacts}
    return _by_store_or_frames(
        db_path,
        lambda: seed_with_store(db_path, root=root, contacts_of=ring),
        lambda: seed_with_frames(
            db_path,
            {"kind": "seed_contacts", "user_prefix": prefix, "users": users, "contacts": contacts},
            workdir=workdir,
            root=root,
        ),
    )


def seed_with_frames(
    db_path: Path, job: dict[str, Any], *, workdir: Path, root: Path = REPO
) -> None:
    """Run the generator's seeding `job` against a handler of the tree at `root`, started on
    `db_path` for the purpose."""
    from benchmarks.runner import run_loadgen
    from benchmarks.servers import handler_server

    with handler_server(
        workdir,
        db_path=db_path,
        cpus=None,
        log_path=workdir / "seed.log",
        stop_grace_s=5.0,
        root=root,
    ) as (server, secret):
        job = {**job, "port": server.port, "secret": secret}
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
    db_path = Path(job["db_path"])
    if "contacts_of" in job:
        ring = job["contacts_of"]
        trio.run(_seed_contacts_store, db_path, ring["prefix"], ring["users"], ring["contacts"])
        return
    trio.run(
        _seed_store,
        db_path,
        job["owner"],
        job["chats"],
        job["per_chat"],
        job["sender"],
        job["size"],
    )


if __name__ == "__main__":
    main()
