"""Server processes under test: launch, pin, watch (CPU seconds, RSS) and stop.

Every server runs as a subprocess in its own session, pinned to its cores before `exec` and
with a raised open-file limit, so that CPU time and RSS read from `/proc` belong to it (and to
its workers) alone. Readings come from `/proc` directly: Linux is the only target and the
suite then needs no extra package to measure.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import resource
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Final

from benchmarks.echo import NO_HTTP

REPO: Final = Path(__file__).resolve().parent.parent
_TICKS: Final = os.sysconf("SC_CLK_TCK")
_PAGE: Final = os.sysconf("SC_PAGE_SIZE")
NOFILE: Final = 65536


@dataclass(frozen=True)
class Sections:
    """Config sections other than `limits` that one side of `--vary` adds to its servers'
    config.json. `start(log_path)` is entered before each of them starts and left after it
    stopped, and yields the sections: it may run what they point at (a webhook receiver),
    logging to `log_path`. `summary` states them in the reports."""

    summary: str
    start: Callable[[Path], AbstractContextManager[Mapping[str, Any]]]


@dataclass(frozen=True)
class Source:
    """A server under test: the tree whose `handler` package it runs (this working tree, or
    the temporary checkout of a git ref that `--compare` measures it against), and the
    `limits` its config.json gets on top of the benchmark's own, and any other `config`
    sections (one side of `--vary`). The load generator and the bare relays always come from
    this working tree: only the server under test differs."""

    name: str  # "current" or "baseline": also the folder of its logs in a comparison
    root: Path
    ref: str = ""  # the git ref asked for; "" for the working tree
    commit: str = ""  # what `ref` resolved to
    setting: str = ""  # a varied setting's side, as reports name it ("presence off")
    limits: Mapping[str, Any] = field(default_factory=dict, hash=False)
    config: Sections | None = field(default=None, hash=False)

    @property
    def label(self) -> str:
        """How progress lines and reports name it."""
        if self.setting:
            return self.setting
        return f"baseline {self.ref}" if self.ref else "current tree"


CURRENT: Final = Source("current", REPO)


def server_env(root: Path, env: dict[str, str] | None = None) -> dict[str, str]:
    """`env` (default: ours) with `root` first on PYTHONPATH, so that `import handler` finds
    that tree's package before any installed or editable copy.

    A tree other than this one (a `--compare` checkout, thrown away afterwards) also gets its
    bytecode written beside its sources: the `__pycache__` its servers leave there is the
    trace that they ran its modules (`benchmarks.compare.compiled_modules`). Only imports
    pay for that, before any measured window.
    """
    out = dict(os.environ if env is None else env)
    out["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), out.get("PYTHONPATH")]))
    if root.resolve() != REPO:
        out.pop("PYTHONDONTWRITEBYTECODE", None)
        out.pop("PYTHONPYCACHEPREFIX", None)
    return out


def handler_origin(root: Path) -> Path:
    """The `handler` package a server started from `root` imports: resolved by the same
    interpreter, environment and working directory as the server, with `find_spec`, which
    follows the import system without running the package (a tree mid-refactor may not
    import). Raises RuntimeError when there is none."""
    probe = (
        "import importlib.util, sys\n"
        "spec = importlib.util.find_spec('handler')\n"
        "places = list(spec.submodule_search_locations or []) if spec else []\n"
        "sys.stdout.write(places[0] if places else '')\n"
    )
    found = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=root,
        env=server_env(root),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if found.returncode != 0 or not found.stdout.strip():
        raise RuntimeError(f"no `handler` package importable from {root}: {found.stderr.strip()}")
    return Path(found.stdout.strip()).resolve()


def raise_nofile(limit: int = NOFILE) -> int:
    """Raise RLIMIT_NOFILE as far as allowed (10k connections need 10k descriptors)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for target in (limit, hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, max(target, hard)))
            return target
        except (ValueError, OSError):
            continue
    return soft


def apply_priority() -> None:
    """Lower this process's nice value by `BENCH_NICE` (set by `--nice`): on a shared machine
    it keeps other work from preempting the processes under measurement."""
    boost = int(os.environ.get("BENCH_NICE", "0") or 0)
    if boost:
        with contextlib.suppress(OSError):
            os.nice(-boost)
        # With autogroup scheduling, nice only ranks tasks within one session: the group's
        # own nice is what ranks it against other sessions' work.
        with contextlib.suppress(OSError):
            Path("/proc/self/autogroup").write_text(str(-boost))


def usable_cpus(cpus: Sequence[int] | None) -> set[int] | None:
    """The requested cores that exist here, or None to leave affinity alone."""
    if cpus is None:
        return None
    available = os.sched_getaffinity(0)
    chosen = {cpu for cpu in cpus if cpu in available}
    return chosen or None


def free_port() -> int:
    """A port that was free a moment ago (the server binds it next)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _stat_fields(pid: int) -> list[str]:
    text = Path(f"/proc/{pid}/stat").read_text()
    # The command name may contain spaces and parentheses: split after its last ")".
    return text[text.rindex(")") + 2 :].split()


def process_tree(pid: int) -> list[int]:
    """`pid` and all its living descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            ppid = int(_stat_fields(int(entry))[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(children.get(current, ()))
    return tree


def process_cpu_clock(pid: int) -> int:
    """Linux's CPU-time clock id of another process (`clock_getcpuclockid`, which Python lacks):
    nanosecond resolution over all its threads, where `/proc/PID/stat` counts 10 ms ticks."""
    return ((~pid) << 3) | 2  # MAKE_PROCESS_CPUCLOCK(pid, CPUCLOCK_SCHED)


def cpu_seconds(pids: Sequence[int]) -> float:
    """User + system CPU seconds of these processes (all their threads, living or not)."""
    total = 0.0
    for pid in pids:
        try:
            total += time.clock_gettime(process_cpu_clock(pid))
            continue
        except OSError:
            pass
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = _stat_fields(pid)
            total += (int(fields[11]) + int(fields[12])) / _TICKS
    return total


def rss_bytes(pids: Sequence[int]) -> int:
    """Resident set size of these processes, in bytes."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError, ValueError, IndexError):
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * _PAGE
    return total


def pids_named(*names: str) -> list[int]:
    """Processes whose command name is one of `names` (PostgreSQL, Redis backends)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                comm = Path(f"/proc/{entry}/comm").read_text().strip()
                if comm in names or any(comm.startswith(n) for n in names):
                    found.append(int(entry))
    return found


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    """Whether something accepts TCP connections there."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _healthy(port: int) -> bool:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        connection.request("GET", "/healthz")
        return connection.getresponse().status == 200
    except OSError:
        return False
    finally:
        connection.close()


class ServerProcess:
    """A server subprocess: started pinned, polled until `ready` (by default: `/healthz`
    answers), stopped cleanly."""

    def __init__(
        self,
        argv: Sequence[str],
        port: int,
        *,
        cpus: Sequence[int] | None,
        log_path: Path,
        env: dict[str, str] | None = None,
        stop_grace_s: float = 15.0,
        root: Path = REPO,
        start_timeout_s: float = 60.0,
        ready: Callable[[int], bool] = _healthy,
    ) -> None:
        self.argv = list(argv)
        self.ready = ready
        self.root = root
        self.stop_grace_s = stop_grace_s
        self.start_timeout_s = start_timeout_s
        self.killed = False
        self.port = port
        self.cpus = usable_cpus(cpus)
        self.log_path = log_path
        self.env = env
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    def _child_setup(self) -> None:
        if self.cpus:
            os.sched_setaffinity(0, self.cpus)
        raise_nofile()
        apply_priority()

    def start(self, timeout: float = 60.0) -> None:
        # `-m handler` puts the working directory first on sys.path, Hypercorn imports its app
        # from there too, and PYTHONPATH covers the rest: all three name the same tree.
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                self.argv,
                cwd=self.root,
                env=server_env(self.root, self.env),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=self._child_setup,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(
                    f"server exited with {self._proc.returncode}; log: {self.log_path}\n"
                    + self.log_tail()
                )
            if self.ready(self.port):
                return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"server not healthy after {timeout:.0f} s; log: {self.log_path}")

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def pids(self) -> list[int]:
        return process_tree(self.pid)

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.pids())

    def rss_bytes(self) -> int:
        return rss_bytes(self.pids())

    def stop(self) -> int | None:
        """SIGTERM (graceful shutdown), then SIGKILL of its own process group after the grace
        period; `killed` tells which."""
        proc = self._proc
        if proc is None:
            return None
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(self.stop_grace_s)
            except subprocess.TimeoutExpired:
                self.killed = True
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        # Workers of a multi-process server must not outlive their parent.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        self._proc = None
        return proc.returncode

    def __enter__(self) -> ServerProcess:
        self.start(self.start_timeout_s)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def handler_config(
    port: int,
    db_path: Path,
    secret: str,
    *,
    postgres_dsn: str | None = None,
    redis_url: str | None = None,
    limits: dict[str, Any] | None = None,
    sections: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A config.json for benchmarking: rate limits out of the way, idle timeouts long;
    `sections` (other than `limits`) are added at the top level."""
    storage: dict[str, Any] = {"backend": "sqlite", "path": str(db_path), "synchronous": "normal"}
    if postgres_dsn:
        storage = {"backend": "postgres", "dsn": postgres_dsn}
    bus: dict[str, Any] = {"backend": "local"}
    if redis_url:
        bus = {"backend": "redis", "url": redis_url}
    assert "limits" not in (sections or {}), "limits are merged through `limits`"
    return {
        "handler_url": f"127.0.0.1:{port}",
        "storage": storage,
        "bus": bus,
        "auth": {"jwt_secret": secret},
        "limits": {
            "rate_per_s": 1e6,
            "rate_burst": 1_000_000,
            "auth_timeout_s": 120.0,
            "idle_timeout_s": 3600.0,
            **(limits or {}),
        },
        **(sections or {}),
    }


@contextlib.contextmanager
def handler_server(
    workdir: Path,
    *,
    db_path: Path | None = None,
    cpus: Sequence[int] | None = (0,),
    workers: int | None = None,
    postgres_dsn: str | None = None,
    redis_url: str | None = None,
    limits: dict[str, Any] | None = None,
    sections: Mapping[str, Any] | None = None,
    log_path: Path | None = None,
    stop_grace_s: float = 15.0,
    root: Path = REPO,
    argv_prefix: Sequence[str] = (),
    start_timeout_s: float = 60.0,
) -> Iterator[tuple[ServerProcess, str]]:
    """Run the handler of the tree at `root` with a fresh config; yields (process, jwt secret).

    `workers=None` runs `python -m handler --config`; a number runs Hypercorn's trio worker
    with that many processes and `CHAT_CONFIG`, the multi-process deployment. `argv_prefix`
    runs the server under another program (`valgrind ...`, `benchmarks.instructions`), which
    may need a longer `start_timeout_s` until `/healthz` answers.
    """
    port = free_port()
    secret = secrets.token_hex(16)
    db = db_path or workdir / "chat.db"
    config = handler_config(
        port,
        db,
        secret,
        postgres_dsn=postgres_dsn,
        redis_url=redis_url,
        limits=limits,
        sections=sections,
    )
    config_path = workdir / f"config-{port}.json"
    config_path.write_text(json.dumps(config, indent=2))
    env = dict(os.environ)
    env.pop("CHAT_JWT_SECRET", None)
    env.pop("CHAT_DATABASE_URL", None)
    env.pop("CHAT_REDIS_URL", None)
    if workers is None:
        argv = [sys.executable, "-m", "handler", "--config", str(config_path)]
    else:
        env["CHAT_CONFIG"] = str(config_path)
        argv = [
            sys.executable,
            "-m",
            "hypercorn",
            "-k",
            "trio",
            "--workers",
            str(workers),
            "--bind",
            f"127.0.0.1:{port}",
            "--backlog",
            "4096",
            "handler.app:create_app()",
        ]
    server = ServerProcess(
        [*argv_prefix, *argv],
        port,
        cpus=cpus,
        log_path=log_path or workdir / "server.log",
        env=env,
        stop_grace_s=stop_grace_s,
        root=root,
        start_timeout_s=start_timeout_s,
    )
    with server:
        yield server, secret


@contextlib.contextmanager
def echo_server(
    log_path: Path, stack: str, *, cpus: Sequence[int] | None = (0,)
) -> Iterator[ServerProcess]:
    """Run one of the bare relays of `benchmarks.echo`. Those without HTTP count as up once
    their port accepts connections: the listener is bound before the server runs, so the
    first handshakes wait in its backlog rather than fail."""
    port = free_port()
    argv = [sys.executable, "-m", "benchmarks.echo", "--stack", stack, "--port", str(port)]
    ready = partial(port_open, "127.0.0.1") if stack in NO_HTTP else _healthy
    server = ServerProcess(argv, port, cpus=cpus, log_path=log_path, stop_grace_s=5.0, ready=ready)
    with server:
        yield server


def temp_workdir(base: Path | None = None) -> tempfile.TemporaryDirectory[str]:
    """A scratch directory for configs, databases and logs of one scenario."""
    if base is not None:
        base.mkdir(parents=True, exist_ok=True)
    return tempfile.TemporaryDirectory(prefix="bench-", dir=base)
