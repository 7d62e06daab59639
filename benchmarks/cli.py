"""Command line and the `run()` entry point: pick scenarios and sizes, run, write the report."""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from benchmarks import report as reporting
from benchmarks.scenarios import PROFILES, SCENARIOS, Context, run_scenario
from benchmarks.servers import REPO, raise_nofile

DEFAULT_OUT = REPO / "benchmarks" / "results"
ORDER = list(SCENARIOS)


def _meta(profile: str, runs: int, client: str) -> dict[str, Any]:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
    except OSError:
        commit = "?"
    try:
        # The tree under test may differ from its commit: say so, file by file.
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "handler"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=False,
        ).stdout.split("\n")
    except OSError:
        dirty = []
    model = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "profile": profile,
        "runs": runs,
        "client": client,
        "commit": commit,
        "uncommitted": [line[3:] for line in dirty if line.strip()],
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "loadavg": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "nice": -int(os.environ.get("BENCH_NICE", "0") or 0),
    }


def run(
    *,
    profile: str = "full",
    scenarios: Sequence[str] | None = None,
    out: Path = DEFAULT_OUT,
    runs: int | None = None,
    client: str = "raw",
    say: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run the chosen scenarios and write the report into `out`; returns the report."""
    raise_nofile()
    shutil.rmtree(out / "logs", ignore_errors=True)  # logs of this invocation only
    chosen = [name for name in ORDER if scenarios is None or name in scenarios]
    sizes = PROFILES[profile]
    count = runs or sizes.runs
    ctx = Context(profile=sizes, runs=count, logs=out / "logs", client=client, say=say)
    report: dict[str, Any] = {"meta": _meta(profile, count, client), "scenarios": {}}
    for name in chosen:
        say(f"[{name}] {SCENARIOS[name].__doc__}")
        report["scenarios"][name] = run_scenario(name, ctx)
        reporting.write(report, out)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description="Benchmark suite of the WebSocket Handler."
    )
    parser.add_argument("--quick", action="store_true", help="one run each, shorter windows")
    parser.add_argument(
        "--profile", choices=sorted(PROFILES), help="sizes to use (default: full, or quick)"
    )
    parser.add_argument(
        "--scenarios",
        default=",".join(ORDER),
        help=f"comma-separated subset of {','.join(ORDER)} (default: all)",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory")
    parser.add_argument("--runs", type=int, help="repetitions per figure (median quoted)")
    parser.add_argument(
        "--client", choices=["raw", "trio-websocket"], default="raw", help="generator client"
    )
    parser.add_argument(
        "--nice",
        type=int,
        default=0,
        help="run the server and generator this much above normal priority (needs root); "
        "on a shared machine it keeps other work from preempting them",
    )
    args = parser.parse_args(argv)
    if args.nice:
        os.environ["BENCH_NICE"] = str(args.nice)
    wanted = [name.strip() for name in args.scenarios.split(",") if name.strip()]
    unknown = [name for name in wanted if name not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario(s): {', '.join(unknown)}")
    profile = args.profile or ("quick" if args.quick else "full")
    report = run(
        profile=profile, scenarios=wanted, out=args.out, runs=args.runs, client=args.client
    )
    print()
    print((args.out / "results.md").read_text())
    failed = [
        name
        for name, section in report["scenarios"].items()
        if section.get("error") or section.get("failed_runs")
    ]
    if failed:
        print(f"scenarios that failed to run: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0
