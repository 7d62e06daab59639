"""Several handler processes for real: `python -m handler` twice on one PostgreSQL and Redis,
Hypercorn's `--workers 2` on them, and `--workers 2` refused on the local bus.

The in-process cluster of `test_e2e_cluster.py` runs the whole protocol suite on two nodes;
these check that the same holds between operating-system processes started the documented
ways (README, "Deploying several nodes").
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Final

import attrs
import coredis
import pytest
import trio
from scale_support import database_url, fresh_schema, redis_url, unique_prefix
from support import SECRET, Client, RunningServer, backlog_messages, http_request, make_config

pytestmark = pytest.mark.slow

STARTUP_TIMEOUT_S: Final = 20.0
_RUNNING = re.compile(r"Running on (http://127\.0\.0\.1:\d+)")
HYPERCORN: Final = str(Path(sys.executable).with_name("hypercorn"))


@attrs.define
class Process:
    process: trio.Process
    server: RunningServer  # for its URLs and client helpers only
    output: list[str]


def _environment(**extra: str) -> dict[str, str]:
    """The test's environment without the handler's own overrides (CHAT_DATABASE_URL would
    replace the DSN of the config file, for instance)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHAT_")}
    env.update(extra)
    return env


@asynccontextmanager
async def running(
    command: Sequence[str], env: dict[str, str], cwd: Path, *, expect_ready: bool = True
) -> AsyncIterator[Process]:
    """Run `command`; once it logs "Running on", yield it. Killed on the way out."""
    process = await trio.lowlevel.open_process(
        list(command), stderr=subprocess.STDOUT, stdout=subprocess.PIPE, env=env, cwd=cwd
    )
    assert process.stdout is not None
    lines: list[str] = []
    ready = trio.Event()
    found: list[str] = []

    async def drain() -> None:
        assert process.stdout is not None
        buffer = b""
        async for chunk in process.stdout:
            buffer += chunk
            *complete, buffer = buffer.split(b"\n")
            for raw in complete:
                line = raw.decode(errors="replace")
                lines.append(line)
                match = _RUNNING.search(line)
                if match and not ready.is_set():
                    found.append(match.group(1))
                    ready.set()

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(drain)
            if expect_ready:
                with trio.fail_after(STARTUP_TIMEOUT_S):
                    await ready.wait()
            config = make_config(cwd)  # only for the client helpers (same secret)
            url = found[0] if found else "http://127.0.0.1:0"
            fake = RunningServer(config, url, None, trio.Event(), trio.Event())  # type: ignore[arg-type]
            yield Process(process, fake, lines)
            nursery.cancel_scope.cancel()
    finally:
        if process.returncode is None:
            process.kill()
        with trio.move_on_after(5):
            await process.wait()


def _write_config(directory: Path, **sections: Any) -> Path:
    path = directory / "config.json"
    raw = {
        "handler_url": "127.0.0.1:0",
        "auth": {"jwt_secret": SECRET},
        "limits": {"rate_per_s": 10_000, "rate_burst": 10_000},
        **sections,
    }
    path.write_text(json.dumps(raw))
    return path


@pytest.fixture
def scale_config(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A config for PostgreSQL (a fresh schema) and Redis (a fresh prefix), and the prefix."""
    database, redis = database_url(), redis_url()
    prefix = unique_prefix()
    with fresh_schema(database) as dsn:
        yield (
            _write_config(
                tmp_path,
                storage={"backend": "postgres", "dsn": dsn},
                bus={"backend": "redis", "url": redis, "prefix": prefix},
            ),
            prefix,
        )


def _message_ids(frames: list[dict[str, Any]]) -> list[str]:
    return [f["message_id"] for f in frames if f["type"] == "message"]


async def _sigterm_and_wait(*processes: Process) -> None:
    for handler in processes:
        handler.process.send_signal(signal.SIGTERM)
    with trio.fail_after(15):
        for handler in processes:
            code = await handler.process.wait()
            assert code == 0, "\n".join(handler.output)


@pytest.mark.scale
async def test_two_handler_processes_serve_the_same_users(
    scale_config: tuple[Path, str], tmp_path: Path
) -> None:
    config_path, _ = scale_config
    command = [sys.executable, "-m", "handler", "--config", str(config_path)]
    env = _environment()
    async with running(command, env, tmp_path) as one, running(command, env, tmp_path) as two:
        assert one.server.port != two.server.port
        async with (
            one.server.connect("alice") as alice,
            two.server.connect("bob") as bob,
            two.server.connect("alice") as alice_phone,
        ):
            chat = await alice.create_chat("bob")
            for other in (bob, alice_phone):
                assert (await other.recv())["data"] == [chat]
            # Both directions, every copy live, everyone in the same order.
            acks = []
            for index in range(10):
                sender, recipient = (alice, "bob") if index % 2 == 0 else (bob, "alice")
                acks.append(await sender.send_message(chat["chat_id"], recipient, f"m{index}"))
                for client in (alice, bob, alice_phone):
                    if client is not sender:
                        assert (await client.recv())["message_id"] == acks[-1]["message_id"]
            await bob.ws.aclose()  # bob goes offline; what he misses waits for him
            offline = [await alice.send_message(chat["chat_id"], "bob", f"o{i}") for i in range(3)]
            for ack in offline:
                assert (await alice_phone.recv())["message_id"] == ack["message_id"]
        async with one.server.connect("bob") as bob:  # back, on the other process
            got = [m["message_id"] for m in backlog_messages(bob.backlog)]
            assert got == [ack["message_id"] for ack in offline]
        await _sigterm_and_wait(one, two)


async def _connections_per_worker(server: RunningServer) -> set[float]:
    """`chat_connections` of both workers: /metrics requests land on either one, and the two
    counts differ as long as the total is odd."""
    counts: set[float] = set()
    with trio.fail_after(10):
        while len(counts) < 2:
            response = await http_request(server, "GET", "/metrics")
            match = re.search(rb"^chat_connections (\S+)$", response.body, re.MULTILINE)
            assert match is not None
            counts.add(float(match.group(1)))
    return counts


@pytest.mark.scale
async def test_hypercorn_workers_share_the_users(
    scale_config: tuple[Path, str], tmp_path: Path
) -> None:
    """`hypercorn -k trio --workers 2`: the kernel spreads connections over the workers (no
    affinity), and every user reaches every other whichever worker each landed on."""
    config_path, prefix = scale_config
    command = [
        HYPERCORN, "-k", "trio", "--workers", "2", "--bind", "127.0.0.1:0",
        "handler.app:create_app()",
    ]  # fmt: skip
    env = _environment(CHAT_CONFIG=str(config_path))
    users = [f"user{index}" for index in range(8)]
    async with running(command, env, tmp_path) as hypercorn:
        server = hypercorn.server
        redis: coredis.Redis[bytes] = coredis.Redis.from_url(redis_url())
        async with redis:
            with trio.fail_after(STARTUP_TIMEOUT_S):  # both workers' buses are up
                while len(await redis.pubsub_channels(f"{prefix}n:*")) < 2:  # noqa: ASYNC110
                    await trio.sleep(0.05)
        clients: dict[str, Client] = {}
        for _ in range(20):  # connections opened at once spread; sequential ones may not
            clients.clear()
            async with trio.open_nursery() as nursery:

                async def connect(user: str, task_status: trio.TaskStatus[None]) -> None:
                    async with server.connect(user) as client:
                        clients[user] = client
                        task_status.started()
                        await trio.sleep_forever()

                async with trio.open_nursery() as burst:
                    for user in ["sender", *users]:
                        burst.start_soon(nursery.start, connect, user)
                counts = await _connections_per_worker(server)
                if 0 not in counts:  # both workers serve some of these 9 connections
                    sender = clients["sender"]
                    for user in users:
                        chat = await sender.create_chat(user)
                        assert (await clients[user].recv())["data"] == [chat]
                        ack = await sender.send_message(chat["chat_id"], user, f"hi {user}")
                        assert (await clients[user].recv())["message_id"] == ack["message_id"]
                nursery.cancel_scope.cancel()
            if 0 not in counts:
                break
        else:
            raise AssertionError("the connections never landed on both workers")
        hypercorn.process.send_signal(signal.SIGTERM)
        with trio.fail_after(15):
            await hypercorn.process.wait()


async def test_hypercorn_workers_refuse_the_local_bus(tmp_path: Path) -> None:
    """Several workers on the in-process bus would split users between processes without
    telling anyone: each worker refuses at startup, saying what to use instead, and the
    server stops instead of serving.

    (Hypercorn 0.18 reports exit status 0 when every worker failed before its first check,
    so the exit status is not asserted; the server not being up is.)"""
    config_path = _write_config(tmp_path, storage={"path": "chat.db"})
    command = [
        HYPERCORN, "-k", "trio", "--workers", "2", "--bind", "127.0.0.1:0",
        "handler.app:create_app()",
    ]  # fmt: skip
    env = _environment(CHAT_CONFIG=str(config_path))
    async with running(command, env, tmp_path, expect_ready=False) as hypercorn:
        with trio.fail_after(STARTUP_TIMEOUT_S):
            await hypercorn.process.wait()
        await trio.sleep(0.1)  # the rest of the output
        output = "\n".join(hypercorn.output)
    assert 'bus.backend: "local" cannot serve 2 workers' in output
    assert 'use storage.backend "postgres" with bus.backend "redis"' in output


@pytest.mark.scale
async def test_the_users_of_a_killed_node_are_reported_offline(
    scale_config: tuple[Path, str], tmp_path: Path
) -> None:
    """kill -9 of one node: its users are reported offline by the other within 30 s, and
    their last_seen is kept (PROTOCOL.md, "Presence")."""
    config_path, _ = scale_config
    raw = json.loads(config_path.read_text())
    raw["limits"]["presence_grace_s"] = 1
    config_path.write_text(json.dumps(raw))
    command = [sys.executable, "-m", "handler", "--config", str(config_path)]
    env = _environment()
    async with running(command, env, tmp_path) as one, running(command, env, tmp_path) as two:
        async with one.server.connect("alice") as alice:
            alice.set_aside = frozenset({"receipt"})
            async with two.server.connect("bob") as bob:
                await bob.create_chat("alice")
                await alice.recv_until("new_chats")
                await _fetch_until(alice, "bob", online=True)
                two.process.kill()  # SIGKILL: no goodbye, no close frames
                killed = trio.current_time()
                with trio.fail_after(30):
                    entry = await _next_presence_of(alice, "bob")
                took = trio.current_time() - killed
                assert entry["online"] is False, entry
                assert entry["last_seen"] is not None, entry
                print(f"killed node's user reported offline after {took:.1f} s")
            await trio.sleep(1)  # the live node writes the last_seen it announced
        async with one.server.connect("alice") as alice:
            [stored] = await _fetch_presence(alice, ["bob"])
            assert stored == {"user_id": "bob", "online": False, "last_seen": entry["last_seen"]}
        await _sigterm_and_wait(one)


async def _fetch_presence(client: Client, user_ids: list[str]) -> list[dict[str, Any]]:
    await client.send({"type": "fetch_presence", "user_ids": user_ids, "request_id": "p"})
    reply = await client.recv_aside(lambda f: f.get("request_id") == "p")
    assert reply["type"] == "presence", reply
    return list(reply["data"])


async def _fetch_until(client: Client, user_id: str, *, online: bool) -> None:
    with trio.fail_after(10):
        while True:
            [entry] = await _fetch_presence(client, [user_id])
            if entry["online"] is online:
                return
            await trio.sleep(0.05)


async def _next_presence_of(client: Client, user_id: str) -> dict[str, Any]:
    while True:
        frame = await client.recv_until("presence", timeout=40)
        [entry] = frame["data"]
        if entry["user_id"] == user_id:
            return dict(entry)
