"""Helpers for the attack tests: the server as a real process, clients that stop reading,
a large seeded history, samplers of memory and latency, and a connection-flood attacker.

The server runs as `python -m handler --config <file>` in its own process, so its resident
memory can be read from `/proc/<pid>/status` and the test's own event loop can neither help
nor slow it. Everything talks to 127.0.0.1 only, and every attack is bounded in count and time.

Run as a script (`python tests/attack_support.py flood ...`), this module is the connection
flood attacker of `test_attacks.py`: a process of its own, so that its thousands of sockets
do not share an event loop with the latency probe that measures the other users.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import select
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import time
import urllib.parse
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import IO, Any, Final

import attrs
import trio
import wsproto
import wsproto.events as ws_events
from support import SECRET, RunningServer, make_config, make_token

REPO_ROOT: Final = Path(__file__).resolve().parents[1]
"""The checkout under test: its `handler` package is what the server process runs."""

STARTUP_TIMEOUT_S: Final = 20.0
STOP_TIMEOUT_S: Final = 15.0
_RUNNING: Final = re.compile(r"Running on http://127\.0\.0\.1:(\d+)")

# Test configs keep the rate limiter out of the way: an attack must be stopped by the limit
# under test, not by the frame-rate limit.
GENEROUS_RATE: Final[Mapping[str, Any]] = {"rate_per_s": 100_000, "rate_burst": 100_000}


# --------------------------------------------------------------------------- configuration


def known_limits() -> frozenset[str]:
    """The `limits` keys the server under test accepts (its config rejects unknown keys)."""
    from handler.config import LimitsConfig

    return frozenset(attrs.fields_dict(LimitsConfig))


def supported(limits: Mapping[str, Any]) -> dict[str, Any]:
    """`limits` without the keys this server does not know, saying which were left out.

    The limits these tests attack are documented with defaults (PROTOCOL.md, "Errors and
    limits"), so a server without a key still gets the attack, with its defaults.
    """
    known = known_limits()
    left_out = sorted(set(limits) - known)
    if left_out:
        print(f"  [config] this server has no limits.{', limits.'.join(left_out)}: left out")
    return {key: value for key, value in limits.items() if key in known}


def write_config(
    directory: Path,
    *,
    limits: Mapping[str, Any] | None = None,
    storage: Mapping[str, Any] | None = None,
    bus: Mapping[str, Any] | None = None,
) -> Path:
    """A config file for `python -m handler` on a free port; SQLite `chat.db` by default."""
    directory.mkdir(parents=True, exist_ok=True)
    raw: dict[str, Any] = {
        "handler_url": "127.0.0.1:0",
        "storage": dict(storage or {"backend": "sqlite", "path": "chat.db"}),
        "bus": dict(bus or {"backend": "local"}),
        "auth": {"jwt_secret": SECRET},
        "limits": supported({**GENEROUS_RATE, **(limits or {})}),
    }
    path = directory / "config.json"
    path.write_text(json.dumps(raw, indent=2))
    return path


def server_environment() -> dict[str, str]:
    """The test's environment for a server process: the checkout under test first on the
    path, and none of the handler's `CHAT_*` overrides (they would replace the config file's
    DSN, for instance)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHAT_")}
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    )
    return env


_checked_import = False


def check_handler_import() -> None:
    """Fail early if a server process would run another checkout's `handler`."""
    global _checked_import
    if _checked_import:
        return
    found = subprocess.run(
        [sys.executable, "-c", "import handler; print(handler.__file__)"],
        env=server_environment(),
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout.strip()
    assert Path(found).resolve().is_relative_to(REPO_ROOT), (found, REPO_ROOT)
    print(f"  [server] handler package: {found}")
    _checked_import = True


# --------------------------------------------------------------------------- server process


class ServerProcess:
    """`python -m handler --config PATH` in a subprocess; the port is read from its log."""

    def __init__(self, config_path: Path) -> None:
        self.config_path = config_path
        self.log_path = config_path.with_suffix(".log")
        self.process: subprocess.Popen[bytes] | None = None
        self.port = 0
        self._log: IO[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def _spawn(self) -> int:
        """Start the process (a fast, non-blocking call); the log offset it writes from."""
        check_handler_import()
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        offset = self._log.tell()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "handler", "--config", str(self.config_path)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=server_environment(),
            cwd=self.config_path.parent,
        )
        return offset

    async def start(self) -> None:
        offset = self._spawn()
        assert self.process is not None
        with trio.fail_after(STARTUP_TIMEOUT_S):
            while True:
                text = self.log_path.read_bytes()[offset:].decode(errors="replace")
                found = _RUNNING.findall(text)
                if found:
                    self.port = int(found[-1])
                    return
                if self.process.poll() is not None:
                    raise RuntimeError(f"server exited early:\n{text}")
                await trio.sleep(0.05)

    async def stop(self) -> int | None:
        """SIGTERM, then SIGKILL if it does not exit in time; the exit status."""
        process = self.process
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            with trio.move_on_after(STOP_TIMEOUT_S):
                while process.poll() is None:  # noqa: ASYNC110 - a subprocess.Popen
                    await trio.sleep(0.05)
            if process.poll() is None:
                process.kill()
                process.wait(timeout=5)
        if self._log is not None:
            self._log.close()
            self._log = None
        return process.returncode

    def cpu_seconds(self) -> float:
        """User plus system CPU time the server process has used so far."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss_bytes(self) -> int:
        """Resident memory of the server process (VmRSS)."""
        status = Path(f"/proc/{self.pid}/status").read_text()
        match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
        assert match is not None, status
        return int(match.group(1)) * 1024

    def log_tail(self, lines: int = 30) -> str:
        text = self.log_path.read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    @property
    def server(self) -> RunningServer:
        """A `RunningServer` face on this process, for the client helpers of `support`."""
        config = make_config(self.config_path.parent)  # the same secret; nothing else is used
        url = f"http://127.0.0.1:{self.port}"
        return RunningServer(config, url, None, trio.Event(), trio.Event())  # type: ignore[arg-type]


@asynccontextmanager
async def server_process(config_path: Path) -> AsyncIterator[ServerProcess]:
    """A started `ServerProcess`, stopped on the way out."""
    process = ServerProcess(config_path)
    try:
        await process.start()
        yield process
    finally:
        await process.stop()


async def slow_consumers_dropped(server: RunningServer) -> float:
    """The server's count of connections dropped for not reading (0 if it has no such metric)."""
    from support import http_request

    response = await http_request(server, "GET", "/metrics")
    for line in response.body.decode().splitlines():
        if line.startswith("chat_slow_consumers_dropped_total "):
            return float(line.split()[1])
    return 0.0


# --------------------------------------------------------------------------- measurements


def mib(size: float) -> str:
    return f"{size / 2**20:.1f} MiB"


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def summary(samples: Sequence[float]) -> str:
    """`n, p50, p99, max` of latencies in seconds."""
    if not samples:
        return "n=0"
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)]
    return (
        f"n={len(ordered)} p50={ms(statistics.median(ordered))} p99={ms(p99)} max={ms(ordered[-1])}"
    )


@attrs.define
class RssSampler:
    """Samples a process's resident memory; `start` is the figure before the attack."""

    process: ServerProcess
    interval_s: float = 0.1
    start: int = 0
    peak: int = 0
    last: int = 0
    cpu_start: float = 0.0
    cpu_last: float = 0.0
    started_at: float = 0.0
    last_at: float = 0.0

    def sample(self) -> int:
        self.last = self.process.rss_bytes()
        self.peak = max(self.peak, self.last)
        self.cpu_last = self.process.cpu_seconds()
        self.last_at = trio.current_time()
        return self.last

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self.start = self.peak = self.sample()
        self.cpu_start, self.started_at = self.cpu_last, self.last_at
        task_status.started()
        while True:
            await trio.sleep(self.interval_s)
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                self.sample()

    @property
    def growth(self) -> int:
        return self.peak - self.start

    def report(self) -> str:
        cpu = self.cpu_last - self.cpu_start
        wall = max(1e-9, self.last_at - self.started_at)
        return (
            f"server RSS before {mib(self.start)}, peak {mib(self.peak)}"
            f" (+{mib(self.growth)}), at the end {mib(self.last)}; server CPU {cpu:.1f} s"
            f" in {wall:.1f} s ({100 * cpu / wall:.0f}% of one core)"
        )


# --------------------------------------------------------------------------- raw clients


def _ws_target(token: str | None) -> str:
    return "/ws" if token is None else "/ws?token=" + urllib.parse.quote(token, safe="")


class SilentClient:
    """A WebSocket client on a bare socket, made to stop reading.

    Its receive buffer is set before `connect` (so the window it advertises stays small), and
    after the upgrade (and, if asked, the first message) it reads nothing more until
    `drain()`: what the server writes piles up in the kernel, as with a stalled phone.
    `peer_gone()` tells, without reading, whether the server closed or reset the connection.
    Everything it ever received goes through one wsproto connection, so `drain()` returns
    every message in order, including those that came with the handshake.
    """

    def __init__(self, sock: trio.socket.SocketType, ws: wsproto.WSConnection) -> None:
        self.sock = sock
        self.ws = ws
        self.messages: list[str] = []
        self.close_code: int | None = None
        self.reset = False
        self.bytes_read = 0
        self._partial: list[str] = []

    @classmethod
    async def connect(
        cls,
        port: int,
        token: str | None,
        *,
        rcvbuf: int,
        first_message: bool = True,
        timeout: float = 5.0,
    ) -> SilentClient:
        """Upgrade (and, with `first_message`, wait for the first message, `authenticated`
        when the token is valid), then stop reading."""
        sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            client = cls(sock, wsproto.WSConnection(wsproto.ConnectionType.CLIENT))
            with trio.fail_after(timeout):
                await sock.connect(("127.0.0.1", port))
                request = ws_events.Request(host=f"127.0.0.1:{port}", target=_ws_target(token))
                await client._send_bytes(client.ws.send(request))
                accepted = False
                while not accepted or (first_message and not client.messages):
                    if client.close_code is not None:
                        break
                    data = await sock.recv(4096)
                    if not data:
                        raise ConnectionError("closed during the upgrade")
                    for event in client._feed(data):
                        if isinstance(event, ws_events.AcceptConnection):
                            accepted = True
                        elif isinstance(event, ws_events.RejectConnection):
                            raise ConnectionError(f"upgrade refused: {event.status_code}")
        except BaseException:
            sock.close()
            raise
        return client

    def _feed(self, data: bytes | None) -> list[ws_events.Event]:
        if data:
            self.bytes_read += len(data)
        if self.close_code is not None:
            return []  # nothing after a close frame counts
        self.ws.receive_data(data)
        events = list(self.ws.events())
        for event in events:
            if isinstance(event, ws_events.TextMessage):
                self._partial.append(event.data)
                if event.message_finished:
                    self.messages.append("".join(self._partial))
                    self._partial = []
            elif isinstance(event, ws_events.CloseConnection):
                self.close_code = event.code
                break
        return events

    async def _send_bytes(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            sent = await self.sock.send(view)
            view = view[sent:]

    async def send(self, obj: Mapping[str, Any]) -> None:
        """Send one JSON text frame (raises OSError once the server is gone)."""
        await self._send_bytes(self.ws.send(ws_events.TextMessage(data=json.dumps(obj))))

    async def ping(self) -> None:
        """Send a WebSocket ping (a control frame: no data frame, nothing to answer for)."""
        await self._send_bytes(self.ws.send(ws_events.Ping()))

    def peer_gone(self) -> bool:
        """Whether the server closed or reset the connection, found out without reading."""
        poller = select.poll()
        poller.register(self.sock.fileno(), select.POLLRDHUP | select.POLLERR | select.POLLHUP)
        return bool(poller.poll(0))

    async def drain(self, timeout: float = 10.0, quiet_s: float = 2.0) -> list[dict[str, Any]]:
        """Read everything still readable, until end of stream, a reset, or `quiet_s` without
        data (bounded by `timeout`); every complete message received since the upgrade, parsed.
        A truncated last frame is left out."""
        with trio.move_on_after(timeout):
            while self.close_code is None:
                data = b""
                with trio.move_on_after(quiet_s):
                    try:
                        data = await self.sock.recv(65536)
                    except OSError:  # the reset of a dropped connection
                        self.reset = True
                        break
                    if not data:
                        self._feed(None)
                        break
                if not data:
                    break  # quiet for quiet_s
                self._feed(data)
        return [json.loads(text) for text in self.messages]

    async def read_frames(
        self,
        on_frame: Callable[[dict[str, Any]], bool],
        timeout: float = 30.0,
        quiet_s: float = 2.0,
    ) -> None:
        """Start reading: hand each message, parsed, to `on_frame` (and forget it) until it
        returns True, the server closes, or nothing arrives for `quiet_s` (all within
        `timeout`)."""
        with trio.fail_after(timeout):
            while True:
                while self.messages:
                    if on_frame(json.loads(self.messages.pop(0))):
                        return
                if self.close_code is not None:
                    return
                data = b""
                with trio.move_on_after(quiet_s):
                    try:
                        data = await self.sock.recv(1 << 20)
                    except OSError:
                        self.reset = True
                        return
                    if not data:
                        return
                if not data:
                    return
                self._feed(data)

    def close(self) -> None:
        self.sock.close()


# --------------------------------------------------------------------------- seeded history


def _bulk_fill(db_path: Path, chats: Sequence[Any], sender: str, per_chat: int, size: int) -> None:
    """Add messages with the store's own INSERT (the columns its `add_message` writes), in one
    transaction: 200k messages take seconds this way instead of most of a minute.

    Only the message rows (with their seq and version) and the chat's message times and
    counters are written; anything else the store keeps per chat (e.g. its place in the order
    of activity, the sender's marks) stays as the store set it for the chat's first message,
    which is all these tests need.
    """
    db = sqlite3.connect(db_path, isolation_level=None)
    try:
        db.execute("BEGIN IMMEDIATE")
        try:
            for chat in chats:
                chat_row = int(chat.chat_id)
                recipient = chat.other_participant(sender)
                start_ms, have, version = db.execute(
                    "SELECT last_message_ms, last_seq, version FROM chats WHERE id = ?",
                    (chat_row,),
                ).fetchone()
                rows = [
                    (
                        chat_row,
                        sender,
                        recipient,
                        _content(chat_row, n, size),
                        start_ms + n,
                        n + 1,
                        version + n + 1 - have,
                    )
                    for n in range(have, per_chat)
                ]
                db.executemany(
                    "INSERT INTO messages (chat_id, sender_id, recipient_id, content,"
                    " created_at_ms, client_message_id, seq, version)"
                    " VALUES (?, ?, ?, ?, ?, NULL, ?, ?)",
                    rows,
                )
                last = start_ms + per_chat
                db.execute(
                    "UPDATE chats SET last_message_ms = ?, last_activity_ms = ?, last_seq = ?,"
                    " version = ? WHERE id = ?",
                    (last, last, per_chat, version + per_chat - have, chat_row),
                )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        db.close()


def _content(chat_row: int, n: int, size: int) -> str:
    head = f"chat {chat_row} message {n} "
    return head + "x" * max(0, size - len(head))


async def _seed(db_path: Path, owner: str, chats: int, per_chat: int, size: int) -> str:
    from handler.config import parse_config
    from handler.store import open_store

    raw = {"handler_url": "127.0.0.1:0", "storage": {"path": str(db_path)}}
    raw["auth"] = {"jwt_secret": SECRET}
    config = parse_config(raw, base_dir=db_path.parent, environ={})

    async def with_store(work: Any) -> Any:
        store = open_store(config.storage)
        async with trio.open_nursery() as services:
            await store.open(services)
            try:
                return await work(store)
            finally:
                await store.aclose()

    async def create(store: Any) -> list[Any]:
        # Chats and each chat's first message go through the store's own code.
        made = [(await store.create_chat(owner, f"{owner}-peer{i}"))[0] for i in range(chats)]
        for chat in made:
            await store.add_message(chat, owner, _content(int(chat.chat_id), 0, size), None)
        return made

    made = await with_store(create)
    try:
        _bulk_fill(db_path, made, owner, per_chat, size)
        method = "bulk insert"
    except sqlite3.Error as error:  # the schema moved on: the store's API does it, slowly
        print(f"  [seed] bulk insert failed ({error}); adding through the store")

        async def fill(store: Any) -> None:
            async def one_chat(chat: Any) -> None:
                for n in range(1, per_chat):
                    await store.add_message(chat, owner, _content(int(chat.chat_id), n, size), None)

            async with trio.open_nursery() as nursery:
                for chat in made:
                    nursery.start_soon(one_chat, chat)

        await with_store(fill)
        method = "the store"

    async def check(store: Any) -> None:  # the store reads what was meant
        for chat in (made[0], made[-1]):
            page, has_more = await store.messages_before(chat.chat_id, None, per_chat)
            assert (len(page), has_more) == (per_chat, False), (chat, len(page), has_more)
            assert [m.message_id for m in page] == sorted((m.message_id for m in page), key=int), (
                "ids must grow within a chat"
            )

    await with_store(check)
    return method


def seed_history(db_path: Path, *, owner: str, chats: int, per_chat: int, size: int) -> None:
    """A SQLite database in which `owner` sent `per_chat` messages of `size` characters in
    each of `chats` chats (so everything counts as delivered to them: no backlog on binding)."""
    started = time.monotonic()
    method = trio.run(_seed, db_path, owner, chats, per_chat, size)
    print(
        f"  [seed] {chats} chats x {per_chat} messages of {size} characters for {owner}"
        f" via {method} in {time.monotonic() - started:.1f} s"
    )


def copy_database(source: Path, target: Path) -> None:
    """Copy an SQLite database (with its WAL files, if any)."""
    from benchmarks.seed import copy_database as copy

    target.parent.mkdir(parents=True, exist_ok=True)
    copy(source, target)


# --------------------------------------------------------------------------- the flood attacker


@attrs.define
class FloodResult:
    attempted: int = 0
    bound: int = 0
    refused: int = 0  # an `error` frame instead of `authenticated`
    refusal_codes: dict[str, int] = attrs.field(factory=dict)
    close_codes: dict[str, int] = attrs.field(factory=dict)
    failed: int = 0  # no answer in time, or the connection broke
    unfinished: int = 0  # still waiting for an answer when the time was up
    sent: int = 0
    acked: int = 0
    chatter_error: str | None = None  # how the sending connection ended, if it broke
    seconds: float = 0.0
    most_held: int = 0  # the most bound connections open at once (besides the sender)
    dropped: int = 0  # bound connections the server closed before the end


async def _count_open(held: Sequence[SilentClient], *, poke: bool) -> int:
    """How many held connections are still open. A server may have closed one whose close it
    could not get through (the client is not reading): with `poke`, each one that looks open
    is sent a WebSocket ping first, which a closed socket answers with a reset."""
    open_now = [client for client in held if not client.peer_gone()]
    if poke and open_now:
        for client in open_now:
            with contextlib.suppress(OSError):
                await client.ping()
        await trio.sleep(0.2)
        open_now = [client for client in open_now if not client.peer_gone()]
    return len(open_now)


async def _watch_held(held: list[SilentClient], result: FloodResult, cap: int) -> None:
    """Keep `result.most_held` up to date. Looking costs nothing (a poll); a count over the
    cap is checked by poking once, and once confirmed, only looked at."""
    confirmed = False
    while True:
        count = await _count_open(held, poke=False)
        if count + 1 > cap and not confirmed:
            count = await _count_open(held, poke=True)
            confirmed = count + 1 > cap
        result.most_held = max(result.most_held, count)
        await trio.sleep(0.2)


async def _attempt(
    port: int, token: str, result: FloodResult, held: list[SilentClient], rcvbuf: int
) -> None:
    result.attempted += 1
    try:
        client = await SilentClient.connect(port, token, rcvbuf=rcvbuf, timeout=5.0)
    except (OSError, ConnectionError, trio.TooSlowError):
        result.failed += 1
        return
    if client.messages:
        first = json.loads(client.messages[0])
        if first.get("type") == "authenticated":
            result.bound += 1
            held.append(client)  # held open, never read again
            return
        result.refused += 1
        code = str(first.get("code"))
        result.refusal_codes[code] = result.refusal_codes.get(code, 0) + 1
    with contextlib.suppress(OSError):
        await client.drain(timeout=3.0, quiet_s=3.0)  # the close frame that should follow
    key = str(client.close_code)
    result.close_codes[key] = result.close_codes.get(key, 0) + 1
    client.close()


async def _chatter(
    port: int, user: str, friend: str, rate: float, result: FloodResult, stop: trio.Event
) -> None:
    """One bound connection of the attacker sends `rate` messages a second to `friend`."""
    from support import make_config

    server = RunningServer(
        make_config(Path("/nonexistent")),
        f"http://127.0.0.1:{port}",
        None,  # type: ignore[arg-type]
        trio.Event(),
        trio.Event(),
    )
    try:
        await _chat_at(server, user, friend, rate, result, stop)
    except Exception as error:  # reported to the test, which decides
        result.chatter_error = repr(error)


async def _chat_at(
    server: RunningServer,
    user: str,
    friend: str,
    rate: float,
    result: FloodResult,
    stop: trio.Event,
) -> None:
    async with server.connect(user) as client:
        chat = await client.create_chat(friend)

        async def read_acks() -> None:
            while True:
                frame = await client.recv(timeout=math.inf)
                if frame.get("type") == "message" and frame.get("sender_id") == user:
                    result.acked += 1

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_acks)
            started = trio.current_time()
            while not stop.is_set():
                await client.send(
                    {
                        "type": "send_message",
                        "chat_id": chat["chat_id"],
                        "recipient_id": friend,
                        "content": f"flood {result.sent} " + "x" * 180,
                    }
                )
                result.sent += 1
                with trio.move_on_at(started + result.sent / rate):
                    await stop.wait()
            nursery.cancel_scope.cancel()


async def flood(
    port: int,
    user: str,
    friend: str,
    *,
    connections: int,
    batch: int,
    seconds: float,
    hold_s: float,
    rate: float,
    rcvbuf: int,
    cap: int,
) -> FloodResult:
    """One user opens up to `connections` connections, `batch` at a time, for at most
    `seconds`, while one of them sends `rate` messages a second to `friend`; everything
    bound is held (never read) for `hold_s` more. `cap` is the per-user limit the test
    expects: a count of open connections above it is double-checked."""
    result = FloodResult()
    held: list[SilentClient] = []
    token = make_token(user)
    stop = trio.Event()
    started = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_chatter, port, user, friend, rate, result, stop)
        nursery.start_soon(_watch_held, held, result, cap)
        await trio.sleep(0.5)  # the chatter is bound and sending
        deadline = started + seconds
        while result.attempted < connections and trio.current_time() < deadline:
            with trio.move_on_at(deadline):
                async with trio.open_nursery() as wave:
                    for _ in range(min(batch, connections - result.attempted)):
                        wave.start_soon(_attempt, port, token, result, held, rcvbuf)
        print(f"holding {result.bound}", flush=True)  # the test's cue: the flood is over
        await trio.sleep(hold_s)
        stop.set()
        result.dropped = len(held) - await _count_open(held, poke=True)
        nursery.cancel_scope.cancel()
    result.seconds = trio.current_time() - started
    result.unfinished = result.attempted - result.bound - result.refused - result.failed
    for client in held:
        client.close()
    return result


def main(argv: Iterable[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="connection flood (see module doc)")
    parser.add_argument("mode", choices=["flood"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--user", required=True)
    parser.add_argument("--friend", required=True)
    parser.add_argument("--connections", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--hold", type=float, default=2.0)
    parser.add_argument("--rate", type=float, default=19.0)
    parser.add_argument("--rcvbuf", type=int, default=4096)
    parser.add_argument("--cap", type=int, default=10)
    args = parser.parse_args(list(argv) if argv is not None else None)
    result = trio.run(
        lambda: flood(
            args.port,
            args.user,
            args.friend,
            connections=args.connections,
            batch=args.batch,
            seconds=args.seconds,
            hold_s=args.hold,
            rate=args.rate,
            rcvbuf=args.rcvbuf,
            cap=args.cap,
        )
    )
    print(json.dumps(attrs.asdict(result)), flush=True)


if __name__ == "__main__":
    main()
