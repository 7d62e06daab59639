"""The scenarios of the benchmark suite, their sizes per profile, and their targets.

Each scenario starts its own server(s) for every run (runs stay independent), drives one
generator job per run, and turns generator results plus server readings into flat metrics.
Medians over the runs are what the report quotes; every run is kept in the JSON.

Pinning: the server gets core 0 and the generator core 1, so neither steals the other's CPU;
CPU seconds are read from `/proc` between checkpoints, which makes "per server CPU-second"
figures stable even when wall-clock throughput is not (the machine is shared and noisy).
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from benchmarks import seed as seeding
from benchmarks.runner import run_loadgen, window
from benchmarks.servers import (
    ServerProcess,
    echo_server,
    handler_server,
    port_open,
    temp_workdir,
)

SERVER_CPUS: Final = (0,)
GENERATOR_CPUS: Final = (1,)
POSTGRES_DSN: Final = "postgresql://postgres@127.0.0.1:5432/test"
REDIS_URL: Final = "redis://127.0.0.1:6379/0"
KIB: Final = 1024


@dataclass(frozen=True)
class Profile:
    """Sizes of every scenario for one kind of run (full, quick, smoke)."""

    name: str
    runs: int
    params: dict[str, dict[str, Any]]
    stop_grace_s: float = 10.0


_RELAY = {"pairs": 100, "window": 8, "content_bytes": 100}

PROFILES: Final = {
    "full": Profile(
        "full",
        3,
        {
            "ceiling": {**_RELAY, "warmup_s": 2, "duration_s": 8, "count": 3000, "concurrency": 50},
            "a": {**_RELAY, "warmup_s": 3, "duration_s": 10},
            "b": {"users": 1000, "rate": 2000, "warmup_s": 3, "duration_s": 20},
            "c": {"steps": [1000, 5000, 10000], "concurrency": 100},
            "d": {"count": 3000, "concurrency": 50},
            "e": {"chats": 100, "per_chat": 100},
            "f": {"chats": 200, "per_chat": 1000, "repeats": 2},
            "g": {**_RELAY, "warmup_s": 3, "duration_s": 10},
        },
    ),
    "quick": Profile(
        "quick",
        1,
        {
            "ceiling": {**_RELAY, "warmup_s": 1, "duration_s": 4, "count": 1500, "concurrency": 50},
            "a": {**_RELAY, "warmup_s": 2, "duration_s": 5},
            "b": {"users": 1000, "rate": 2000, "warmup_s": 2, "duration_s": 8},
            "c": {"steps": [1000, 5000, 10000], "concurrency": 100},
            "d": {"count": 1500, "concurrency": 50},
            "e": {"chats": 100, "per_chat": 100},
            "f": {"chats": 200, "per_chat": 100, "repeats": 2},
            "g": {**_RELAY, "warmup_s": 2, "duration_s": 5},
        },
    ),
    "smoke": Profile(
        "smoke",
        1,
        {
            "ceiling": {
                "pairs": 3,
                "window": 4,
                "warmup_s": 0.2,
                "duration_s": 0.5,
                "count": 20,
                "concurrency": 10,
            },
            "a": {"pairs": 3, "window": 4, "warmup_s": 0.2, "duration_s": 0.6},
            "b": {"users": 20, "rate": 200, "warmup_s": 0.2, "duration_s": 0.6},
            "c": {"steps": [10, 30], "concurrency": 10, "settle_s": 0.2, "warmup": 2},
            "d": {"count": 30, "concurrency": 10},
            "e": {"chats": 3, "per_chat": 10},
            "f": {"chats": 3, "per_chat": 20, "repeats": 2},
            "g": {"pairs": 3, "window": 4, "warmup_s": 0.2, "duration_s": 0.6},
        },
        stop_grace_s=1.0,
    ),
}


@dataclass
class Context:
    """What a scenario needs from the run: sizes, where to write, how to connect."""

    profile: Profile
    runs: int
    logs: Path
    client: str = "raw"
    say: Callable[[str], None] = print
    scratch: Path | None = None

    def params(self, scenario: str) -> dict[str, Any]:
        return dict(self.profile.params[scenario])

    def log(self, name: str) -> Path:
        self.logs.mkdir(parents=True, exist_ok=True)
        return self.logs / name

    @contextlib.contextmanager
    def attempt(self, out: Outcome, label: str) -> Iterator[None]:
        """Run one repetition; a failure is recorded and the other runs still count."""
        try:
            yield
        except Exception as error:
            self.say(f"  {label} failed: {str(error).splitlines()[0]}")
            out.failed_runs.append(f"{label}: {type(error).__name__}: {error}")

    @contextlib.contextmanager
    def handler(
        self,
        workdir: Path,
        name: str,
        *,
        cpus: tuple[int, ...] | None = SERVER_CPUS,
        **options: Any,
    ) -> Iterator[tuple[ServerProcess, str]]:
        """The handler with this profile's stop grace, logging to logs/NAME-server.log."""
        with handler_server(
            workdir,
            cpus=cpus,
            log_path=self.log(f"{name}-server.log"),
            stop_grace_s=self.profile.stop_grace_s,
            **options,
        ) as (server, secret):
            yield server, secret
        if server.killed:
            self.say(
                f"  note: the server was still running {self.profile.stop_grace_s:.0f} s after "
                "SIGTERM and was killed"
            )


@dataclass
class Row:
    """One line of the results table."""

    metric: str
    value: float | None
    unit: str
    per_cpu_s: float | None = None
    per_cpu_unit: str = ""
    target: str | None = None
    ok: bool | None = None

    def as_dict(self) -> dict[str, Any]:
        return self.__dict__.copy()


@dataclass
class Outcome:
    """A scenario's report section."""

    title: str
    params: dict[str, Any]
    runs: list[dict[str, Any]] = field(default_factory=list)
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    skipped: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    failed_runs: list[str] = field(default_factory=list)

    def median(self, key: str) -> float | None:
        return median_of(self.runs, key)

    def as_dict(self) -> dict[str, Any]:
        numeric = sorted(
            {k for run in self.runs for k, v in run.items() if isinstance(v, int | float)}
        )
        return {
            "title": self.title,
            "params": self.params,
            "skipped": self.skipped,
            "median": {key: self.median(key) for key in numeric},
            "rows": [row.as_dict() for row in self.rows],
            "runs": self.runs,
            "notes": self.notes,
            "failed_runs": self.failed_runs,
            **self.extra,
        }


def median_of(runs: list[dict[str, Any]], key: str) -> float | None:
    values = [run[key] for run in runs if isinstance(run.get(key), int | float)]
    return statistics.median(values) if values else None


def at_least(value: float | None, target: float) -> bool | None:
    return None if value is None else value >= target


def at_most(value: float | None, target: float) -> bool | None:
    return None if value is None else value <= target


def _per(amount: float | None, cpu: float | None) -> float | None:
    if amount is None or not cpu:
        return None
    return amount / cpu


def _relay_metrics(result: dict[str, Any], win: dict[str, float]) -> dict[str, Any]:
    cpu = win.get("server_cpu_s")
    wall = win["wall_s"]
    delivered_per_s = result["delivered_per_s"]
    return {
        "delivered_per_s": delivered_per_s,
        "wall_s": wall,
        "server_cpu_s": cpu,
        "server_cpu_frac": cpu / wall if cpu is not None else None,
        "delivered_per_server_cpu_s": _per(delivered_per_s * wall, cpu),
        "generator_cpu_frac": win["generator_cpu_s"] / wall,
        "other_cpu_frac": win["other_cpu_frac"],
        "delivered_per_generator_cpu_s": _per(delivered_per_s * wall, win["generator_cpu_s"]),
        "delivery_p50_ms": result["delivery_latency"].get("p50_ms"),
        "delivery_p99_ms": result["delivery_latency"].get("p99_ms"),
        "ack_p99_ms": result["ack_latency"].get("p99_ms"),
        "errors": result["errors"],
        "histogram": result["delivery_histogram"],
    }


def _relay_job(params: dict[str, Any], port: int, secret: str, client: str) -> dict[str, Any]:
    return {
        "kind": "relay",
        "port": port,
        "secret": secret,
        "client": client,
        "pairs": params["pairs"],
        "window": params["window"],
        "content_bytes": params.get("content_bytes", 100),
        "warmup_s": params["warmup_s"],
        "duration_s": params["duration_s"],
    }


# ----------------------------------------------------------------------------- ceiling


def scenario_ceiling(ctx: Context) -> Outcome:
    """The generator's own limit, against relays that do (almost) nothing."""
    params = ctx.params("ceiling")
    out = Outcome("Generator ceiling and bare-stack reference (no auth, no storage)", params)
    variants = [
        ("raw", "raw", "generator ceiling, raw client vs raw relay"),
        ("raw", "trio-websocket", "generator ceiling, trio-websocket client vs raw relay"),
        ("quart", ctx.client, "bare Quart-Trio relay on Hypercorn (stack reference)"),
    ]
    series: dict[str, list[dict[str, Any]]] = {}
    for stack, client, label in variants:
        for run in range(ctx.runs):
            with ctx.attempt(out, f"{label} run {run + 1}"):
                ctx.say(f"  {label}: run {run + 1}/{ctx.runs}")
                with echo_server(ctx.log(f"echo-{stack}.log"), stack, cpus=SERVER_CPUS) as server:
                    job = _relay_job(params, server.port, "x" * 32, client)
                    result, readings = run_loadgen(
                        job, server=server, cpus=GENERATOR_CPUS, log_path=ctx.log("ceiling.log")
                    )
                metrics = _relay_metrics(result, window(readings, "measure_start", "measure_end"))
                metrics.update(variant=label, stack=stack, client=client)
                series.setdefault(label, []).append(metrics)
                out.runs.append(metrics)
    fixed = ctx.params("b")
    for run in range(ctx.runs):
        with ctx.attempt(out, f"run {run + 1}"):
            ctx.say(f"  latency floor at (b)'s load vs raw relay: run {run + 1}/{ctx.runs}")
            with echo_server(ctx.log("echo-raw.log"), "raw", cpus=SERVER_CPUS) as server:
                job = {"kind": "open_loop", "port": server.port, "client": ctx.client, **fixed}
                result, readings = run_loadgen(
                    job, server=server, cpus=GENERATOR_CPUS, log_path=ctx.log("ceiling.log")
                )
            win = window(readings, "measure_start", "measure_end")
            series.setdefault("latency floor", []).append(
                {
                    "variant": "latency floor",
                    "p50_ms": result["delivery_latency"].get("p50_ms"),
                    "p99_ms": result["delivery_latency"].get("p99_ms"),
                    "send_lag_p99_ms": result["send_lag"].get("p99_ms"),
                    "generator_cpu_frac": win["generator_cpu_s"] / win["wall_s"],
                    "other_cpu_frac": win["other_cpu_frac"],
                }
            )
            out.runs.append(series["latency floor"][-1])
    for run in range(ctx.runs):
        with ctx.attempt(out, f"run {run + 1}"):
            ctx.say(f"  connect ceiling vs raw relay: run {run + 1}/{ctx.runs}")
            with echo_server(ctx.log("echo-raw.log"), "raw", cpus=SERVER_CPUS) as server:
                job = {
                    "kind": "connect",
                    "port": server.port,
                    "client": ctx.client,
                    "count": params["count"],
                    "concurrency": params["concurrency"],
                    "sources": 16,
                }
                result, readings = run_loadgen(
                    job, server=server, cpus=GENERATOR_CPUS, log_path=ctx.log("ceiling.log")
                )
            win = window(readings, "measure_start", "measure_end")
            series.setdefault("connect", []).append(
                {
                    "variant": "connect ceiling",
                    "connects_per_s": result["connects_per_s"],
                    "generator_cpu_frac": win["generator_cpu_s"] / win["wall_s"],
                    "connects_per_generator_cpu_s": _per(result["bound"], win["generator_cpu_s"]),
                }
            )
            out.runs.append(series["connect"][-1])
    for stack, _client, label in variants:
        runs = series.get(label, [])
        rate = median_of(runs, "delivered_per_s")
        gen_frac = median_of(runs, "generator_cpu_frac")
        note = f" (generator core {gen_frac:.0%} busy)" if gen_frac is not None else ""
        if stack == "raw":
            out.rows.append(
                Row(
                    f"{label}: delivered msg/s{note}",
                    rate,
                    "msg/s",
                    median_of(runs, "delivered_per_generator_cpu_s"),
                    "msg per generator CPU-s",
                )
            )
        else:
            out.rows.append(
                Row(
                    f"{label}: delivered msg/s",
                    rate,
                    "msg/s",
                    median_of(runs, "delivered_per_server_cpu_s"),
                    "msg per server CPU-s",
                )
            )
    floor = series.get("latency floor", [])
    out.rows.append(
        Row(
            f"latency floor: (b)'s {fixed['rate']:,} msg/s vs raw relay, p99",
            median_of(floor, "p99_ms"),
            "ms",
        )
    )
    out.rows.append(Row("latency floor: p50", median_of(floor, "p50_ms"), "ms"))
    connects = series.get("connect", [])
    out.rows.append(
        Row(
            "generator ceiling: connect+bind/s vs raw relay",
            median_of(connects, "connects_per_s"),
            "conn/s",
            median_of(connects, "connects_per_generator_cpu_s"),
            "conn per generator CPU-s",
        )
    )
    out.notes.append(
        "The generator's capacity is its figure per generator CPU-second: that many per second "
        "is what one saturated generator core could drive. A handler figure well below it is "
        "the handler's own."
    )
    out.extra["series"] = {k: [_strip(r) for r in v] for k, v in series.items()}
    return out


def _strip(run: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in run.items() if k != "histogram"}


# ----------------------------------------------------------------------------- (a)


def scenario_a(ctx: Context) -> Outcome:
    """Saturated relay: 100 pairs, 8 in flight per user."""
    params = ctx.params("a")
    out = Outcome(
        f"(a) Saturated relay: {params['pairs']} pairs, {params['window']} unacknowledged "
        f"send_message per user, {params.get('content_bytes', 100)}-byte contents",
        params,
    )
    with temp_workdir(ctx.scratch) as tmp:
        for run in range(ctx.runs):
            with ctx.attempt(out, f"run {run + 1}"):
                ctx.say(f"  run {run + 1}/{ctx.runs}")
                with ctx.handler(Path(tmp), f"a-{run}") as (
                    server,
                    secret,
                ):
                    job = _relay_job(params, server.port, secret, ctx.client)
                    result, readings = run_loadgen(
                        job, server=server, cpus=GENERATOR_CPUS, log_path=ctx.log("a.log")
                    )
                out.runs.append(
                    _relay_metrics(result, window(readings, "measure_start", "measure_end"))
                )
    rate = out.median("delivered_per_s")
    out.rows += [
        Row(
            "delivered msg/s",
            rate,
            "msg/s",
            out.median("delivered_per_server_cpu_s"),
            "msg per server CPU-s",
            ">= 5000",
            at_least(rate, 5000),
        ),
        Row("server CPU (fraction of one core)", out.median("server_cpu_frac"), "core"),
        Row("generator CPU (fraction of one core)", out.median("generator_cpu_frac"), "core"),
        Row("delivery latency p50 (closed loop)", out.median("delivery_p50_ms"), "ms"),
        Row("delivery latency p99 (closed loop)", out.median("delivery_p99_ms"), "ms"),
        Row("other processes on the machine (noise)", out.median("other_cpu_frac"), "core"),
    ]
    return out


# ----------------------------------------------------------------------------- (b)


def scenario_b(ctx: Context) -> Outcome:
    """Fixed offered load: latency and server CPU below saturation."""
    params = ctx.params("b")
    out = Outcome(
        f"(b) Fixed offered load: {params['rate']} msg/s over {params['users']} users "
        "(Poisson arrivals, latency from the intended send time)",
        params,
    )
    with temp_workdir(ctx.scratch) as tmp:
        for run in range(ctx.runs):
            with ctx.attempt(out, f"run {run + 1}"):
                ctx.say(f"  run {run + 1}/{ctx.runs}")
                with ctx.handler(Path(tmp), f"b-{run}") as (
                    server,
                    secret,
                ):
                    job = {
                        "kind": "open_loop",
                        "port": server.port,
                        "secret": secret,
                        "client": ctx.client,
                        **params,
                    }
                    result, readings = run_loadgen(
                        job, server=server, cpus=GENERATOR_CPUS, log_path=ctx.log("b.log")
                    )
                win = window(readings, "measure_start", "measure_end")
                cpu = win["server_cpu_s"]
                latency = result["delivery_latency"]
                out.runs.append(
                    {
                        "delivered_per_s": result["delivered_per_s"],
                        "sent_per_s": result["sent_per_s"],
                        "lost": result["lost"],
                        "p50_ms": latency.get("p50_ms"),
                        "p99_ms": latency.get("p99_ms"),
                        "p999_ms": latency.get("p999_ms"),
                        "max_ms": latency.get("max_ms"),
                        "ack_p50_ms": result["ack_latency"].get("p50_ms"),
                        "ack_p99_ms": result["ack_latency"].get("p99_ms"),
                        "send_lag_p99_ms": result["send_lag"].get("p99_ms"),
                        "server_cpu_frac": cpu / win["wall_s"],
                        "delivered_per_server_cpu_s": _per(result["delivered"], cpu),
                        "generator_cpu_frac": win["generator_cpu_s"] / win["wall_s"],
                        "other_cpu_frac": win["other_cpu_frac"],
                        "errors": result["errors"],
                        "histogram": result["delivery_histogram"],
                        "timeline": result["timeline"],
                    }
                )
    p99 = out.median("p99_ms")
    cpu_frac = out.median("server_cpu_frac")
    out.rows += [
        Row(
            "delivered msg/s",
            out.median("delivered_per_s"),
            "msg/s",
            out.median("delivered_per_server_cpu_s"),
            "msg per server CPU-s",
        ),
        Row("delivery latency p50", out.median("p50_ms"), "ms"),
        Row("delivery latency p99", p99, "ms", target="<= 10", ok=at_most(p99, 10)),
        Row("delivery latency max", out.median("max_ms"), "ms"),
        Row("ack latency p99", out.median("ack_p99_ms"), "ms"),
        Row(
            "generator's own send lag p99 (its share of the latency)",
            out.median("send_lag_p99_ms"),
            "ms",
        ),
        Row(
            "server CPU (fraction of one core)",
            cpu_frac,
            "core",
            target="<= 0.50",
            ok=at_most(cpu_frac, 0.5),
        ),
        Row("messages not delivered by the end", out.median("lost"), "msg"),
        Row("generator CPU (fraction of one core)", out.median("generator_cpu_frac"), "core"),
        Row("other processes on the machine (noise)", out.median("other_cpu_frac"), "core"),
    ]
    return out


# ----------------------------------------------------------------------------- (c)


def scenario_c(ctx: Context) -> Outcome:
    """Idle memory per authenticated connection (RSS delta / connections)."""
    params = ctx.params("c")
    steps: list[int] = params["steps"]
    out = Outcome(
        "(c) Idle memory per authenticated connection: server RSS growth / connections "
        f"at {', '.join(f'{s:,}' for s in steps)}",
        params,
    )
    with temp_workdir(ctx.scratch) as tmp:
        for run in range(ctx.runs):
            with ctx.attempt(out, f"run {run + 1}"):
                ctx.say(f"  run {run + 1}/{ctx.runs}")
                with ctx.handler(Path(tmp), f"c-{run}") as (
                    server,
                    secret,
                ):
                    job = {
                        "kind": "idle",
                        "port": server.port,
                        "secret": secret,
                        "client": ctx.client,
                        "sources": 16,
                        **params,
                    }
                    result, readings = run_loadgen(
                        job, server=server, cpus=GENERATOR_CPUS, log_path=ctx.log("c.log")
                    )
                base = readings["held_0"]["server_rss"]
                metrics: dict[str, Any] = {"base_rss_mib": base / 2**20}
                previous = (0, base)
                for step in result["steps"]:
                    held = readings[f"held_{step['target']}"]
                    count = int(held["connections"])
                    rss = held["server_rss"]
                    metrics[f"held_{step['target']}"] = count
                    metrics[f"rss_mib_{step['target']}"] = rss / 2**20
                    metrics[f"per_conn_kib_{step['target']}"] = (rss - base) / max(count, 1) / KIB
                    metrics[f"marginal_kib_{step['target']}"] = (
                        (rss - previous[1]) / max(count - previous[0], 1) / KIB
                    )
                    metrics[f"connect_s_{step['target']}"] = step["connect_s"]
                    previous = (count, rss)
                out.runs.append(metrics)
    for step in steps:
        per = out.median(f"per_conn_kib_{step}")
        last = step == steps[-1]
        out.rows.append(
            Row(
                f"RSS per connection at {step:,}",
                per,
                "KiB",
                target="<= 30" if last else None,
                ok=at_most(per, 30) if last else None,
            )
        )
    held_count = out.median(f"held_{steps[-1]}")
    out.rows.append(
        Row(
            "connections held on one worker",
            held_count,
            "conn",
            target=f">= {steps[-1]:,}",
            ok=at_least(held_count, steps[-1]),
        )
    )
    out.rows.append(Row("server RSS before connections", out.median("base_rss_mib"), "MiB"))
    return out


# ----------------------------------------------------------------------------- (d)


def scenario_d(ctx: Context) -> Outcome:
    """Connect + bind rate: TCP, upgrade, token check, `authenticated`."""
    params = ctx.params("d")
    out = Outcome(
        f"(d) Connect + bind: {params['count']:,} fresh users, "
        f"{params['concurrency']} connecting at a time",
        params,
    )
    with temp_workdir(ctx.scratch) as tmp:
        for run in range(ctx.runs):
            with ctx.attempt(out, f"run {run + 1}"):
                ctx.say(f"  run {run + 1}/{ctx.runs}")
                with ctx.handler(Path(tmp), f"d-{run}") as (
                    server,
                    secret,
                ):
                    job = {
                        "kind": "connect",
                        "port": server.port,
                        "secret": secret,
                        "client": ctx.client,
                        "sources": 16,
                        **params,
                    }
                    result, readings = run_loadgen(
                        job, server=server, cpus=GENERATOR_CPUS, log_path=ctx.log("d.log")
                    )
                win = window(readings, "measure_start", "measure_end")
                out.runs.append(
                    {
                        "connects_per_s": result["connects_per_s"],
                        "bound": result["bound"],
                        "connects_per_server_cpu_s": _per(result["bound"], win["server_cpu_s"]),
                        "server_cpu_frac": win["server_cpu_s"] / win["wall_s"],
                        "generator_cpu_frac": win["generator_cpu_s"] / win["wall_s"],
                        "other_cpu_frac": win["other_cpu_frac"],
                        "p50_ms": result["latency"].get("p50_ms"),
                        "p99_ms": result["latency"].get("p99_ms"),
                        "errors": result["errors"],
                    }
                )
    rate = out.median("connects_per_s")
    out.rows += [
        Row(
            "connect+bind/s",
            rate,
            "conn/s",
            out.median("connects_per_server_cpu_s"),
            "conn per server CPU-s",
            ">= 1500",
            at_least(rate, 1500),
        ),
        Row("connect+bind latency p50", out.median("p50_ms"), "ms"),
        Row("connect+bind latency p99", out.median("p99_ms"), "ms"),
        Row("server CPU (fraction of one core)", out.median("server_cpu_frac"), "core"),
        Row("other processes on the machine (noise)", out.median("other_cpu_frac"), "core"),
    ]
    return out


def _run_on_seeded_copies(
    ctx: Context,
    out: Outcome,
    key: str,
    *,
    owner: str,
    sender: str,
    job: dict[str, Any],
    record: Callable[[dict[str, Any], dict[str, dict[str, float]]], None],
) -> None:
    """Seed one template database, then per run: a fresh copy of it, a handler on the copy,
    one generator `job` against the handler, and `record(result, readings)`."""
    params = ctx.params(key)
    total = params["chats"] * params["per_chat"]
    with temp_workdir(ctx.scratch) as tmp_name:
        tmp = Path(tmp_name)
        template = tmp / "template.db"
        ctx.say(f"  seeding {total:,} messages")
        out.extra["seeding"] = seeding.seed(
            template,
            owner=owner,
            chats=params["chats"],
            per_chat=params["per_chat"],
            sender=sender,
            workdir=tmp,
        )
        for run in range(ctx.runs):
            with ctx.attempt(out, f"run {run + 1}"):
                ctx.say(f"  run {run + 1}/{ctx.runs}")
                db = tmp / f"run-{run}.db"
                seeding.copy_database(template, db)
                with ctx.handler(tmp, f"{key}-{run}", db_path=db) as (server, secret):
                    full_job = {
                        **job,
                        "port": server.port,
                        "secret": secret,
                        "client": ctx.client,
                    }
                    result, readings = run_loadgen(
                        full_job, server=server, cpus=GENERATOR_CPUS, log_path=ctx.log(f"{key}.log")
                    )
                record(result, readings)


# ----------------------------------------------------------------------------- (e)


def scenario_e(ctx: Context) -> Outcome:
    """Backlog: a user with undelivered messages over many chats binds."""
    params = ctx.params("e")
    total = params["chats"] * params["per_chat"]
    out = Outcome(
        f"(e) Backlog: a user with {total:,} undelivered messages over {params['chats']} "
        "chats binds",
        params,
    )

    def record(result: dict[str, Any], readings: dict[str, dict[str, float]]) -> None:
        win = window(readings, "measure_start", "measure_end")
        out.runs.append(
            {
                "elapsed_s": result["elapsed_s"],
                "bind_s": result["bind_s"],
                "messages": result["messages"],
                "chats": result["chats"],
                "frames": result["frames"],
                "bytes": result["bytes"],
                "messages_per_s": result["messages_per_s"],
                "server_cpu_s": win["server_cpu_s"],
                "other_cpu_frac": win["other_cpu_frac"],
                "messages_per_server_cpu_s": _per(result["messages"], win["server_cpu_s"]),
            }
        )

    _run_on_seeded_copies(
        ctx,
        out,
        "e",
        owner="target",
        sender="peer",
        job={"kind": "backlog", "user_id": "target", "expect_messages": total},
        record=record,
    )
    out.rows += [
        Row(
            "time to receive the whole backlog",
            out.median("elapsed_s"),
            "s",
            out.median("messages_per_server_cpu_s"),
            "msg per server CPU-s",
        ),
        Row("time to `authenticated`", out.median("bind_s"), "s"),
        Row("backlog bytes received", out.median("bytes"), "B"),
        Row(
            "messages received",
            out.median("messages"),
            "msg",
            target=f"= {total:,}",
            ok=None if out.median("messages") is None else out.median("messages") == total,
        ),
    ]
    return out


# ----------------------------------------------------------------------------- (f)


def scenario_f(ctx: Context) -> Outcome:
    """`fetch_chats` of a user with a long history in many chats."""
    params = ctx.params("f")
    total = params["chats"] * params["per_chat"]
    out = Outcome(
        f"(f) fetch_chats for a user with {params['chats']} chats x {params['per_chat']:,} "
        "messages",
        params,
    )

    def record(result: dict[str, Any], readings: dict[str, dict[str, float]]) -> None:
        first = result["rounds"][0]
        last = result["rounds"][-1]
        cpu_first = window(readings, "fetch_0_start", "fetch_0_end")["server_cpu_s"]
        n = len(result["rounds"]) - 1
        cpu_last = window(readings, f"fetch_{n}_start", f"fetch_{n}_end")["server_cpu_s"]
        out.runs.append(
            {
                "first_s": first["elapsed_s"],
                "repeat_s": last["elapsed_s"],
                "bytes": first["bytes"],
                "chats": first["chats"],
                "messages": first["messages"],
                "mib_per_s": first["bytes"] / 2**20 / first["elapsed_s"],
                "server_cpu_s_first": cpu_first,
                "server_cpu_s_repeat": cpu_last,
                "messages_per_server_cpu_s": _per(first["messages"], cpu_first),
            }
        )

    _run_on_seeded_copies(
        ctx,
        out,
        "f",
        owner="reader",
        sender="owner",
        job={"kind": "fetch", "user_id": "reader", "repeats": params.get("repeats", 2)},
        record=record,
    )
    messages = out.median("messages")
    out.rows += [
        Row(
            "fetch_chats time (first on a fresh server)",
            out.median("first_s"),
            "s",
            out.median("messages_per_server_cpu_s"),
            "msg per server CPU-s",
        ),
        Row("fetch_chats time (repeat, same connection)", out.median("repeat_s"), "s"),
        Row("bytes received", out.median("bytes"), "B"),
        Row("throughput", out.median("mib_per_s"), "MiB/s"),
        Row(
            "messages returned",
            messages,
            "msg",
            target=f"= {total:,}",
            ok=None if messages is None else messages == total,
        ),
    ]
    return out


# ----------------------------------------------------------------------------- (g)


def scale_unavailable() -> str | None:
    """Why (g) cannot run here, or None."""
    import importlib.util

    if not port_open("127.0.0.1", 5432):
        return "PostgreSQL is not listening on 127.0.0.1:5432"
    if not port_open("127.0.0.1", 6379):
        return "Redis is not listening on 127.0.0.1:6379"
    for module in (
        "handler.app",
        "handler.store.postgres",
        "handler.bus.redis",
        "psycopg",
        "coredis",
        "hypercorn",
    ):
        try:
            if importlib.util.find_spec(module) is None:
                return f"module {module} is not available"
        except ImportError:
            return f"module {module} is not available"
    return None


def scenario_g(ctx: Context) -> Outcome:
    """Two Hypercorn workers on PostgreSQL + Redis against one."""
    params = ctx.params("g")
    out = Outcome(
        "(g) PostgreSQL + Redis: 2 Hypercorn workers vs 1, saturated relay as in (a)", params
    )
    reason = scale_unavailable()
    if reason:
        out.skipped = reason
        ctx.say(f"  skipped: {reason}")
        return out
    backends = ("postgres", "redis-server")
    series: dict[int, list[dict[str, Any]]] = {1: [], 2: []}
    with temp_workdir(ctx.scratch) as tmp:
        for workers in (1, 2):
            cpus = SERVER_CPUS if workers == 1 else None
            for run in range(ctx.runs):
                with ctx.attempt(out, f"{workers} worker(s) run {run + 1}"):
                    ctx.say(f"  {workers} worker(s): run {run + 1}/{ctx.runs}")
                    with ctx.handler(
                        Path(tmp),
                        f"g-{workers}-{run}",
                        cpus=cpus,
                        workers=workers,
                        postgres_dsn=POSTGRES_DSN,
                        redis_url=REDIS_URL,
                    ) as (server, secret):
                        job = _relay_job(params, server.port, secret, ctx.client)
                        result, readings = run_loadgen(
                            job,
                            server=server,
                            cpus=GENERATOR_CPUS,
                            log_path=ctx.log("g.log"),
                            backends=backends,
                        )
                    win = window(readings, "measure_start", "measure_end")
                    metrics = _relay_metrics(result, win)
                    metrics["workers"] = workers
                    metrics["backend_cpu_frac"] = win.get("backend_cpu_s", 0.0) / win["wall_s"]
                    metrics["delivered_per_total_cpu_s"] = _per(
                        result["delivered_per_s"] * win["wall_s"],
                        (win.get("server_cpu_s") or 0.0) + win.get("backend_cpu_s", 0.0),
                    )
                    series[workers].append(metrics)
                    out.runs.append(metrics)
    one, two = series[1], series[2]
    rate1, rate2 = median_of(one, "delivered_per_s"), median_of(two, "delivered_per_s")
    eff1 = median_of(one, "delivered_per_server_cpu_s")
    eff2 = median_of(two, "delivered_per_server_cpu_s")
    projected = 2 * eff2 / eff1 if eff1 and eff2 else None
    for workers, runs in series.items():
        out.rows += [
            Row(
                f"{workers} worker(s): delivered msg/s",
                median_of(runs, "delivered_per_s"),
                "msg/s",
                median_of(runs, "delivered_per_server_cpu_s"),
                "msg per server CPU-s",
            ),
            Row(f"{workers} worker(s): handler CPU", median_of(runs, "server_cpu_frac"), "core"),
            Row(
                f"{workers} worker(s): PostgreSQL + Redis CPU",
                median_of(runs, "backend_cpu_frac"),
                "core",
            ),
            Row(
                f"{workers} worker(s): other processes on the machine (noise)",
                median_of(runs, "other_cpu_frac"),
                "core",
            ),
        ]
    out.rows += [
        Row(
            "2 vs 1 worker: msg/s ratio (this 2-core machine)",
            rate2 / rate1 if rate1 and rate2 else None,
            "x",
        ),
        Row(
            "2 vs 1 worker: msg per server CPU-s ratio", eff2 / eff1 if eff1 and eff2 else None, "x"
        ),
        Row(
            "2 workers on 2 dedicated cores, projected: 2 x CPU-s ratio",
            projected,
            "x",
            target=">= 1.6",
            ok=at_least(projected, 1.6),
        ),
    ]
    busy = median_of(one, "server_cpu_frac")
    if busy is not None and busy < 0.9:
        out.notes.append(
            f"One worker used only {busy:.2f} of its core: it waited on something else "
            "(PostgreSQL commits, Redis, the pool), so its msg per CPU-second is not that of a "
            "busy worker (less batching) and the projection is only indicative."
        )
    out.notes.append(
        "One worker is pinned to core 0; two workers may use both cores, which they share "
        "with the generator, PostgreSQL and Redis, so the wall-clock ratio understates them. "
        "The projection assumes each worker gets a core of its own and keeps its measured "
        "msg per CPU-second."
    )
    return out


SCENARIOS: Final[dict[str, Callable[[Context], Outcome]]] = {
    "ceiling": scenario_ceiling,
    "a": scenario_a,
    "b": scenario_b,
    "c": scenario_c,
    "d": scenario_d,
    "e": scenario_e,
    "f": scenario_f,
    "g": scenario_g,
}


def run_scenario(name: str, ctx: Context) -> dict[str, Any]:
    """Run one scenario; a failure becomes an `error` entry instead of stopping the suite."""
    started = time.monotonic()
    try:
        section = SCENARIOS[name](ctx).as_dict()
    except Exception as error:
        ctx.say(f"  FAILED: {error}")
        section = {"title": name, "error": f"{type(error).__name__}: {error}", "rows": []}
    section["seconds"] = time.monotonic() - started
    return section
