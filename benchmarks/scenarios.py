"""The scenarios of the benchmark suite, their sizes per profile, and their targets.

Each scenario is a declaration (`benchmarks.harness.Scenario`) plus what is its own: the
generator job, the figures one run yields, and the table rows from the medians. Starting the
servers, seeding, running the generator, reading CPU and stopping are the harness's, the same
for all. Medians over the runs are what the report quotes; every run is kept in the JSON.

Pinning: the server gets core 0 and the generator core 1, so neither steals the other's CPU;
CPU seconds are read from `/proc` between checkpoints, which makes "per server CPU-second"
figures stable even when wall-clock throughput is not (the machine is shared and noisy).
"""

from __future__ import annotations

import importlib.util
from functools import partial
from typing import Any, Final

from benchmarks.harness import (
    SERVER_CPUS,
    Contacts,
    Context,
    Dataset,
    Headline,
    Measured,
    Outcome,
    Profile,
    Row,
    Scenario,
    Variant,
    at_least,
    at_most,
    median_of,
    per,
)
from benchmarks.servers import Source, port_open

POSTGRES_DSN: Final = "postgresql://postgres@127.0.0.1:5432/test"
REDIS_URL: Final = "redis://127.0.0.1:6379/0"
KIB: Final = 1024

_RELAY = {"pairs": 100, "window": 8, "content_bytes": 100}
_GROUP = {"members": 100, "senders": 10, "rate_per_sender": 1.0, "content_bytes": 100}
_PRESENCE = {"users": 2000, "contacts": 50, "reconnect_share": 0.1, "away_per_s": 20.0}

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
            "h": {"chats": 1000, "per_chat": 5, "repeats": 5},
            "i": {**_GROUP, "warmup_s": 3, "duration_s": 20},
            "j": {**_PRESENCE, "warmup_s": 7, "duration_s": 60, "away_duration_s": 20},
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
            "h": {"chats": 1000, "per_chat": 5, "repeats": 5},
            "i": {**_GROUP, "warmup_s": 2, "duration_s": 8},
            "j": {**_PRESENCE, "warmup_s": 6, "duration_s": 15, "away_duration_s": 10},
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
            "h": {"chats": 3, "per_chat": 2, "repeats": 2},
            "i": {
                "members": 6,
                "senders": 3,
                "rate_per_sender": 5.0,
                "warmup_s": 0.2,
                "duration_s": 0.6,
            },
            "j": {
                "users": 12,
                "contacts": 4,
                "reconnect_share": 0.25,
                "warmup_s": 0.5,
                "duration_s": 2.0,
                "presence_grace_s": 1.0,
                "away_per_s": 1.0,
                "away_s": 2.0,
                "concurrency": 10,
            },
        },
        stop_grace_s=1.0,
    ),
}


def _relay_job(params: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "kind": "relay",
        "pairs": params["pairs"],
        "window": params["window"],
        "content_bytes": params.get("content_bytes", 100),
        "warmup_s": params["warmup_s"],
        "duration_s": params["duration_s"],
        **extra,
    }


def _relay_metrics(run: Measured) -> dict[str, Any]:
    result, win = run.result, run.window()
    cpu = win.get("server_cpu_s")
    wall = win["wall_s"]
    delivered_per_s = result["delivered_per_s"]
    return {
        "delivered_per_s": delivered_per_s,
        "wall_s": wall,
        "server_cpu_s": cpu,
        "server_cpu_frac": cpu / wall if cpu is not None else None,
        "delivered_per_server_cpu_s": per(delivered_per_s * wall, cpu),
        "generator_cpu_frac": win["generator_cpu_s"] / wall,
        "other_cpu_frac": win["other_cpu_frac"],
        "delivered_per_generator_cpu_s": per(delivered_per_s * wall, win["generator_cpu_s"]),
        "delivery_p50_ms": result["delivery_latency"].get("p50_ms"),
        "delivery_p99_ms": result["delivery_latency"].get("p99_ms"),
        "ack_p99_ms": result["ack_latency"].get("p99_ms"),
        "errors": result["errors"],
        "histogram": result["delivery_histogram"],
    }


# ----------------------------------------------------------------------------- ceiling

# (relay stack, generator client or None for the run's --client, series label)
_CEILING_RELAYS: Final = (
    ("raw", "raw", "generator ceiling, raw client vs raw relay"),
    ("raw", "trio-websocket", "generator ceiling, trio-websocket client vs raw relay"),
    ("quart", None, "bare Quart-Trio relay on Hypercorn (stack reference)"),
    ("asgi", None, "bare relay, raw ASGI on Hypercorn (stack reference)"),
    ("trio-websocket", None, "bare relay on trio-websocket (stack reference)"),
    ("websockets", None, "bare relay on asyncio websockets (stack reference)"),
)


def _ceiling_relay(label: str, stack: str, client: str, run: Measured) -> dict[str, Any]:
    metrics = _relay_metrics(run)
    metrics.update(variant=label, stack=stack, client=client)
    return metrics


def _latency_floor(run: Measured) -> dict[str, Any]:
    win = run.window()
    return {
        "variant": "latency floor",
        "p50_ms": run.result["delivery_latency"].get("p50_ms"),
        "p99_ms": run.result["delivery_latency"].get("p99_ms"),
        "send_lag_p99_ms": run.result["send_lag"].get("p99_ms"),
        "generator_cpu_frac": win["generator_cpu_s"] / win["wall_s"],
        "other_cpu_frac": win["other_cpu_frac"],
    }


def _connect_ceiling(run: Measured) -> dict[str, Any]:
    win = run.window()
    return {
        "variant": "connect ceiling",
        "connects_per_s": run.result["connects_per_s"],
        "generator_cpu_frac": win["generator_cpu_s"] / win["wall_s"],
        "connects_per_generator_cpu_s": per(run.result["bound"], win["generator_cpu_s"]),
    }


def _ceiling_variants(ctx: Context, params: dict[str, Any]) -> list[Variant]:
    relays = [
        Variant(
            job=_relay_job(params, secret="x" * 32),
            measure=partial(_ceiling_relay, label, stack, client or ctx.client),
            series=label,
            label=label,
            echo=stack,
            client=client or ctx.client,
        )
        for stack, client, label in _CEILING_RELAYS
    ]
    floor = Variant(
        job={"kind": "open_loop", **ctx.params("b")},
        measure=_latency_floor,
        series="latency floor",
        label="latency floor at (b)'s load vs raw relay",
        echo="raw",
    )
    connect = Variant(
        job={
            "kind": "connect",
            "count": params["count"],
            "concurrency": params["concurrency"],
            "sources": 16,
        },
        measure=_connect_ceiling,
        series="connect",
        label="connect ceiling vs raw relay",
        echo="raw",
    )
    return [*relays, floor, connect]


def _ceiling_rows(out: Outcome, ctx: Context) -> None:
    for stack, _client, label in _CEILING_RELAYS:
        runs = out.series.get(label, [])
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
    floor = out.series.get("latency floor", [])
    out.rows.append(
        Row(
            f"latency floor: (b)'s {ctx.params('b')['rate']:,} msg/s vs raw relay, p99",
            median_of(floor, "p99_ms"),
            "ms",
        )
    )
    out.rows.append(Row("latency floor: p50", median_of(floor, "p50_ms"), "ms"))
    connects = out.series.get("connect", [])
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
    out.notes.append(
        "The stack references relay the same workload on bare servers: Quart-Trio, a raw ASGI "
        "app (both on Hypercorn's trio worker), trio-websocket and asyncio websockets. Compare "
        "them per server CPU-second (the Stack yardsticks table): the ASGI relay shows what "
        "Quart costs, the other two where Hypercorn stands among WebSocket servers."
    )
    out.extra["series"] = {
        name: [{k: v for k, v in run.items() if k != "histogram"} for run in runs]
        for name, runs in out.series.items()
    }


CEILING: Final = Scenario(
    key="ceiling",
    summary="The generator's own limit, against relays that do (almost) nothing.",
    title=lambda _params: "Generator ceiling and bare-stack reference (no auth, no storage)",
    variants=_ceiling_variants,
    rows=_ceiling_rows,
)


# ----------------------------------------------------------------------------- (a)


def _a_rows(out: Outcome, ctx: Context) -> None:
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


SCENARIO_A: Final = Scenario(
    key="a",
    summary="Saturated relay: 100 pairs, 8 in flight per user.",
    title=lambda p: (
        f"(a) Saturated relay: {p['pairs']} pairs, {p['window']} unacknowledged "
        f"send_message per user, {p.get('content_bytes', 100)}-byte contents"
    ),
    variants=lambda _ctx, p: [Variant(job=_relay_job(p), measure=_relay_metrics)],
    rows=_a_rows,
    headline=(
        Headline("delivered msg per server CPU-s", "delivered_per_server_cpu_s"),
        Headline("delivered msg/s", "delivered_per_s"),
    ),
)


# ----------------------------------------------------------------------------- (b)


def _open_loop_figures(run: Measured) -> dict[str, Any]:
    """What every open-loop latency scenario ((b), (i)) reports of one run."""
    result, win = run.result, run.window()
    cpu = win["server_cpu_s"]
    latency = result["delivery_latency"]
    return {
        "delivered_per_s": result["delivered_per_s"],
        "sent_per_s": result["sent_per_s"],
        "p50_ms": latency.get("p50_ms"),
        "p99_ms": latency.get("p99_ms"),
        "p999_ms": latency.get("p999_ms"),
        "max_ms": latency.get("max_ms"),
        "ack_p50_ms": result["ack_latency"].get("p50_ms"),
        "ack_p99_ms": result["ack_latency"].get("p99_ms"),
        "send_lag_p99_ms": result["send_lag"].get("p99_ms"),
        "server_cpu_frac": cpu / win["wall_s"],
        "delivered_per_server_cpu_s": per(result["delivered"], cpu),
        "generator_cpu_frac": win["generator_cpu_s"] / win["wall_s"],
        "other_cpu_frac": win["other_cpu_frac"],
        "errors": result["errors"],
        "histogram": result["delivery_histogram"],
        "timeline": result["timeline"],
    }


def _b_run(run: Measured) -> dict[str, Any]:
    return {**_open_loop_figures(run), "lost": run.result["lost"]}


def _b_rows(out: Outcome, ctx: Context) -> None:
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


SCENARIO_B: Final = Scenario(
    key="b",
    summary="Fixed offered load: latency and server CPU below saturation.",
    title=lambda p: (
        f"(b) Fixed offered load: {p['rate']} msg/s over {p['users']} users "
        "(Poisson arrivals, latency from the intended send time)"
    ),
    variants=lambda _ctx, p: [Variant(job={"kind": "open_loop", **p}, measure=_b_run)],
    rows=_b_rows,
    headline=(
        Headline("delivery latency p99 (ms)", "p99_ms"),
        Headline("server CPU (fraction of one core)", "server_cpu_frac"),
    ),
)


# ----------------------------------------------------------------------------- (c)


def _c_run(run: Measured) -> dict[str, Any]:
    readings = run.readings
    base = readings["held_0"]["server_rss"]
    metrics: dict[str, Any] = {"base_rss_mib": base / 2**20}
    previous = (0, base)
    for step in run.result["steps"]:
        target = step["target"]
        held = readings[f"held_{target}"]
        count = int(held["connections"])
        rss = held["server_rss"]
        metrics[f"held_{target}"] = count
        metrics[f"rss_mib_{target}"] = rss / 2**20
        metrics[f"per_conn_kib_{target}"] = (rss - base) / max(count, 1) / KIB
        metrics[f"marginal_kib_{target}"] = (rss - previous[1]) / max(count - previous[0], 1) / KIB
        metrics[f"connect_s_{target}"] = step["connect_s"]
        previous = (count, rss)
    return metrics


def _c_rows(out: Outcome, ctx: Context) -> None:
    steps: list[int] = out.params["steps"]
    for step in steps:
        value = out.median(f"per_conn_kib_{step}")
        last = step == steps[-1]
        out.rows.append(
            Row(
                f"RSS per connection at {step:,}",
                value,
                "KiB",
                target="<= 25" if last else None,
                ok=at_most(value, 25) if last else None,
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


SCENARIO_C: Final = Scenario(
    key="c",
    summary="Idle memory per authenticated connection (RSS delta / connections).",
    title=lambda p: (
        "(c) Idle memory per authenticated connection: server RSS growth / connections "
        f"at {', '.join(f'{s:,}' for s in p['steps'])}"
    ),
    variants=lambda _ctx, p: [
        Variant(job={"kind": "idle", "sources": 16, **p}, measure=_c_run),
    ],
    rows=_c_rows,
    headline=lambda p: (
        Headline(
            f"RSS per connection at {p['steps'][-1]:,} (KiB)", f"per_conn_kib_{p['steps'][-1]}"
        ),
    ),
)


# ----------------------------------------------------------------------------- (d)


def _d_run(run: Measured) -> dict[str, Any]:
    result, win = run.result, run.window()
    return {
        "connects_per_s": result["connects_per_s"],
        "bound": result["bound"],
        "connects_per_server_cpu_s": per(result["bound"], win["server_cpu_s"]),
        "server_cpu_frac": win["server_cpu_s"] / win["wall_s"],
        "generator_cpu_frac": win["generator_cpu_s"] / win["wall_s"],
        "other_cpu_frac": win["other_cpu_frac"],
        "p50_ms": result["latency"].get("p50_ms"),
        "p99_ms": result["latency"].get("p99_ms"),
        "errors": result["errors"],
    }


def _d_rows(out: Outcome, ctx: Context) -> None:
    fresh = out.series.get("", [])
    storm = out.series.get("reconnect", [])
    rate = median_of(fresh, "connects_per_s")
    storm_rate = median_of(storm, "connects_per_s")
    out.rows += [
        Row(
            "connect+bind/s",
            rate,
            "conn/s",
            median_of(fresh, "connects_per_server_cpu_s"),
            "conn per server CPU-s",
            ">= 1500",
            at_least(rate, 1500),
        ),
        Row("connect+bind latency p50", median_of(fresh, "p50_ms"), "ms"),
        Row("connect+bind latency p99", median_of(fresh, "p99_ms"), "ms"),
        Row("server CPU (fraction of one core)", median_of(fresh, "server_cpu_frac"), "core"),
        Row(
            "reconnect storm (the same users, dropped and back): connect+bind/s",
            storm_rate,
            "conn/s",
            median_of(storm, "connects_per_server_cpu_s"),
            "conn per server CPU-s",
            ">= 2500",
            at_least(storm_rate, 2500),
        ),
        Row("reconnect storm latency p99", median_of(storm, "p99_ms"), "ms"),
        Row("other processes on the machine (noise)", out.median("other_cpu_frac"), "core"),
    ]


SCENARIO_D: Final = Scenario(
    key="d",
    summary="Connect + bind rate (TCP, upgrade, token check, `authenticated`), and reconnects.",
    title=lambda p: (
        f"(d) Connect + bind: {p['count']:,} fresh users, {p['concurrency']} connecting at a"
        " time; then the same users dropped and reconnecting"
    ),
    variants=lambda _ctx, p: [
        Variant(job={"kind": "connect", "sources": 16, **p}, measure=_d_run),
        Variant(
            job={"kind": "connect", "sources": 16, "reconnect": True, **p},
            measure=lambda run: {**_d_run(run), "storm": True},
            series="reconnect",
            label="reconnect storm",
        ),
    ],
    rows=_d_rows,
    headline=(
        Headline("connect+bind per server CPU-s", "connects_per_server_cpu_s"),
        Headline("connect+bind/s", "connects_per_s"),
        Headline("reconnect storm per server CPU-s", "connects_per_server_cpu_s", "reconnect"),
        Headline("reconnect storm connect+bind/s", "connects_per_s", "reconnect"),
    ),
)


# ----------------------------------------------------------------------------- (e)


def _e_run(run: Measured) -> dict[str, Any]:
    result, win = run.result, run.window()
    return {
        "elapsed_s": result["elapsed_s"],
        "bind_s": result["bind_s"],
        "messages": result["messages"],
        "chats": result["chats"],
        "frames": result["frames"],
        "bytes": result["bytes"],
        "messages_per_s": result["messages_per_s"],
        "server_cpu_s": win["server_cpu_s"],
        "other_cpu_frac": win["other_cpu_frac"],
        "messages_per_server_cpu_s": per(result["messages"], win["server_cpu_s"]),
    }


def _e_rows(out: Outcome, ctx: Context) -> None:
    total = out.params["chats"] * out.params["per_chat"]
    messages = out.median("messages")
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
            messages,
            "msg",
            target=f"= {total:,}",
            ok=None if messages is None else messages == total,
        ),
    ]


SCENARIO_E: Final = Scenario(
    key="e",
    summary="Backlog: a user with undelivered messages over many chats binds.",
    title=lambda p: (
        f"(e) Backlog: a user with {p['chats'] * p['per_chat']:,} undelivered messages over "
        f"{p['chats']} chats binds"
    ),
    variants=lambda _ctx, p: [
        Variant(
            job={
                "kind": "backlog",
                "user_id": "target",
                "expect_messages": p["chats"] * p["per_chat"],
            },
            measure=_e_run,
        )
    ],
    rows=_e_rows,
    dataset=Dataset(owner="target", sender="peer"),
    headline=(Headline("backlog msg per server CPU-s", "messages_per_server_cpu_s"),),
)


# ----------------------------------------------------------------------------- (f)


def _f_run(run: Measured) -> dict[str, Any]:
    rounds = run.result["rounds"]
    first, last = rounds[0], rounds[-1]
    cpu_first = run.window("fetch_0_start", "fetch_0_end")["server_cpu_s"]
    n = len(rounds) - 1
    cpu_last = run.window(f"fetch_{n}_start", f"fetch_{n}_end")["server_cpu_s"]
    return {
        "first_s": first["elapsed_s"],
        "repeat_s": last["elapsed_s"],
        "bytes": first["bytes"],
        "chats": first["chats"],
        "messages": first["messages"],
        "mib_per_s": first["bytes"] / 2**20 / first["elapsed_s"],
        "server_cpu_s_first": cpu_first,
        "server_cpu_s_repeat": cpu_last,
        "messages_per_server_cpu_s": per(first["messages"], cpu_first),
    }


def _f_rows(out: Outcome, ctx: Context) -> None:
    total = out.params["chats"] * out.params["per_chat"]
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


SCENARIO_F: Final = Scenario(
    key="f",
    summary="`fetch_chats` of a user with a long history in many chats.",
    title=lambda p: (
        f"(f) fetch_chats for a user with {p['chats']} chats x {p['per_chat']:,} messages"
    ),
    variants=lambda _ctx, p: [
        Variant(
            job={"kind": "fetch", "user_id": "reader", "repeats": p.get("repeats", 2)},
            measure=_f_run,
        )
    ],
    rows=_f_rows,
    dataset=Dataset(owner="reader", sender="owner"),
    headline=(Headline("fetch_chats msg per server CPU-s", "messages_per_server_cpu_s"),),
)


# ----------------------------------------------------------------------------- (h)


def _h_run(run: Measured) -> dict[str, Any]:
    rounds = run.result["rounds"]
    repeats = sorted(r["elapsed_s"] for r in rounds[1:]) or [rounds[0]["elapsed_s"]]
    return {
        "first_s": rounds[0]["elapsed_s"],
        "repeat_s": repeats[len(repeats) // 2],
        "chats": rounds[0]["chats"],
        "bytes": rounds[0]["bytes"],
    }


def _h_rows(out: Outcome, ctx: Context) -> None:
    chats = out.median("chats")
    repeat = out.median("repeat_s")
    out.rows += [
        Row("chat list, first on a fresh server", out.median("first_s"), "s"),
        Row(
            "chat list, repeated (median)",
            repeat,
            "s",
            target="< 0.05 s",
            ok=None if repeat is None else repeat < 0.05,
        ),
        Row("bytes received", out.median("bytes"), "B"),
        Row(
            "chats listed",
            chats,
            "chats",
            target=f"= {out.params['chats']:,}",
            ok=None if chats is None else chats == out.params["chats"],
        ),
    ]


SCENARIO_H: Final = Scenario(
    key="h",
    summary="The chat list with counts: `fetch_chats` with `limit: 0` for a user with many chats.",
    title=lambda p: (
        f"(h) Chat list: fetch_chats limit 0 for a user with {p['chats']:,} chats"
        f" ({p['per_chat']} unread each)"
    ),
    variants=lambda _ctx, p: [
        Variant(
            job={"kind": "fetch", "user_id": "lister", "repeats": p["repeats"], "limit": 0},
            measure=_h_run,
        )
    ],
    rows=_h_rows,
    dataset=Dataset(owner="lister", sender="peer"),
    headline=(Headline("chat list s", "repeat_s"),),
)


# ----------------------------------------------------------------------------- (i)


def _none_row(label: str, total: Any, unit: str) -> Row:
    """A count that must be zero over every run."""
    return Row(label, total, unit, target="= 0", ok=None if total is None else total == 0)


def _i_run(run: Measured) -> dict[str, Any]:
    result = run.result
    receipts = sum(n for k, n in result["other_frames"].items() if k.startswith("receipt"))
    return {
        **_open_loop_figures(run),
        **{
            key: result[key]
            for key in (
                "members",
                "senders",
                "sent",
                "expected_copies",
                "delivered",
                "acks",
                "duplicates",
                "missing",
                "foreign",
                "setup_s",
            )
        },
        "receipts_per_s": receipts / result["elapsed_s"],
    }


def _total(out: Outcome, key: str) -> int | None:
    """`key` summed over the runs: one duplicate in any run fails the check."""
    values = [run[key] for run in out.runs if isinstance(run.get(key), int)]
    return sum(values) if values else None


def _i_rows(out: Outcome, ctx: Context) -> None:
    p99 = out.median("p99_ms")
    runs = len(out.runs)
    duplicates, missing = _total(out, "duplicates"), _total(out, "missing")
    errors = sum(sum(run["errors"].values()) for run in out.runs) if out.runs else None
    out.rows += [
        Row(
            "copies delivered/s (to members other than the sender)",
            out.median("delivered_per_s"),
            "msg/s",
            out.median("delivered_per_server_cpu_s"),
            "msg per server CPU-s",
        ),
        Row("messages sent into the group/s", out.median("sent_per_s"), "msg/s"),
        Row("publish-to-deliver latency p50", out.median("p50_ms"), "ms"),
        Row(
            "publish-to-deliver latency p99",
            p99,
            "ms",
            target="<= 50",
            ok=at_most(p99, 50),
        ),
        Row("publish-to-deliver latency max", out.median("max_ms"), "ms"),
        Row("sender's ack latency p99", out.median("ack_p99_ms"), "ms"),
        _none_row(f"duplicate copies (sum of {runs} runs)", duplicates, "msg"),
        _none_row(f"missing copies (sum of {runs} runs)", missing, "msg"),
        _none_row(f"error frames and closed connections (sum of {runs} runs)", errors, "frames"),
        Row("receipt frames received/s (read, not timed)", out.median("receipts_per_s"), "frame/s"),
        Row("server CPU (fraction of one core)", out.median("server_cpu_frac"), "core"),
        Row(
            "generator's own send lag p99 (its share of the latency)",
            out.median("send_lag_p99_ms"),
            "ms",
        ),
        Row("generator CPU (fraction of one core)", out.median("generator_cpu_frac"), "core"),
        Row("other processes on the machine (noise)", out.median("other_cpu_frac"), "core"),
    ]
    out.notes.append(
        "Latency counts from each message's intended send time (fixed 1/rate intervals per "
        "sender, random phases) to each member's receipt of its `message` frame, on the "
        "generator's one clock; every copy of a message sent in the window is counted per "
        "member, the sender's own copy as its acknowledgement."
    )


SCENARIO_I: Final = Scenario(
    key="i",
    summary="Group fan-out: senders in one big group, every member connected to one worker.",
    title=lambda p: (
        f"(i) Group fan-out: one group of {p['members']} members on one worker, "
        f"{p['senders']} senders at {p.get('rate_per_sender', 1.0):g} msg/s each "
        f"({p['senders'] * p.get('rate_per_sender', 1.0):g} msg/s in, each to "
        f"{p['members'] - 1} members)"
    ),
    variants=lambda _ctx, p: [Variant(job={"kind": "group", **p}, measure=_i_run)],
    rows=_i_rows,
    headline=(
        Headline("group fan-out latency p99 (ms)", "p99_ms"),
        Headline("group copies delivered per server CPU-s", "delivered_per_server_cpu_s"),
    ),
)


# ----------------------------------------------------------------------------- (j)

_J_PREFIX: Final = "presence"
_J_SERIES: Final = ("reconnect", "departures")
DEFAULT_PRESENCE_GRACE_S: Final = 5.0  # the server's `limits.presence_grace_s` default


def _j_grace(params: dict[str, Any]) -> float:
    return float(params.get("presence_grace_s", DEFAULT_PRESENCE_GRACE_S))


def _j_away_s(params: dict[str, Any]) -> float:
    """How long a departing user stays away: well past the grace, so its offline is due."""
    return float(params.get("away_s") or _j_grace(params) + 3.0)


def _j_job(params: dict[str, Any], series: str) -> dict[str, Any]:
    job = {
        "kind": "presence",
        "user_prefix": _J_PREFIX,
        "users": params["users"],
        "contacts": params["contacts"],
        "reconnect_per_s": params["users"] * params["reconnect_share"],
        "grace_s": _j_grace(params),
        "warmup_s": params["warmup_s"],
        "duration_s": params["duration_s"],
        "concurrency": params.get("concurrency", 50),
        "sources": 16,
    }
    if series == "departures":
        away = _j_away_s(params)
        job.update(
            away_per_s=params["away_per_s"],
            away_s=away,
            # the first departures are back before the window opens: a steady state
            warmup_s=max(params["warmup_s"], away + 1.0),
            duration_s=params.get("away_duration_s", params["duration_s"]),
        )
    return job


def _j_run(series: str, run: Measured) -> dict[str, Any]:
    result, win = run.result, run.window()
    cpu, wall = win["server_cpu_s"], win["wall_s"]
    window, after, setup = result["window"], result["after"], result["setup"]
    elapsed = result["elapsed_s"]
    online = window.get("answer_online", 0)
    answered = online + window.get("answer_offline", 0)
    flicker = window.get("live_offline_flicker", 0)
    departed = window.get("live_offline_departed", 0)
    slow = window.get("live_offline_slow", 0)
    return {
        "series": series,
        "users": result["users"],
        "contacts": result["contacts"],
        "server_cpu_s": cpu,
        "server_cpu_frac": cpu / wall,
        "reconnects": result["reconnects"],
        "reconnects_per_s": result["reconnects_per_s"],
        "reconnects_per_server_cpu_s": per(result["reconnects"], cpu),
        "departures_per_s": window.get("departures", 0) / elapsed,
        "skipped": window.get("skipped", 0),
        "live_frames": result["live_frames"],
        "live_frames_per_s": result["live_frames"] / elapsed,
        "offline_frames": flicker + departed + slow,
        "offline_per_s": (flicker + departed + slow) / elapsed,
        "offline_departed_per_s": departed / elapsed,
        # due announcements of reconnects that took longer than the grace
        "offline_slow": slow + after.get("live_offline_slow", 0),
        "online_return_per_s": window.get("live_online_return", 0) / elapsed,
        "online_redundant": window.get("live_online_redundant", 0),
        "online_redundant_per_s": window.get("live_online_redundant", 0) / elapsed,
        # offline announcements of users who were back within the grace, in the window and
        # in the settling time after it (where those of the last reconnects arrive)
        "flicker": flicker + after.get("live_offline_flicker", 0),
        "strangers": window.get("live_strangers", 0) + window.get("answer_strangers", 0),
        "answers": result["answers"],
        "answers_per_s": result["answers"] / elapsed,
        "answer_online_frac": online / answered if answered else None,
        "answer_missing": window.get("answer_missing", 0),
        "reconnect_p50_ms": result["reconnect_latency"].get("p50_ms"),
        "reconnect_p99_ms": result["reconnect_latency"].get("p99_ms"),
        "fetch_p50_ms": result["fetch_latency"].get("p50_ms"),
        "fetch_p99_ms": result["fetch_latency"].get("p99_ms"),
        "start_lag_p99_ms": result["start_lag"].get("p99_ms"),
        "setup_s": result["setup_s"],
        "setup_live_online": setup.get("live_online", 0),
        "setup_stale": result["setup_stale"],
        "final_stale": result["final_stale"],
        "disconnected": result["disconnected"],
        "generator_cpu_frac": win["generator_cpu_s"] / wall,
        "other_cpu_frac": win["other_cpu_frac"],
        "errors": result["errors"],
        "answer_examples": result.get("answer_examples", []),  # answers that left contacts out
    }


def _j_variants(_ctx: Context, params: dict[str, Any]) -> list[Variant]:
    grace = params.get("presence_grace_s")
    server = {"limits": {"presence_grace_s": grace}} if grace is not None else {}
    return [
        Variant(
            job=_j_job(params, series),
            measure=partial(_j_run, series),
            series=series,
            label=series,
            server=server,
        )
        for series in _J_SERIES
        if series == "reconnect" or params.get("away_per_s")
    ]


def _j_presence_seen(runs: list[dict[str, Any]]) -> bool:
    """Whether the server reported anyone online at all: with presence off (or missing)
    every answer says offline and no live frame comes, and the presence targets do not apply."""
    return any(run["live_frames"] or run.get("answer_online_frac") for run in runs)


def _j_rows(out: Outcome, ctx: Context) -> None:
    params = out.params
    seen_all = True
    for series in _J_SERIES:
        runs = out.series.get(series, [])
        if not runs:
            continue
        seen = _j_presence_seen(runs)
        seen_all = seen_all and seen

        def med(key: str, runs: list[dict[str, Any]] = runs) -> float | None:
            return median_of(runs, key)

        def zero(label: str, key: str, runs: list[dict[str, Any]] = runs, seen: bool = seen) -> Row:
            total = sum(run[key] for run in runs)
            return Row(
                f"{label} (sum of {len(runs)} runs)",
                total,
                "",
                target="= 0" if seen else None,
                ok=(total == 0) if seen else None,
            )

        if series == "reconnect":
            out.rows += [
                Row(
                    "reconnects/s (close, connect + bind, fetch_presence)",
                    med("reconnects_per_s"),
                    "conn/s",
                    med("reconnects_per_server_cpu_s"),
                    "reconnects per server CPU-s",
                ),
                Row("server CPU over the window", med("server_cpu_s"), "s"),
                Row("server CPU (fraction of one core)", med("server_cpu_frac"), "core"),
                Row("connect+bind latency of the reconnects p50", med("reconnect_p50_ms"), "ms"),
                Row("connect+bind latency of the reconnects p99", med("reconnect_p99_ms"), "ms"),
                Row(
                    "fetch_presence answers/s (apart from live frames)", med("answers_per_s"), "/s"
                ),
                Row("fetch_presence answer latency p50", med("fetch_p50_ms"), "ms"),
                Row("fetch_presence answer latency p99", med("fetch_p99_ms"), "ms"),
                Row(
                    "contacts online in the answers (reconnecting ones are in their grace)",
                    med("answer_online_frac"),
                    "share",
                ),
                Row("live presence frames received (window)", med("live_frames"), "frames"),
                Row("live presence frames/s", med("live_frames_per_s"), "frame/s"),
                Row("of which offline/s", med("offline_per_s"), "frame/s"),
                Row(
                    "of which online for users who never went offline (redundant)/s",
                    med("online_redundant_per_s"),
                    "frame/s",
                ),
                zero("offline announcements of users back within the grace", "flicker"),
                Row(
                    "offline announcements after reconnects slower than the grace "
                    f"(sum of {len(runs)} runs; due, but a sign of overload)",
                    sum(run["offline_slow"] for run in runs),
                    "",
                ),
                zero("contacts shown offline after the churn stopped", "final_stale"),
                zero("contacts shown offline once everyone had bound", "setup_stale"),
                zero("contacts left out of fetch_presence answers", "answer_missing"),
                Row(
                    "generator's own lag starting the reconnects p99",
                    med("start_lag_p99_ms"),
                    "ms",
                ),
                Row(
                    f"setup: {params['users']:,} users bind and fetch presence",
                    med("setup_s"),
                    "s",
                ),
                Row(
                    "setup: live online frames (of contacts that bound after one's answer)",
                    med("setup_live_online"),
                    "frames",
                ),
            ]
        else:
            out.rows += [
                Row(
                    "with departures: departures/s (back after "
                    f"{_j_away_s(params):g} s, past the grace)",
                    med("departures_per_s"),
                    "/s",
                ),
                Row(
                    "with departures: reconnects/s in all",
                    med("reconnects_per_s"),
                    "conn/s",
                    med("reconnects_per_server_cpu_s"),
                    "reconnects per server CPU-s",
                ),
                Row(
                    "with departures: server CPU (fraction of one core)",
                    med("server_cpu_frac"),
                    "core",
                ),
                Row(
                    "with departures: offline announcements of departed users/s (about "
                    f"departures/s x {params['contacts']})",
                    med("offline_departed_per_s"),
                    "frame/s",
                ),
                Row(
                    "with departures: online announcements of returning users/s",
                    med("online_return_per_s"),
                    "frame/s",
                ),
                Row("with departures: live presence frames/s", med("live_frames_per_s"), "frame/s"),
                zero(
                    "with departures: offline announcements of users back within the grace",
                    "flicker",
                ),
                zero(
                    "with departures: contacts shown offline after the churn stopped", "final_stale"
                ),
                zero(
                    "with departures: contacts left out of fetch_presence answers",
                    "answer_missing",
                ),
            ]
    runs = out.runs
    errors = sum(sum(run["errors"].values()) for run in runs) if runs else None
    out.rows += [
        _none_row(
            f"error frames and closed connections (sum of {len(runs)} runs)", errors, "frames"
        ),
        _none_row(
            f"presence entries about strangers (sum of {len(runs)} runs)",
            sum(run["strangers"] for run in runs) if runs else None,
            "entries",
        ),
        Row("generator CPU (fraction of one core)", out.median("generator_cpu_frac"), "core"),
        Row("other processes on the machine (noise)", out.median("other_cpu_frac"), "core"),
    ]
    out.notes.append(
        "Each reconnect closes politely (waiting for the server's close), then connects, binds "
        "and sends `fetch_presence` at once; latency counts from the connect. Live `presence` "
        "frames are told apart by what the generator knows of their subject: `offline` of a "
        "user who is not away is a flicker the grace should have hidden, `online` of a user "
        "who never went offline is redundant. Every user's first bind also delivers its "
        "undelivered `new_chats` (setup only)."
    )
    if not seen_all:
        out.notes.append(
            "The server reported nobody online (every fetch_presence answer offline, no live "
            "frame): presence is off (`limits.presence: false`) or not implemented, so the "
            "presence checks do not apply."
        )


def _j_title(p: dict[str, Any]) -> str:
    rate = p["users"] * p["reconnect_share"]
    text = (
        f"(j) Presence under reconnect churn: {p['users']:,} users with {p['contacts']} contacts "
        f"each on one worker; {rate:g} reconnect/s ({p['reconnect_share']:.0%} of the users), "
        f"grace {_j_grace(p):g} s"
    )
    if p.get("away_per_s"):
        text += (
            f"; then with {p['away_per_s']:g}/s of them away {_j_away_s(p):g} s "
            f"({p.get('away_duration_s', p['duration_s']):g} s window)"
        )
    return text


SCENARIO_J: Final = Scenario(
    key="j",
    summary="Presence: users of a contact ring reconnecting at a fixed rate, one worker.",
    title=_j_title,
    variants=_j_variants,
    rows=_j_rows,
    dataset=Contacts(prefix=_J_PREFIX),
    headline=(
        Headline("reconnects per server CPU-s", "reconnects_per_server_cpu_s", "reconnect"),
        Headline("server CPU under churn (fraction of one core)", "server_cpu_frac", "reconnect"),
        Headline("live presence frames/s", "live_frames_per_s", "reconnect"),
    ),
)


# ----------------------------------------------------------------------------- (g)

_SCALE_MODULES: Final = ("handler.app", "handler.store.postgres", "handler.bus.redis")
_SCALE_PACKAGES: Final = ("psycopg", "coredis", "hypercorn")


def scale_unavailable(source: Source) -> str | None:
    """Why (g) cannot run against the tree of `source`, or None. The tree's own modules are
    looked for as files: the orchestrator imports no `handler`, whichever tree is measured."""
    if not port_open("127.0.0.1", 5432):
        return "PostgreSQL is not listening on 127.0.0.1:5432"
    if not port_open("127.0.0.1", 6379):
        return "Redis is not listening on 127.0.0.1:6379"
    for module in _SCALE_MODULES:
        path = source.root.joinpath(*module.split("."))
        if not (path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()):
            return f"module {module} is not available"
    for module in _SCALE_PACKAGES:
        try:
            if importlib.util.find_spec(module) is None:
                return f"module {module} is not available"
        except ImportError:
            return f"module {module} is not available"
    return None


def _g_run(workers: int, run: Measured) -> dict[str, Any]:
    win = run.window()
    metrics = _relay_metrics(run)
    metrics["workers"] = workers
    metrics["backend_cpu_frac"] = win.get("backend_cpu_s", 0.0) / win["wall_s"]
    metrics["delivered_per_total_cpu_s"] = per(
        run.result["delivered_per_s"] * win["wall_s"],
        (win.get("server_cpu_s") or 0.0) + win.get("backend_cpu_s", 0.0),
    )
    return metrics


def _g_variants(_ctx: Context, params: dict[str, Any]) -> list[Variant]:
    return [
        Variant(
            job=_relay_job(params),
            measure=partial(_g_run, workers),
            series=str(workers),
            label=f"{workers} worker(s)",
            server={
                "cpus": SERVER_CPUS if workers == 1 else None,
                "workers": workers,
                "postgres_dsn": POSTGRES_DSN,
                "redis_url": REDIS_URL,
            },
            backends=("postgres", "redis-server"),
        )
        for workers in (1, 2)
    ]


def _g_rows(out: Outcome, ctx: Context) -> None:
    one, two = out.series.get("1", []), out.series.get("2", [])
    rate1, rate2 = median_of(one, "delivered_per_s"), median_of(two, "delivered_per_s")
    eff1 = median_of(one, "delivered_per_server_cpu_s")
    eff2 = median_of(two, "delivered_per_server_cpu_s")
    projected = 2 * eff2 / eff1 if eff1 and eff2 else None
    for workers, runs in ((1, one), (2, two)):
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


SCENARIO_G: Final = Scenario(
    key="g",
    summary="Two Hypercorn workers on PostgreSQL + Redis against one.",
    title=lambda _p: "(g) PostgreSQL + Redis: 2 Hypercorn workers vs 1, saturated relay as in (a)",
    variants=_g_variants,
    rows=_g_rows,
    unavailable=scale_unavailable,
    headline=(
        Headline("1 worker: msg per server CPU-s", "delivered_per_server_cpu_s", "1"),
        Headline("2 workers: msg per server CPU-s", "delivered_per_server_cpu_s", "2"),
    ),
)


SCENARIOS: Final[dict[str, Scenario]] = {
    spec.key: spec
    for spec in (
        CEILING,
        SCENARIO_A,
        SCENARIO_B,
        SCENARIO_C,
        SCENARIO_D,
        SCENARIO_E,
        SCENARIO_F,
        SCENARIO_G,
        SCENARIO_H,
        SCENARIO_I,
        SCENARIO_J,
    )
}
