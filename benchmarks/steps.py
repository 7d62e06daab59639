"""Cost per message over the steps of the performance work, as instruction counts.

`python -m benchmarks.steps [--out DIR] [--messages N] [--connects N]`

Each step is a commit of this repository (`STEPS`, oldest first) that changed what a message
or a binding costs; the working tree is the last point. Every one of them is counted with the
same fixed workload by `benchmarks.instructions` (callgrind, all the server's threads), in one
invocation, and the result is a table and a plot of instructions per delivered message and per
connect+bind, step by step: what each change bought, in a unit the machine's noise does not
move. The timings of each step, measured against the one before it in the same session, are
in docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final

from benchmarks import compare as comparing
from benchmarks.harness import GENERATOR_CPUS
from benchmarks.instructions import Workload, failure, measure
from benchmarks.servers import CURRENT, REPO, temp_workdir, usable_cpus

DEFAULT_OUT: Final = REPO / "benchmarks" / "results" / "steps"

# (commit, what it changed), oldest first: the start of the work, then each step.
STEPS: Final = (
    ("fb1b5bc", "start: version 2 complete, every feature on"),
    ("2cabed8", "lean framing, one receive event per socket read"),
    ("c95c686", "one ACK poller for all connections"),
    ("03b7008", "socket calls without a run-loop pass each"),
    ("85402df", "queued events taken without a pass"),
    ("48ae884", "verified tokens cached, no log line per connection"),
    ("4ca95fd", "bytes straight to the WebSocket stream"),
    ("1c4b34a", "lists for the queues an idle connection keeps"),
)


def count_steps(
    steps: Sequence[tuple[str, str]],
    work: Workload,
    out: Path,
    *,
    with_tree: bool = True,
    say: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Count every step's server (and the working tree's, last); one row per point."""
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    with temp_workdir() as scratch:
        for index, (ref, label) in enumerate(steps):
            say(f"step {index + 1}/{len(steps)}: {ref} ({label})")
            try:
                with comparing.checkout(ref) as source:
                    tree = measure(source, work, Path(scratch) / str(index), out, say)
            except Exception as error:  # one failing step must not lose the others
                say(f"  FAILED: {failure(error)}")
                tree = {"error": failure(error)}
            rows.append(_row(ref, label, tree))
        if with_tree:
            say("working tree")
            try:
                tree = measure(CURRENT, work, Path(scratch) / "tree", out, say)
            except Exception as error:
                tree = {"error": failure(error)}
            rows.append(_row("tree", "working tree", tree))
    return rows


def _row(ref: str, label: str, tree: dict[str, Any]) -> dict[str, Any]:
    return {
        "ref": ref,
        "label": label,
        "per_message": tree.get("relay", {}).get("per_delivered_message"),
        "per_connect": tree.get("connect", {}).get("per_connect_bind"),
        "error": tree.get("error"),
    }


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown: each point with its counts and the ratio to the first."""
    first = rows[0] if rows else {}
    lines = [
        "| step | commit | instructions per delivered message | vs start "
        "| instructions per connect+bind | vs start |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for index, row in enumerate(rows):
        cells = [str(index), f"`{row['ref']}` {row['label']}"]
        for key in ("per_message", "per_connect"):
            value, start = row[key], first.get(key)
            cells.append("-" if value is None else f"{round(value):,}")
            cells.append("-" if value is None or not start else f"{value / start:.3f}x")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Two panels, instructions per message and per connect+bind, over the steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{index}: {row['label']}" for index, row in enumerate(rows)]
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2))
    for ax, key, title in (
        (axes[0], "per_message", "instructions per delivered message"),
        (axes[1], "per_connect", "instructions per connect+bind"),
    ):
        values = [row[key] or 0 for row in rows]
        ax.bar(range(len(values)), values, color="#4c72b0")
        ax.set_xticks(range(len(values)), labels, rotation=35, ha="right", fontsize=7)
        ax.set_title(title, fontsize=10)
        ax.set_ylabel("instructions (callgrind Ir, all threads)")
        for index, value in enumerate(values):
            ax.annotate(
                f"{value / 1e6:.2f} M", (index, value), ha="center", va="bottom", fontsize=8
            )
    fig.suptitle("Cost per message and per binding over the performance steps (fixed workload)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.steps", description=__doc__)
    defaults = Workload()
    parser.add_argument("--messages", type=int, default=defaults.messages)
    parser.add_argument("--connects", type=int, default=defaults.connects)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    cpus = usable_cpus(GENERATOR_CPUS)
    if cpus:
        os.sched_setaffinity(0, cpus)  # the clients run here, off the server's core
    started = time.monotonic()
    work = Workload(messages=args.messages, connects=args.connects)
    rows = count_steps(STEPS, work, args.out)
    text = (
        f"Server instructions for {work.messages:,} send_message over {work.pairs} pairs and "
        f"{work.connects:,} connect+bind, at each step\n\n{table(rows)}\n"
    )
    (args.out / "steps.json").write_text(json.dumps(rows, indent=2) + "\n")
    (args.out / "steps.md").write_text(text)
    plot(rows, args.out / "steps.png")
    print(text)
    print(f"took {time.monotonic() - started:.0f} s; written to {args.out}")
    return 1 if any(row["error"] for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
