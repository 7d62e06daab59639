"""Report writers: results.json (everything), results.md (the table), PNG plots.

Plots need matplotlib (the `bench` extra); without it the JSON and markdown are still written
and the report says the plots were skipped.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Final

from benchmarks.harness import median_of

NOISY_CORES: Final = 0.2  # other processes' CPU during a window above which figures are suspect

# How tables and plots name the bare relays of `benchmarks.echo`, by `--stack`.
STACK_NAMES: Final = {
    "raw": "raw trio sockets",
    "quart": "Quart-Trio on Hypercorn",
    "asgi": "raw ASGI on Hypercorn",
    "trio-websocket": "trio-websocket",
    "websockets": "asyncio websockets",
}


def fmt(value: Any) -> str:
    """A figure as the tables print it: thousands separated, about three significant digits."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        magnitude = abs(value)
        if magnitude >= 1000:
            return f"{value:,.0f}"
        if magnitude >= 10:
            return f"{value:.1f}"
        if magnitude >= 1:
            return f"{value:.2f}"
        return f"{value:.3f}"
    return str(value)


def verdict(ok: bool | None) -> str:
    return {True: "pass", False: "**FAIL**", None: ""}[ok]


def _setting(meta: dict[str, Any]) -> str:
    """A varied setting's side and what its config.json has for it."""
    limits = ", ".join(f"`limits.{k}: {json.dumps(v)}`" for k, v in meta.get("limits", {}).items())
    parts = [f"{limits} in its config.json" if limits else "", meta.get("config") or ""]
    return f"{meta['setting']} ({'; '.join(filter(None, parts)) or 'the defaults'})"


def stack_yardsticks(scenarios: dict[str, Any]) -> list[dict[str, Any]]:
    """The bare relays of the ceiling scenario side by side, and (a) when it ran, each with
    the ratio of its msg per server CPU-s to the bare Quart-Trio relay's: what the stack under
    the handler allows, what other stacks would, and how near the handler comes. Per CPU-s,
    because wall-clock rates on this shared machine are noisy. One row per relay stack, from
    its first series (the raw relay's is the one driven by the raw client); [] without any."""
    rows: list[dict[str, Any]] = []
    for label, runs in ((scenarios.get("ceiling") or {}).get("series") or {}).items():
        stack = next((run["stack"] for run in runs if run.get("stack")), None)
        if stack is None or any(row["stack"] == stack for row in rows):
            continue
        rows.append(
            {
                "relay": f"bare relay: {STACK_NAMES.get(stack, label)}",
                "stack": stack,
                "delivered_per_s": median_of(runs, "delivered_per_s"),
                "per_server_cpu_s": median_of(runs, "delivered_per_server_cpu_s"),
            }
        )
    if not rows:
        return []
    handler = (scenarios.get("a") or {}).get("median") or {}
    if handler.get("delivered_per_s") is not None:
        rows.append(
            {
                "relay": "the handler, (a): 1 worker, SQLite",
                "stack": None,
                "delivered_per_s": handler["delivered_per_s"],
                "per_server_cpu_s": handler.get("delivered_per_server_cpu_s"),
            }
        )
    quart = next((row["per_server_cpu_s"] for row in rows if row["stack"] == "quart"), None)
    for row in rows:
        per = row["per_server_cpu_s"]
        row["vs_quart"] = per / quart if per is not None and quart else None
    return rows


# The handler's (a), every feature on, against the bare Quart-Trio relay, per server CPU-s.
HANDLER_VS_QUART_TARGET: Final = 1.6


def _yardstick_target(row: dict[str, Any]) -> str:
    if row["stack"] is not None:
        return "|  |  |"
    ratio = row["vs_quart"]
    ok = None if ratio is None else ratio >= HANDLER_VS_QUART_TARGET
    return f"| >= {HANDLER_VS_QUART_TARGET}x | {verdict(ok)} |"


def _yardstick_lines(rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return []
    return [
        "",
        "## Stack yardsticks",
        "",
        "The same workload as (a) on bare relays (no auth, no storage); the ratio is of msg per "
        "server CPU-s to the bare Quart-Trio relay's, the stack the handler runs on. The raw "
        "relay's msg/s is the generator's ceiling rather than its own.",
        "",
        "| relay | delivered msg/s | msg per server CPU-s | per CPU-s vs Quart-Trio relay"
        " | target | result |",
        "| --- | ---: | ---: | ---: | --- | --- |",
        *(
            f"| {row['relay']} | {fmt(row['delivered_per_s'])} | {fmt(row['per_server_cpu_s'])} "
            f"| {fmt(row['vs_quart'])}{'x' if row['vs_quart'] is not None else ''} "
            + _yardstick_target(row)
            for row in rows
        ),
    ]


def markdown(report: dict[str, Any]) -> str:
    """The results table, one section per scenario, medians over the runs."""
    meta = report["meta"]
    lines = [
        "# Benchmark results",
        "",
        f"- profile: `{meta['profile']}`, runs per figure: {meta['runs']} (medians quoted), "
        f"client: `{meta['client']}`",
        f"- commit: `{meta.get('commit', '?')}`"
        + (
            f" plus uncommitted changes to {', '.join(meta['uncommitted'])}"
            if meta.get("uncommitted")
            else ""
        )
        + f", {meta.get('date', '')}",
        f"- machine: {meta.get('cpus', '?')} cores ({meta.get('cpu_model', '?')}), load "
        f"average before the run {meta.get('loadavg', '?')}; server pinned to core 0, "
        f"generator to core 1, nice {meta.get('nice', 0)}",
        '- "per CPU-s": the figure divided by the server\'s CPU seconds in the same window '
        "(stable on a noisy machine, unlike wall-clock rates)",
        *([f"- server setting: {_setting(meta)}"] if meta.get("setting") else []),
        "",
        "| scenario | metric | median | per CPU-s | target | result |",
        "| --- | --- | ---: | ---: | --- | --- |",
    ]
    for key, section in report["scenarios"].items():
        label = key if key == "ceiling" else f"({key})"
        if section.get("error"):
            first = section["error"].splitlines()[0].replace("|", "/")
            lines.append(f"| {label} | error: {first} (see results.json) | | | | **FAIL** |")
            continue
        if section.get("skipped"):
            lines.append(f"| {label} | skipped: {section['skipped']} | | | | |")
            continue
        for row in section["rows"]:
            per = row.get("per_cpu_s")
            per_text = f"{fmt(per)} {row.get('per_cpu_unit', '')}".strip() if per else ""
            lines.append(
                f"| {label} | {row['metric']} | {fmt(row['value'])} {row['unit']} | {per_text} "
                f"| {row.get('target') or ''} | {verdict(row.get('ok'))} |"
            )
    lines += _yardstick_lines(stack_yardsticks(report["scenarios"]))
    lines += ["", "## Scenarios", ""]
    for key, section in report["scenarios"].items():
        lines.append(
            f"- **{key}**: {section.get('title', key)} ({section.get('seconds', 0):.0f} s)"
        )
        for note in section.get("notes", []):
            lines.append(f"  - {note}")
        for failure in section.get("failed_runs", []):
            lines.append(f"  - **a run failed** and is left out: {failure.splitlines()[0]}")
        noise = (section.get("median") or {}).get("other_cpu_frac")
        if noise is not None and noise > NOISY_CORES:
            lines.append(
                f"  - **noisy**: other processes used {noise:.2f} cores during the measured "
                "windows (median); wall-clock figures suffer, per CPU-s figures much less"
            )
        seeding = section.get("seeding")
        if seeding:
            lines.append(
                f"  - dataset seeded through the {seeding['method']} in {seeding['seconds']:.1f} s"
            )
    if report.get("plots"):
        lines += ["", "## Plots", ""]
        lines += [f"![{name}]({name})" for name in report["plots"]]
    elif report.get("plots_skipped"):
        lines += ["", f"Plots skipped: {report['plots_skipped']}"]
    return "\n".join(lines) + "\n"


def _histograms(report: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """(scenario, label, run) for every run that kept a latency histogram."""
    found = []
    for key in ("b", "i", "a", "g"):
        section = report["scenarios"].get(key) or {}
        counters: dict[Any, int] = {}
        for run in section.get("runs", []):
            hist = run.get("histogram")
            group = run.get("workers")
            counters[group] = counters.get(group, 0) + 1
            if hist and hist.get("counts"):
                name = f"({key})" + (f" {group} worker(s)" if group else "")
                found.append((key, f"{name} run {counters[group]}", run))
    return found


def _cdf(counts: list[float]) -> list[float]:
    total = sum(counts) or 1.0
    out, acc = [], 0.0
    for count in counts:
        acc += count
        out.append(acc / total)
    return out


def plots(report: dict[str, Any], out: Path) -> list[str]:
    """Latency distributions and throughput per scenario; returns the file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    histograms = _histograms(report)
    if histograms:
        fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
        for key, label, run in histograms:
            hist = run["histogram"]
            edges, counts = hist["edges_ms"], hist["counts"]
            right.step(edges[1:], _cdf(counts), where="post", label=label)
            if key == "b":
                left.stairs(counts, edges, label=label, fill=False)
                for name, style in (("p50_ms", ":"), ("p99_ms", "--")):
                    if run.get(name):
                        left.axvline(run[name], linestyle=style, linewidth=0.8, color="black")
        left.axvline(10, color="red", linewidth=0.8, linestyle="--", label="p99 target 10 ms")
        left.set_xscale("log")
        left.set_xlabel("delivery latency (ms, log scale); dotted p50, dashed p99")
        left.set_ylabel("messages per bin")
        left.set_title("(b) fixed offered load: latency histogram")
        left.legend(fontsize=8)
        left.grid(True, which="both", alpha=0.3)
        right.set_xscale("log")
        right.set_xlabel("delivery latency (ms, log scale)")
        right.set_ylabel("fraction delivered within")
        right.axhline(0.99, color="grey", linewidth=0.8, linestyle=":")
        right.set_title("CDF: (b), (i) open loop; (a), (g) closed loop (queueing by design)")
        right.grid(True, which="both", alpha=0.3)
        right.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "latency.png", dpi=110)
        plt.close(fig)
        written.append("latency.png")

    bars = _throughput_bars(report)
    if bars:
        fig, axes = plt.subplots(1, len(bars), figsize=(4.2 * len(bars), 4.8), squeeze=False)
        for ax, (title, unit, items) in zip(axes[0], bars, strict=True):
            labels = [label for label, _, _ in items]
            values = [value or 0 for _, value, _ in items]
            colors = ["#4c72b0" if kind == "handler" else "#aaaaaa" for _, _, kind in items]
            ax.bar(range(len(values)), values, color=colors)
            ax.set_xticks(range(len(values)), labels, rotation=30, ha="right", fontsize=8)
            ax.set_title(title, fontsize=10)
            ax.set_ylabel(unit)
            for index, value in enumerate(values):
                ax.annotate(f"{value:,.0f}", (index, value), ha="center", va="bottom", fontsize=8)
        fig.suptitle("Throughput per scenario (medians; grey = yardsticks, blue = handler)")
        fig.tight_layout()
        fig.savefig(out / "throughput.png", dpi=110)
        plt.close(fig)
        written.append("throughput.png")

    memory = report["scenarios"].get("c") or {}
    if memory.get("median"):
        steps = memory["params"]["steps"]
        rss = [memory["median"].get(f"rss_mib_{step}") for step in steps]
        per = [memory["median"].get(f"per_conn_kib_{step}") for step in steps]
        if all(value is not None for value in rss + per):
            fig, ax = plt.subplots(figsize=(7, 4.5))
            ax.plot([0, *steps], [memory["median"]["base_rss_mib"], *rss], marker="o")
            ax.set_xlabel("bound idle connections")
            ax.set_ylabel("server RSS (MiB)")
            for step, value, kib in zip(steps, rss, per, strict=True):
                ax.annotate(
                    f"{kib:.1f} KiB/conn",
                    (step, value),
                    textcoords="offset points",
                    xytext=(-10, 8),
                    fontsize=8,
                )
            ax.set_title("(c) Idle memory")
            ax.grid(True, alpha=0.3)
            fig.tight_layout()
            fig.savefig(out / "memory.png", dpi=110)
            plt.close(fig)
            written.append("memory.png")
    return written


def _throughput_bars(
    report: dict[str, Any],
) -> list[tuple[str, str, list[tuple[str, float | None, str]]]]:
    scenarios = report["scenarios"]
    panels: list[tuple[str, str, list[tuple[str, float | None, str]]]] = []
    relay: list[tuple[str, float | None, str]] = []
    per_cpu: list[tuple[str, float | None, str]] = []
    ceiling = scenarios.get("ceiling") or {}
    for label, runs in (ceiling.get("series") or {}).items():
        if label in ("connect", "latency floor"):
            continue
        values = [r["delivered_per_s"] for r in runs]
        stack = next((run["stack"] for run in runs if run.get("stack")), "")
        if stack != "raw":
            short = f"bare {STACK_NAMES.get(stack, label)}"
        elif "trio-websocket" in label:
            short = "ceiling (trio-websocket client)"
        else:
            short = "ceiling (raw client)"
        relay.append((short, sorted(values)[len(values) // 2], "yardstick"))
        if stack != "raw":  # the raw relay's per-CPU figure is the generator's, not its own
            efficiency = median_of(runs, "delivered_per_server_cpu_s")
            per_cpu.append((short, efficiency, "yardstick"))
    for key, label in (("a", "(a) handler"), ("g", None)):
        section = scenarios.get(key) or {}
        if key == "a" and section.get("median"):
            relay.append((label or key, section["median"].get("delivered_per_s"), "handler"))
            per_cpu.append(
                (
                    "(a) 1 worker SQLite",
                    section["median"].get("delivered_per_server_cpu_s"),
                    "handler",
                )
            )
        if key == "g" and section.get("runs"):
            for workers in (1, 2):
                runs = [r for r in section["runs"] if r.get("workers") == workers]
                if runs:
                    rates = sorted(r["delivered_per_s"] for r in runs)
                    effs = sorted(r["delivered_per_server_cpu_s"] or 0 for r in runs)
                    relay.append((f"(g) {workers}w PG+Redis", rates[len(rates) // 2], "handler"))
                    per_cpu.append((f"(g) {workers}w PG+Redis", effs[len(effs) // 2], "handler"))
    if relay:
        panels.append(("Relay: delivered msg/s", "msg/s", relay))
    if per_cpu:
        panels.append(("Relay: msg per server CPU-second", "msg / CPU-s", per_cpu))
    connects: list[tuple[str, float | None, str]] = []
    for runs in [(ceiling.get("series") or {}).get("connect", [])]:
        if runs:
            values = sorted(r["connects_per_s"] for r in runs)
            connects.append(
                ("generator ceiling (raw relay)", values[len(values) // 2], "yardstick")
            )
    d_runs = (scenarios.get("d") or {}).get("runs") or []
    for name, storm in (("(d) handler", False), ("(d) reconnect storm", True)):
        runs = [run for run in d_runs if bool(run.get("storm")) == storm]
        if runs:
            connects.append((name, median_of(runs, "connects_per_s"), "handler"))
    if connects:
        panels.append(("Connect + bind", "conn/s", connects))
    other: list[tuple[str, float | None, str]] = []
    if (scenarios.get("b") or {}).get("median"):
        other.append(("(b) delivered", scenarios["b"]["median"].get("delivered_per_s"), "handler"))
    if (scenarios.get("e") or {}).get("median"):
        other.append(("(e) backlog", scenarios["e"]["median"].get("messages_per_s"), "handler"))
    if (scenarios.get("f") or {}).get("median"):
        median = scenarios["f"]["median"]
        rate = (median.get("messages") or 0) / median["first_s"] if median.get("first_s") else None
        other.append(("(f) fetch_chats", rate, "handler"))
    if other:
        panels.append(("Messages/s in (b), (e), (f)", "msg/s", other))
    return panels


def write(report: dict[str, Any], out: Path) -> None:
    """Write results.json, the plots (if matplotlib is there) and results.md into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    try:
        report["plots"] = plots(report, out)
    except ImportError as error:
        report["plots"] = []
        report["plots_skipped"] = f"matplotlib is not installed ({error})"
    (out / "results.json").write_text(json.dumps(report, indent=2, default=str))
    (out / "results.md").write_text(markdown(report))
