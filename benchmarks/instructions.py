"""Instruction counts of the server for a fixed workload, under callgrind.

`python -m benchmarks.instructions [--compare GIT_REF] [--messages N] [--connects N]`

Timings on a shared machine move with whatever else runs on it; the number of instructions
the server executes for a given piece of work hardly does. This runs the handler as scenario
(a) does (`python -m handler`, one Hypercorn trio worker, SQLite, the default features; the
suite's `handler_server`) under `valgrind --tool=callgrind` with instrumentation off, warms
it up, and counts two fixed workloads, each from `callgrind_control -i on` to a dump taken
0.5 s after its last frame (so that the delivery marks it owes are written in it too):

- relay: exactly `--messages` `send_message` spread over a few pairs, each user keeping at
  most a small window unacknowledged (its own `message` copy is the acknowledgement), until
  every copy has arrived: instructions per delivered message;
- connect: `--connects` fresh users connecting and binding (the generator's `connect` job),
  held until all are bound: instructions per connect+bind.

The count is the whole server process's: callgrind's `--separate-threads=no` sums all its
threads (the SQLite writer's too) into the `totals:` line of each dump. The clients are the
load generator's (`benchmarks.loadgen`), run in this process: nothing of theirs is counted,
so their cost cannot matter, only the work they ask for.

With `--compare GIT_REF` GIT_REF's server (a temporary worktree, as `python -m benchmarks
--compare` makes) is measured first, with the same workload, in the same invocation.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

import orjson
import trio

from benchmarks import compare as comparing
from benchmarks import loadgen
from benchmarks.cli import _meta, _sigterm_unwinds
from benchmarks.harness import GENERATOR_CPUS
from benchmarks.servers import CURRENT, REPO, Source, handler_server, temp_workdir, usable_cpus

DEFAULT_OUT: Final = REPO / "benchmarks" / "results" / "instructions"
VALGRIND: Final = "valgrind"
CALLGRIND_CONTROL: Final = "callgrind_control"
# Python under callgrind runs some 50x slower: imports take a while before `/healthz`.
START_TIMEOUT_S: Final = 600.0
STOP_GRACE_S: Final = 120.0
WORKLOAD_TIMEOUT_S: Final = 1800.0
DUMP_TIMEOUT_S: Final = 120.0

Pairs = list[tuple[loadgen.User, loadgen.User]]


@dataclass(frozen=True)
class Workload:
    """The work counted, the same for both trees of a comparison."""

    messages: int = 1000
    connects: int = 200
    pairs: int = 4
    window: int = 4
    content_bytes: int = 100  # as in scenario (a)
    warmup_messages: int = 40
    warmup_connects: int = 10
    concurrency: int = 10
    # Past the handler's presence grace (5 s by default): the warm-up's closed connections
    # are announced offline before any count starts, not during one.
    settle_s: float = 7.0
    # Counting goes on this long past the last frame: the server writes delivery marks every
    # 100 ms (and sends their receipts then), work the counted messages and binds still owe.
    tail_s: float = 0.5


def dump_totals(text: str, event: str = "Ir") -> int:
    """The count of `event` in one callgrind dump: its `totals:` line, else `summary:`.

    A dump taken after `--instr-atstart=no` has `summary: 0` in its header and the real sum
    in `totals:`, so `totals:` wins; the column is the event's place on the `events:` line.
    """
    events: list[str] = []
    found: dict[str, list[int]] = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key == "events":
            events = rest.split()
        elif key in ("totals", "summary"):
            found[key] = [int(value) for value in rest.split()]
    if event not in events:
        raise ValueError(f"no {event} among the dump's events {events}")
    values = found.get("totals") or found.get("summary")
    if values is None:
        raise ValueError("no totals: or summary: line in the dump")
    column = events.index(event)
    return values[column] if column < len(values) else 0


@dataclass
class Callgrind:
    """Instrumentation switches and dumps of one process running under callgrind."""

    out_file: Path
    pid: int = 0

    def argv_prefix(self) -> list[str]:
        """What to run the server under: nothing counted until switched on."""
        return [
            VALGRIND,
            "--tool=callgrind",
            "--instr-atstart=no",
            "--separate-threads=no",
            f"--callgrind-out-file={self.out_file}",
        ]

    async def control(self, option: str) -> None:
        """One `callgrind_control` command to this process alone (without a pid it would
        reach every callgrind run on the machine)."""
        assert self.pid > 0, "the server's pid is not known yet"
        done = await trio.run_process(
            [CALLGRIND_CONTROL, option, str(self.pid)],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
        said = (done.stdout + done.stderr).decode(errors="replace")
        if done.returncode != 0 or "OK" not in said:
            raise RuntimeError(f"callgrind_control {option} {self.pid} failed: {said.strip()}")

    def dumps(self) -> set[Path]:
        return set(self.out_file.parent.glob(self.out_file.name + ".*"))

    async def start(self) -> None:
        await self.control("--zero")
        await self.control("--instr=on")

    async def stop(self) -> tuple[int, Path]:
        """Switch counting off and dump; the instructions since `start`, and the dump."""
        await self.control("--instr=off")
        before = self.dumps()
        await self.control("--dump")
        with trio.fail_after(DUMP_TIMEOUT_S):
            while True:
                for path in sorted(self.dumps() - before):
                    text = path.read_text(errors="replace")
                    if "\ntotals:" in text:  # its last line: the dump is complete
                        return dump_totals(text), path
                await trio.sleep(0.2)


class Counted(loadgen.Checkpoints):
    """A generator job's checkpoints as the switches: `measure_start` starts counting,
    `measure_end` stops it `tail_s` later and keeps the count and the dump."""

    def __init__(self, callgrind: Callgrind, tail_s: float) -> None:
        super().__init__(interactive=False)
        self.callgrind = callgrind
        self.tail_s = tail_s
        self.count: tuple[int, Path] | None = None

    async def __call__(self, name: str, **info: Any) -> None:
        if name == "measure_start":
            await self.callgrind.start()
        elif name == "measure_end":
            await trio.sleep(self.tail_s)
            self.count = await self.callgrind.stop()


@dataclass
class Exchanged:
    """What one `exchange` sent and got back."""

    sent: int = 0
    acks: int = 0
    delivered: int = 0
    other: Counter[str] = field(default_factory=Counter)


async def exchange(couples: Pairs, messages: int, window: int, size: int) -> Exchanged:
    """Exactly `messages` `send_message` over the pairs, spread evenly over their users,
    each keeping at most `window` unacknowledged; returns once every sender has its own copy
    of each and every recipient its copy. A time-bounded loop (the `relay` job) would leave
    messages in flight across the counted window's edges."""
    users = [user for couple in couples for user in couple]
    quota = {
        user.user_id: messages // len(users) + (index < messages % len(users))
        for index, user in enumerate(users)
    }
    tally = Exchanged()

    async def run(user: loadgen.User) -> None:
        assert user.peer is not None
        mine, theirs = quota[user.user_id], quota[user.peer]
        left, inflight, acks, delivered = mine, 0, 0, 0
        base = {
            "type": "send_message",
            "chat_id": user.chat_id,
            "recipient_id": user.peer,
            "request_id": 1,
        }
        while acks < mine or delivered < theirs:
            if left and inflight < window:
                count = min(window - inflight, left)
                content = loadgen.make_content(trio.current_time(), size)
                await user.conn.send_texts([orjson.dumps({**base, "content": content})] * count)
                left -= count
                inflight += count
                tally.sent += count
            for raw in await user.conn.receive_batch():
                frame = orjson.loads(raw)
                kind = frame.get("type")
                if kind == "message" and frame.get("sender_id") == user.user_id:
                    acks += 1
                    inflight -= 1
                elif kind == "message":
                    delivered += 1
                elif kind == "error":
                    raise RuntimeError(f"{user.user_id}: server error: {frame}")
                else:
                    tally.other[str(kind)] += 1
        tally.acks += acks
        tally.delivered += delivered

    async with trio.open_nursery() as nursery:
        for user in users:
            nursery.start_soon(run, user)
    return tally


async def drive(port: int, secret: str, callgrind: Callgrind, work: Workload) -> dict[str, Any]:
    """Warm the server up (pairs with their chats, messages, connects), then count the relay
    and the connect workloads in turn."""
    with trio.fail_after(WORKLOAD_TIMEOUT_S):
        async with trio.open_nursery() as nursery:

            def generator(prefix: str, **job: Any) -> loadgen.Generator:
                # fixed user ids: their lengths are part of the work counted
                job = {"port": port, "secret": secret, "client": "raw", "prefix": prefix, **job}
                return loadgen.Generator(job, nursery)

            warm = generator("ir-pair")
            couples = await warm.make_pairs(work.pairs, concurrency=work.concurrency)
            await exchange(couples, work.warmup_messages, work.window, work.content_bytes)
            ids = [warm.user_id(i, "w") for i in range(work.warmup_connects)]
            await loadgen.close_all(await warm.connect_many(ids, work.concurrency), polite=False)
            await trio.sleep(work.settle_s)

            started = trio.current_time()
            await callgrind.start()
            relayed = await exchange(couples, work.messages, work.window, work.content_bytes)
            await trio.sleep(work.tail_s)
            relay_ir, relay_dump = await callgrind.stop()
            relay_s = trio.current_time() - started

            connecting = generator("ir-conn", count=work.connects, concurrency=work.concurrency)
            counted = connecting.checkpoint = Counted(callgrind, work.tail_s)
            connected = await loadgen.job_connect(connecting)
            assert counted.count is not None
            connect_ir, connect_dump = counted.count

            await loadgen.close_all([user for couple in couples for user in couple])
            nursery.cancel_scope.cancel()
    delivered, bound = relayed.delivered, connected["bound"]
    return {
        "relay": {
            "instructions": relay_ir,
            "sent": relayed.sent,
            "acks": relayed.acks,
            "delivered": delivered,
            "per_delivered_message": relay_ir / delivered if delivered else None,
            "receipts": relayed.other["receipt"],
            "other_frames": dict(relayed.other),
            "wall_s": relay_s,
            "dump": str(relay_dump),
        },
        "connect": {
            "instructions": connect_ir,
            "count": connected["count"],
            "bound": bound,
            "per_connect_bind": connect_ir / bound if bound else None,
            "errors": connected["errors"],
            "wall_s": connected["elapsed_s"],
            "dump": str(connect_dump),
        },
    }


def measure(
    source: Source, work: Workload, scratch: Path, out: Path, say: Callable[[str], None]
) -> dict[str, Any]:
    """Count the workload on the server of `source`; its callgrind dumps and server log are
    kept in `out` (`callgrind_annotate FILE` shows where the instructions went)."""
    workdir = scratch / source.name
    workdir.mkdir(parents=True)
    callgrind = Callgrind(workdir / "callgrind.out")
    log = out / f"{source.name}-server.log"
    log.unlink(missing_ok=True)  # the server appends to it
    started = time.monotonic()
    say(f"{source.label}: starting the server under callgrind")
    with handler_server(
        workdir,
        root=source.root,
        log_path=log,
        argv_prefix=callgrind.argv_prefix(),
        start_timeout_s=START_TIMEOUT_S,
        stop_grace_s=STOP_GRACE_S,
    ) as (server, secret):
        callgrind.pid = server.pid
        startup_s = time.monotonic() - started
        say(f"  up after {startup_s:.0f} s; warming up, then {work.messages:,} messages")
        result = trio.run(drive, server.port, secret, callgrind, work)
    for name in ("relay", "connect"):
        kept = out / f"callgrind-{source.name}-{name}.out"
        shutil.copyfile(result[name]["dump"], kept)
        result[name]["dump"] = str(kept)
    result["startup_s"] = startup_s
    result["seconds"] = time.monotonic() - started
    relay, connect = result["relay"], result["connect"]
    say(
        f"  {relay['delivered']:,} delivered: {relay['instructions']:,} instructions; "
        f"{connect['bound']:,} connect+bind: {connect['instructions']:,} "
        f"({result['seconds']:.0f} s)"
    )
    return result


ROWS: Final = (
    # (figure, section, key); the first two are the headline
    ("instructions per delivered message", "relay", "per_delivered_message"),
    ("instructions per connect+bind", "connect", "per_connect_bind"),
    ("instructions, relay window", "relay", "instructions"),
    ("messages delivered (recipients' copies)", "relay", "delivered"),
    # coalesced per 100 ms: a slower server sends fewer per message, and counts that work too
    ("receipt frames seen by the senders", "relay", "receipts"),
    ("instructions, connect window", "connect", "instructions"),
    ("connections bound", "connect", "bound"),
)


def failure(error: BaseException) -> str:
    """A failure in one line: its first innermost cause (trio's nurseries wrap errors in
    groups, whose own message names none)."""
    while isinstance(error, BaseExceptionGroup) and error.exceptions:
        error = error.exceptions[0]
    return f"{type(error).__name__}: {error}"


def _ratio(current: Any, baseline: Any) -> float | None:
    return current / baseline if current is not None and baseline else None


def figures(trees: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The table's rows: each figure for each tree, and the ratio current / baseline."""
    rows = []
    for figure, section, key in ROWS:
        row: dict[str, Any] = {"figure": figure}
        for name, tree in trees.items():
            row[name] = tree.get(section, {}).get(key)
        if "baseline" in trees:
            row["ratio"] = _ratio(row["current"], row["baseline"])
        rows.append(row)
    return rows


def table(rows: list[dict[str, Any]], labels: dict[str, str]) -> str:
    """Markdown: counts with thousands separators, ratios to three decimals."""
    names = [name for name in ("baseline", "current") if name in labels]
    head = ["figure", *(labels[name] for name in names)]
    if "baseline" in labels:
        head.append("current / baseline")
    lines = ["| " + " | ".join(head) + " |", "| --- |" + " ---: |" * (len(head) - 1)]
    for row in rows:
        cells = [row["figure"]]
        cells += ["-" if row[name] is None else f"{round(row[name]):,}" for name in names]
        if "baseline" in labels:
            cells.append("-" if row["ratio"] is None else f"{row['ratio']:.3f}x")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


@contextlib.contextmanager
def _trees(compare: str | None, say: Callable[[str], None]) -> Iterator[list[Source]]:
    """The trees to measure, the baseline (if any) first."""
    if compare is None:
        yield [CURRENT]
        return
    with comparing.checkout(compare) as baseline:
        say(f"baseline: {compare} = {baseline.commit[:7]}, in a worktree at {baseline.root}")
        yield [baseline, CURRENT]


def run(
    work: Workload,
    *,
    out: Path = DEFAULT_OUT,
    compare: str | None = None,
    say: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Measure the working tree (and GIT_REF's, first) and write instructions.json and
    instructions.md into `out`; returns the report."""
    started = time.monotonic()
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"workload": asdict(work), "meta": {}, "trees": {}}
    with _sigterm_unwinds(), _trees(compare, say) as sources, temp_workdir() as scratch:
        for source in sources:
            strict = compare is not None
            report["meta"][source.name] = _meta("instructions", 1, "raw", source, strict=strict)
            try:
                report["trees"][source.name] = measure(source, work, Path(scratch), out, say)
            except Exception as error:  # the other tree still counts, as in the suite
                reason = failure(error)
                say(f"  FAILED: {reason}; server log: {out / f'{source.name}-server.log'}")
                report["trees"][source.name] = {"error": reason}
            if source.ref:
                report["meta"][source.name]["compiled"] = comparing.compiled_modules(source.root)
    labels = {
        source.name: source.label
        + (f" ({source.commit[:7]})" if source.commit else "")
        + (" + uncommitted" if report["meta"][source.name]["uncommitted"] else "")
        for source in sources
    }
    report["labels"] = labels
    report["rows"] = figures(report["trees"])
    report["seconds"] = time.monotonic() - started
    markdown = (
        f"Server instructions (callgrind Ir, all threads) for {work.messages:,} "
        f"send_message over {work.pairs} pairs (window {work.window}) and "
        f"{work.connects:,} connect+bind ({work.concurrency} at a time)\n\n"
        + table(report["rows"], labels)
        + "\n"
    )
    (out / "instructions.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "instructions.md").write_text(markdown)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.instructions",
        description="Instructions the server executes per delivered message and per "
        "connect+bind, counted by callgrind for a fixed workload.",
    )
    parser.add_argument(
        "--compare",
        metavar="GIT_REF",
        help="also count GIT_REF's server (checked out in a temporary git worktree) and "
        "report the ratios current / baseline",
    )
    defaults = Workload()
    parser.add_argument(
        "--messages", type=int, default=defaults.messages, help="send_message counted"
    )
    parser.add_argument(
        "--connects", type=int, default=defaults.connects, help="connect+bind counted"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory")
    args = parser.parse_args(argv)
    if args.messages < 1 or args.connects < 1:
        parser.error("--messages and --connects must be at least 1")
    missing = [tool for tool in (VALGRIND, CALLGRIND_CONTROL) if shutil.which(tool) is None]
    if missing:
        parser.error(f"not found on PATH: {', '.join(missing)} (install valgrind)")
    if args.compare:
        try:
            comparing.resolve(args.compare)
        except ValueError as error:
            parser.error(str(error))
    work = Workload(messages=args.messages, connects=args.connects)
    # The clients run here: off the server's core, as the suite's generator is.
    cpus = usable_cpus(GENERATOR_CPUS)
    if cpus:
        os.sched_setaffinity(0, cpus)
    try:
        report = run(work, out=args.out, compare=args.compare)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    print()
    print((args.out / "instructions.md").read_text())
    print(f"took {report['seconds']:.0f} s; written to {args.out}")
    failed = [name for name, tree in report["trees"].items() if "error" in tree]
    if failed:
        print(f"failed to count: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
