"""Starting and stopping the server as a real process: every failed start is one line and a
non-zero exit, never a traceback or a `Running on` line; a start waits briefly for what may
still be shutting down; shutdown is prompt; the startup line says what runs where; dev tokens
survive a restart; an installed (non-editable) package serves the browser client.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import stat
import sys
import tomllib
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any, Final

import attrs
import h11
import pytest
import trio
from trio_websocket import open_websocket_url

from handler.app import STARTUP_WAIT_S

pytestmark = pytest.mark.slow

REPO: Final = Path(__file__).resolve().parent.parent
HYPERCORN: Final = str(Path(sys.executable).with_name("hypercorn"))
SECRET: Final = "startup-test-secret-0123456789abcdef0123"
READY_TIMEOUT_S: Final = 20.0
EXIT_TIMEOUT_S: Final = 30.0
PROMPT_SHUTDOWN_S: Final = 3.0
_RUNNING: Final = re.compile(r"Running on http://[\d.]+:(\d+)")


def _environment(**extra: str) -> dict[str, str]:
    """This environment without the handler's overrides (CHAT_DATABASE_URL would replace the
    config's DSN)."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("CHAT_")}
    env.update(extra)
    return env


def write_config(directory: Path, name: str = "config.json", **sections: Any) -> Path:
    raw: dict[str, Any] = {
        "handler_url": "127.0.0.1:0",
        "storage": {"path": "chat.db"},
        "auth": {"jwt_secret": SECRET},
    }
    raw.update(sections)
    path = directory / name
    path.write_text(json.dumps(raw))
    return path


def token_for(user: str, secret: str = SECRET) -> str:
    import jwt

    return jwt.encode({"sub": user}, secret, algorithm="HS256")


@contextmanager
def closed_port() -> Iterator[int]:
    """A port that refuses connections: bound (so nobody else takes it) but not listening."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


@attrs.frozen
class Exited:
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    def one_line(self) -> str:
        """The single line a failed start prints; fails if there is more (or a traceback)."""
        lines = self.stderr.strip().splitlines()
        assert len(lines) == 1, self.stderr
        assert "Traceback" not in self.stderr
        assert "Running on" not in self.stderr + self.stdout
        return lines[0]


async def run_to_exit(
    args: Sequence[str], *, cwd: Path, env: dict[str, str] | None = None
) -> Exited:
    """`python -m handler ARGS` to completion (bounded)."""
    started = trio.current_time()
    with trio.fail_after(EXIT_TIMEOUT_S):
        result = await trio.run_process(
            [sys.executable, "-m", "handler", *args],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            cwd=cwd,
            env=env or _environment(),
        )
    return Exited(
        result.returncode,
        result.stdout.decode(errors="replace"),
        result.stderr.decode(errors="replace"),
        trio.current_time() - started,
    )


@attrs.define
class Running:
    """A server process; its stderr goes to a file that tests read while it runs."""

    process: trio.Process
    log: Path
    port: int = 0

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    async def wait_for(self, pattern: str | re.Pattern[str], timeout: float) -> re.Match[str]:
        with trio.fail_after(timeout):
            while True:
                match = re.search(pattern, self.output())
                if match:
                    return match
                if self.process.returncode is not None:
                    raise AssertionError(f"exited with {self.process.returncode}:\n{self.output()}")
                await trio.sleep(0.05)

    async def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> int:
        self.port = int((await self.wait_for(_RUNNING, timeout)).group(1))
        return self.port

    async def stop(self, sig: int = signal.SIGINT, within: float = PROMPT_SHUTDOWN_S) -> int:
        """Send `sig`; the exit status, which must come within `within` seconds."""
        self.process.send_signal(sig)
        with trio.fail_after(within):
            return await self.process.wait()


@asynccontextmanager
async def running(
    command: Sequence[str], *, cwd: Path, log: Path, env: dict[str, str] | None = None
) -> AsyncIterator[Running]:
    """Start `command`, yield it; killed on the way out if still running."""
    with log.open("ab") as sink:
        process = await trio.lowlevel.open_process(
            list(command), stdout=sink, stderr=sink, cwd=cwd, env=env or _environment()
        )
    try:
        yield Running(process, log)
    finally:
        if process.returncode is None:
            process.kill()
            with trio.move_on_after(5):
                await process.wait()


def handler_command(config: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "handler", "--config", str(config), *extra]


async def bound_client_says(url: str) -> dict[str, Any]:
    """Open `url`, return the first frame (`authenticated` when the token is good)."""
    with trio.fail_after(10):
        async with open_websocket_url(url) as ws:
            frame: dict[str, Any] = json.loads(await ws.get_message())
            return frame


async def keep_alive_request(port: int, path: str = "/healthz") -> trio.SocketStream:
    """One HTTP/1.1 request answered in full on a connection left open (keep-alive)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    connection = h11.Connection(h11.CLIENT)
    request = h11.Request(method="GET", target=path, headers=[("Host", f"127.0.0.1:{port}")])
    await stream.send_all(connection.send(request) + connection.send(h11.EndOfMessage()))
    with trio.fail_after(5):
        while True:
            event = connection.next_event()
            if event is h11.NEED_DATA:
                connection.receive_data(await stream.receive_some(65536))
            elif isinstance(event, h11.EndOfMessage):
                return stream


# --------------------------------------------------------------------------- failed starts


@pytest.mark.parametrize(
    ("module", "sections"),
    [
        ("psycopg", {"storage": {"backend": "postgres", "dsn": "postgresql://x@127.0.0.1/x"}}),
        ("coredis", {"bus": {"backend": "redis", "url": "redis://127.0.0.1:6379/0"}}),
    ],
)
async def test_a_missing_driver_is_one_line_naming_the_extra(
    tmp_path: Path, module: str, sections: dict[str, Any]
) -> None:
    """Without the `scale` extra the server used to print `ASGI Framework Lifespan error`
    and `Running on ...`, then run for ever with /healthz 503."""
    blocked = tmp_path / "blocked" / module
    blocked.mkdir(parents=True)
    (blocked / "__init__.py").write_text(
        f"raise ModuleNotFoundError(\"No module named '{module}'\", name={module!r})\n"
    )
    config = write_config(tmp_path, **sections)
    env = _environment(PYTHONPATH=str(tmp_path / "blocked"))
    result = await run_to_exit(["--config", str(config)], cwd=tmp_path, env=env)
    assert result.returncode == 1
    line = result.one_line()
    assert module in line
    assert "pip install '.[scale]'" in line


async def test_an_unreachable_database_is_retried_briefly_then_one_line(tmp_path: Path) -> None:
    with closed_port() as port:
        dsn = f"postgresql://postgres:hunter2@127.0.0.1:{port}/test"
        config = write_config(tmp_path, storage={"backend": "postgres", "dsn": dsn})
        result = await run_to_exit(["--config", str(config)], cwd=tmp_path)
    assert result.returncode == 1
    line = result.one_line()
    assert "cannot reach PostgreSQL" in line
    assert "storage.dsn" in line
    assert "hunter2" not in line
    assert STARTUP_WAIT_S - 0.5 <= result.seconds < STARTUP_WAIT_S + 10


async def test_an_unreachable_redis_is_retried_briefly_then_one_line(tmp_path: Path) -> None:
    with closed_port() as port:
        url = f"redis://:hunter2@127.0.0.1:{port}/0"
        config = write_config(tmp_path, bus={"backend": "redis", "url": url})
        result = await run_to_exit(["--config", str(config)], cwd=tmp_path)
    assert result.returncode == 1
    line = result.one_line()
    assert "cannot reach Redis" in line
    assert "bus.url" in line
    assert "hunter2" not in line
    assert STARTUP_WAIT_S - 0.5 <= result.seconds < STARTUP_WAIT_S + 10


def _future_sqlite_database(path: Path, version: int) -> None:
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        db.execute("INSERT INTO schema_version (version) VALUES (?)", (version,))
    db.close()


async def test_a_database_from_a_newer_release_is_refused(tmp_path: Path) -> None:
    _future_sqlite_database(tmp_path / "chat.db", 99)
    config = write_config(tmp_path)
    result = await run_to_exit(["--config", str(config)], cwd=tmp_path)
    assert result.returncode == 1
    line = result.one_line()
    assert "schema version 99" in line
    assert "upgrade the handler" in line


@pytest.mark.scale
async def test_a_postgres_database_from_a_newer_release_is_refused(tmp_path: Path) -> None:
    import psycopg
    from scale_support import database_url, fresh_schema

    with fresh_schema(database_url()) as dsn:
        with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as db:
            db.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
            db.execute("INSERT INTO schema_version (version) VALUES (999)")
        config = write_config(tmp_path, storage={"backend": "postgres", "dsn": dsn})
        result = await run_to_exit(["--config", str(config)], cwd=tmp_path)
    assert result.returncode == 1
    assert "schema version 999" in result.one_line()


@contextmanager
def held_lock(database: Path) -> Iterator[Any]:
    """Hold the SQLite file's process lock as a running handler would."""
    with open(database.with_name(database.name + ".lock"), "ab") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        handle.truncate(0)
        handle.write(str(os.getpid()).encode())
        handle.flush()
        yield handle


async def test_a_lock_held_for_good_gives_up_after_a_few_seconds_with_one_line(
    tmp_path: Path,
) -> None:
    config = write_config(tmp_path)
    with held_lock(tmp_path / "chat.db"):
        result = await run_to_exit(["--config", str(config)], cwd=tmp_path)
    assert result.returncode == 2
    line = result.one_line()
    assert "another handler process" in line
    assert f"pid {os.getpid()}" in line
    assert 'storage.backend "postgres"' in line
    assert result.seconds >= STARTUP_WAIT_S - 0.5


async def test_a_start_waits_for_the_lock_of_a_process_still_stopping(tmp_path: Path) -> None:
    """The restart-right-after-Ctrl+C case: it used to print an 80-line traceback and
    `Running on`, then exit 1."""
    config = write_config(tmp_path)
    with held_lock(tmp_path / "chat.db") as lock:
        async with running(handler_command(config), cwd=tmp_path, log=tmp_path / "log") as new:
            await trio.sleep(1.5)
            assert new.process.returncode is None, new.output()
            assert "Running on" not in new.output()
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
            port = await new.wait_ready()
            frame = await bound_client_says(f"ws://127.0.0.1:{port}/ws?token={token_for('a')}")
            assert frame == {"type": "authenticated", "user_id": "a"}
            assert await new.stop() == 0
    assert "Traceback" not in new.output()


async def test_a_port_in_use_is_one_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = write_config(tmp_path, handler_url=f"127.0.0.1:{port}")
        result = await run_to_exit(["--config", str(config)], cwd=tmp_path)
    assert result.returncode == 1
    line = result.one_line()
    assert f"127.0.0.1:{port} is already in use" in line
    assert "handler_url" in line
    # What it opened on the way was closed: the next start takes the lock at once.
    again = await run_to_exit(["--config", str(config), "token", "alice"], cwd=tmp_path)
    assert again.returncode == 0


# --------------------------------------------------------------------------- shutdown


async def test_sigint_with_open_clients_exits_promptly_and_a_restart_takes_over(
    tmp_path: Path,
) -> None:
    """Two idle WebSocket clients and an idle keep-alive HTTP connection: exit 0 within a
    few seconds of SIGINT, and a second start launched right away succeeds."""
    config = write_config(tmp_path)
    async with (
        running(handler_command(config), cwd=tmp_path, log=tmp_path / "first.log") as first,
        trio.open_nursery() as nursery,
    ):
        port = await first.wait_ready()
        closed: list[int | None] = []

        async def idle_client(user: str, task_status: trio.TaskStatus[None]) -> None:
            async with open_websocket_url(
                f"ws://127.0.0.1:{port}/ws?token={token_for(user)}"
            ) as ws:
                assert json.loads(await ws.get_message())["type"] == "authenticated"
                task_status.started()
                with trio.fail_after(10):
                    try:
                        while True:
                            await ws.get_message()
                    except Exception:
                        closed.append(None if ws.closed is None else ws.closed.code)

        for user in ("tab1", "tab2"):
            await nursery.start(idle_client, user)
        http = await keep_alive_request(port)
        first.process.send_signal(signal.SIGINT)
        async with running(
            handler_command(config), cwd=tmp_path, log=tmp_path / "second.log"
        ) as second:
            started = trio.current_time()
            with trio.fail_after(PROMPT_SHUTDOWN_S):
                assert await first.process.wait() == 0, first.output()
            elapsed = trio.current_time() - started
            print(f"shutdown took {elapsed:.2f} s")
            new_port = await second.wait_ready()
            frame = await bound_client_says(
                f"ws://127.0.0.1:{new_port}/ws?token={token_for('tab1')}"
            )
            assert frame["type"] == "authenticated"
            assert await second.stop() == 0
        await http.aclose()
    assert closed == [1001, 1001]
    assert "Traceback" not in first.output() + second.output()


# --------------------------------------------------------------------------- startup line


async def test_the_startup_line_says_where_and_on_what(tmp_path: Path) -> None:
    config = write_config(tmp_path, auth={"jwt_secret": SECRET, "dev_tokens": True})
    async with running(handler_command(config), cwd=tmp_path, log=tmp_path / "log") as server:
        port = await server.wait_ready()
        line = (await server.wait_for(r".*serving on .*", 5)).group(0)
        assert f"INFO handler.app serving on http://127.0.0.1:{port}:" in line
        assert f"storage sqlite {tmp_path / 'chat.db'}" in line
        assert "bus local" in line
        assert "dev tokens on" in line
        frame = await bound_client_says(f"ws://127.0.0.1:{port}/ws?token={token_for('a')}")
        assert frame == {"type": "authenticated", "user_id": "a"}
        frame = await bound_client_says(f"ws://127.0.0.1:{port}/ws?token=not-a-token")
        assert frame["code"] == "unauthorized"
        await server.wait_for(r"handler\.session error conn=\w+ user=None code=unauthorized", 5)
        assert await server.stop() == 0
    output = server.output()
    # Each line once: the handler's logger is not configured twice under `python -m handler`.
    assert output.count("serving on") == 1
    assert len(re.findall(r"handler\.session error conn=", output)) == 1
    assert "WARNING" not in output


async def test_dev_tokens_on_a_public_address_warn(tmp_path: Path) -> None:
    config = write_config(tmp_path, handler_url="0.0.0.0:0", auth={"dev_tokens": True})
    async with running(handler_command(config), cwd=tmp_path, log=tmp_path / "log") as server:
        await server.wait_ready()
        warning = (await server.wait_for(r".*WARNING.*", 5)).group(0)
        assert "dev tokens are on" in warning
        assert "0.0.0.0" in warning
        await server.stop()


@pytest.mark.scale
async def test_the_startup_line_hides_the_database_password(tmp_path: Path) -> None:
    """A dsn with a password (trust authentication ignores it) is logged without it."""
    from scale_support import database_url, fresh_schema

    url = database_url()
    with_password = re.sub(r"^(postgresql://[^:@/]+)@", r"\1:hunter2@", url)
    assert "hunter2" in with_password
    with fresh_schema(with_password) as dsn:
        config = write_config(tmp_path, storage={"backend": "postgres", "dsn": dsn})
        async with running(handler_command(config), cwd=tmp_path, log=tmp_path / "log") as server:
            await server.wait_ready()
            line = (await server.wait_for(r".*serving on .*", 5)).group(0)
            assert "storage postgres postgresql://" in line
            await server.stop()
    assert "hunter2" not in server.output()


# --------------------------------------------------------------------------- under Hypercorn


def hypercorn_command() -> list[str]:
    return [HYPERCORN, "-k", "trio", "--bind", "127.0.0.1:0", "handler.app:create_app()"]


async def test_hypercorn_cli_shows_the_handler_log_lines(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    env = _environment(CHAT_CONFIG=str(config))
    async with running(hypercorn_command(), cwd=tmp_path, log=tmp_path / "log", env=env) as server:
        port = await server.wait_ready()
        frame = await bound_client_says(f"ws://127.0.0.1:{port}/ws?token={token_for('a')}")
        assert frame == {"type": "authenticated", "user_id": "a"}
        frame = await bound_client_says(f"ws://127.0.0.1:{port}/ws?token=not-a-token")
        assert frame["code"] == "unauthorized"
        await server.wait_for(r"handler\.session error conn=\w+ user=None code=unauthorized", 5)
        assert await server.stop(signal.SIGTERM, within=15) == 0
    output = server.output()
    assert len(re.findall(r"INFO handler\.app serving on 127\.0\.0\.1:0", output)) == 1, output
    assert len(re.findall(r"INFO handler\.session error conn=", output)) == 1, output
    assert "services stopped" in output


@pytest.mark.parametrize("failure", ["newer-schema", "missing-driver"])
async def test_hypercorn_cli_refuses_to_run_when_startup_fails(
    tmp_path: Path, failure: str
) -> None:
    """Any startup failure is `lifespan.startup.failed`: Hypercorn stops. (It used to go on
    "without Lifespan support" for anything but a HandlerError, serving nothing.)"""
    env = _environment()
    if failure == "newer-schema":
        _future_sqlite_database(tmp_path / "chat.db", 99)
        config = write_config(tmp_path)
        expected = "schema version 99"
    else:
        blocked = tmp_path / "blocked" / "psycopg"
        blocked.mkdir(parents=True)
        (blocked / "__init__.py").write_text("raise ImportError('blocked', name='psycopg')\n")
        env["PYTHONPATH"] = str(tmp_path / "blocked")
        config = write_config(tmp_path, storage={"backend": "postgres"})
        expected = "pip install '.[scale]'"
    env["CHAT_CONFIG"] = str(config)
    async with running(hypercorn_command(), cwd=tmp_path, log=tmp_path / "log", env=env) as server:
        with trio.fail_after(EXIT_TIMEOUT_S):
            await server.process.wait()
    output = server.output()
    assert expected in output
    assert "continuing without Lifespan support" not in output


# --------------------------------------------------------------------------- dev tokens


def _shipped_config(directory: Path, **changes: Any) -> Path:
    raw = json.loads((REPO / "config.json").read_text())
    raw.update(changes)
    path = directory / "config.json"
    path.write_text(json.dumps(raw))
    return path


async def _dev_token(port: int, user: str) -> str:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        body = json.dumps({"user_id": user}).encode()
        request = (
            f"POST /auth/dev-token HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode()
        await stream.send_all(request + body)
        data = b""
        with trio.fail_after(5):
            while chunk := await stream.receive_some(65536):
                data += chunk
    token: str = json.loads(data.partition(b"\r\n\r\n")[2])["token"]
    return token


async def test_shipped_config_token_command_and_tokens_survive_a_restart(tmp_path: Path) -> None:
    shutil.copy(REPO / "config.json", tmp_path / "config.json")  # exactly as shipped
    made = await run_to_exit(
        ["--config", str(tmp_path / "config.json"), "token", "alice"], cwd=tmp_path
    )
    assert made.returncode == 0, made.stderr
    cli_token = made.stdout.strip()
    secret_file = tmp_path / "chat.db.secret"
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
    config = _shipped_config(tmp_path, handler_url="127.0.0.1:0")  # same directory and database
    tokens = {"alice": cli_token}
    for run in range(2):
        log = tmp_path / f"run{run}.log"
        async with running(handler_command(config), cwd=tmp_path, log=log) as server:
            port = await server.wait_ready()
            if run == 0:
                tokens["bob"] = await _dev_token(port, "bob")
            for user, token in tokens.items():
                frame = await bound_client_says(f"ws://127.0.0.1:{port}/ws?token={token}")
                assert frame == {"type": "authenticated", "user_id": user}, (run, frame)
            assert await server.stop() == 0
    again = await run_to_exit(["--config", str(config), "token", "carol"], cwd=tmp_path)
    assert again.returncode == 0
    assert secret_file.read_text().strip() not in again.stdout + again.stderr


@pytest.mark.scale
async def test_postgres_dev_mode_keeps_the_secret_beside_the_config(tmp_path: Path) -> None:
    from scale_support import database_url, fresh_schema

    with fresh_schema(database_url()) as dsn:
        config = write_config(
            tmp_path, storage={"backend": "postgres", "dsn": dsn}, auth={"dev_tokens": True}
        )
        made = await run_to_exit(["--config", str(config), "token", "alice"], cwd=tmp_path)
        assert made.returncode == 0, made.stderr
        secret_file = tmp_path / "dev-tokens.secret"
        assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
        async with running(handler_command(config), cwd=tmp_path, log=tmp_path / "log") as server:
            port = await server.wait_ready()
            url = f"ws://127.0.0.1:{port}/ws?token={made.stdout.strip()}"
            assert await bound_client_says(url) == {"type": "authenticated", "user_id": "alice"}
            await server.stop()


async def test_a_dev_secret_readable_by_others_stops_the_start(tmp_path: Path) -> None:
    config = write_config(tmp_path, auth={"dev_tokens": True})
    secret_file = tmp_path / "chat.db.secret"
    secret_file.write_text("s" * 43)
    secret_file.chmod(0o644)
    result = await run_to_exit(["--config", str(config)], cwd=tmp_path)
    assert result.returncode == 2
    assert f"chmod 600 {secret_file}" in result.one_line()


# --------------------------------------------------------------------------- packaging


def _installed_layout(site: Path) -> None:
    """What a wheel installs, per pyproject.toml: the packages, with `package-dir` mappings
    and `package-data` globs applied (`handler.web` from the top-level `web/`)."""
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapping: dict[str, str] = setuptools.get("package-dir", {})
    data: dict[str, list[str]] = setuptools.get("package-data", {})
    for package in setuptools["packages"]:
        source = REPO / mapping.get(package, package.replace(".", "/"))
        target = site / package.replace(".", "/")
        target.mkdir(parents=True, exist_ok=True)
        for pattern in ["*.py", *data.get(package, [])]:
            for file in source.glob(pattern):
                shutil.copy(file, target / file.name)


async def test_an_installed_package_serves_the_browser_client(tmp_path: Path) -> None:
    site = tmp_path / "site"
    _installed_layout(site)
    assert not (site / "web").exists()  # only the packaged copy can be served
    env = _environment(PYTHONPATH=str(site))
    config = write_config(tmp_path)
    command = [sys.executable, "-m", "handler", "--config", str(config)]
    async with running(command, cwd=tmp_path, log=tmp_path / "log", env=env) as server:
        port = await server.wait_ready()
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            page = b""
            with trio.fail_after(5):
                while chunk := await stream.receive_some(65536):
                    page += chunk
        await server.stop()
    assert b'id="dev-form"' in page
    assert re.search(rb'src="app\.js\?v=[0-9a-f]+"', page)
    assert b"cache-control: no-cache" in page.lower()
    found = await trio.run_process(
        [sys.executable, "-c", "import handler; print(handler.__file__)"],
        capture_stdout=True,
        env=env,
        cwd=tmp_path,
    )
    assert found.stdout.decode().startswith(str(site))


def test_pyproject_ships_every_server_package() -> None:
    """A folder of modules left out of `packages` is missing from a wheel, though every
    editable checkout finds it."""
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {
        ".".join(path.parent.relative_to(REPO).parts)
        for path in (REPO / "handler").rglob("*.py")
        if "__pycache__" not in path.parts
    }
    assert folders <= set(setuptools["packages"])
    for package in folders:
        assert (REPO / package.replace(".", "/") / "__init__.py").is_file(), package


def test_pyproject_ships_every_client_file() -> None:
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert setuptools["package-dir"]["handler.web"] == "web"
    patterns = setuptools["package-data"]["handler.web"]
    for file in (REPO / "web").iterdir():
        assert any(file.match(pattern) for pattern in patterns), file.name


def test_generated_files_are_ignored_by_git() -> None:
    """The lock and the dev-token secret appear beside the database on the first start; the
    secret must never be committed."""
    import fnmatch

    patterns = [
        line.strip()
        for line in (REPO / ".gitignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for name in ("chat.db", "chat.db.lock", "chat.db.secret", "dev-tokens.secret"):
        assert any(fnmatch.fnmatch(name, pattern) for pattern in patterns), name
