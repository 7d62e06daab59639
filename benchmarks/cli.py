"""Command line and the `run()` entry point: pick scenarios and sizes, run, write the report.

With `--compare GIT_REF` the same invocation also measures a server from a temporary checkout
of GIT_REF (`benchmarks.compare`), its runs alternating with the working tree's, and writes
the ratios beside the two reports. `--vary SETTING` does the same with two configurations of
the working tree's server (`benchmarks.compare.SETTINGS`), e.g. presence off and on, or
webhooks off and on.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import Any, Final

from benchmarks import compare as comparing
from benchmarks import report as reporting
from benchmarks.harness import Context, run_scenario
from benchmarks.scenarios import PROFILES, SCENARIOS
from benchmarks.servers import CURRENT, REPO, Source, handler_origin, raise_nofile

DEFAULT_OUT: Final = REPO / "benchmarks" / "results"
ORDER: Final = list(SCENARIOS)


def _git_commit(source: Source) -> str:
    if source.commit:
        return source.commit[:7]
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
    except OSError:
        return "?"


def _uncommitted(source: Source) -> list[str]:
    """The working tree's changes to `handler/` (the tree under test may differ from its
    commit: say so, file by file); a baseline checkout has none."""
    if source.ref:
        return []
    try:
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "handler"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=False,
        ).stdout.split("\n")
    except OSError:
        dirty = []
    return [line[3:] for line in dirty if line.strip()]


def _origin(source: Source, *, strict: bool) -> str:
    """Where the servers of `source` import `handler` from. `strict` (a comparison): anything
    but that tree's own package is an error, since the figures would belong to other code."""
    try:
        where = handler_origin(source.root)
    except RuntimeError as error:
        if strict and source.ref:
            raise
        return f"? ({error})"
    if strict and not where.is_relative_to(source.root.resolve()):
        raise RuntimeError(
            f"servers of the {source.label} would import `handler` from {where}, "
            f"not from {source.root}"
        )
    return str(where)


def _meta(
    profile: str, runs: int, client: str, source: Source = CURRENT, *, strict: bool = False
) -> dict[str, Any]:
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
        "tree": source.name,
        **({"ref": source.ref} if source.ref else {}),
        "commit": _git_commit(source),
        "uncommitted": _uncommitted(source),
        "handler": _origin(source, strict=strict),
        **({"setting": source.setting, "limits": dict(source.limits)} if source.setting else {}),
        **({"config": source.config.summary} if source.config is not None else {}),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "loadavg": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "nice": -int(os.environ.get("BENCH_NICE", "0") or 0),
    }


@contextlib.contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt meanwhile, so that a terminated comparison still
    stops its servers and removes its worktree (Python's default would skip every `finally`)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _measure(
    chosen: Sequence[str],
    ctx: Context,
    reports: dict[str, dict[str, Any]],
    write: Callable[[], None],
) -> None:
    """Run the scenarios in turn, filing each tree's section into its report."""
    for name in chosen:
        spec = SCENARIOS[name]
        ctx.say(f"[{name}] {spec.summary}")
        for tree, section in run_scenario(spec, ctx).items():
            reports[tree]["scenarios"][name] = section
        write()  # after every scenario, so an interrupted suite leaves what it measured


@contextlib.contextmanager
def _sides(
    compare: str | None, vary: str | None, say: Callable[[str], None]
) -> Iterator[tuple[Source, Source, comparing.Setting | None]]:
    """The two sides of a comparison: (baseline, current, the setting varied if any)."""
    if vary is not None:
        setting = comparing.SETTINGS[vary]
        say(f"varying {vary}: {setting.difference}")
        yield setting.baseline, setting.current, setting
        return
    assert compare is not None
    with comparing.checkout(compare) as baseline:
        say(f"baseline: {compare} = {baseline.commit[:7]}, in a worktree at {baseline.root}")
        yield baseline, CURRENT, None


def run(
    *,
    profile: str = "full",
    scenarios: Sequence[str] | None = None,
    out: Path = DEFAULT_OUT,
    runs: int | None = None,
    client: str = "raw",
    say: Callable[[str], None] = print,
    compare: str | None = None,
    vary: str | None = None,
) -> dict[str, Any]:
    """Run the chosen scenarios and write the report into `out`; returns the report.

    `compare` (a git ref): run every scenario against that ref's server too, its runs
    alternating with this tree's; the report then also holds the baseline's report
    (`baseline`, written to `out`/baseline/) and the comparison (`comparison`, written to
    comparison.json and comparison.md). `vary` (a name of `benchmarks.compare.SETTINGS`):
    the same, with the two sides of that setting instead of two trees.
    """
    if compare is not None and vary is not None:
        raise ValueError("--compare and --vary cannot be combined")
    raise_nofile()
    shutil.rmtree(out / "logs", ignore_errors=True)  # logs of this invocation only
    chosen = [name for name in ORDER if scenarios is None or name in scenarios]
    sizes = PROFILES[profile]
    count = runs or sizes.runs

    def context(sources: Sequence[Source]) -> Context:
        logs = out / "logs"
        return Context(sizes, count, logs, client=client, say=say, sources=sources)

    def write(
        report: dict[str, Any],
        baseline: Source | None = None,
        setting: comparing.Setting | None = None,
    ) -> None:
        """The report (and, comparing, the baseline's and the comparison) into `out`."""
        if baseline is not None:
            compiled = None if setting else comparing.compiled_modules(baseline.root)
            report["comparison"] = comparing.compare(
                report, report["baseline"], compiled=compiled, setting=setting
            )
            reporting.write(report["baseline"], out / "baseline")
            comparing.write(report["comparison"], out)
        reporting.write(report, out)

    if compare is None and vary is None:
        report: dict[str, Any] = {"meta": _meta(profile, count, client), "scenarios": {}}
        _measure(chosen, context([CURRENT]), {CURRENT.name: report}, lambda: write(report))
        return report

    with _sigterm_unwinds(), _sides(compare, vary, say) as (baseline, current, setting):
        before = {"meta": _meta(profile, count, client, baseline, strict=True), "scenarios": {}}
        report = {
            "meta": _meta(profile, count, client, current, strict=True),
            "scenarios": {},
            "baseline": before,
        }
        # The baseline comes first: every round of runs goes baseline, then current.
        _measure(
            chosen,
            context([baseline, current]),
            {baseline.name: before, current.name: report},
            lambda: write(report, baseline, setting),
        )
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
    parser.add_argument(
        "--compare",
        metavar="GIT_REF",
        help="also run every chosen scenario against a server from GIT_REF (checked out in a "
        "temporary git worktree), its runs alternating with this tree's, and report both "
        "trees' medians and the ratios current/baseline (comparison.md, comparison.json)",
    )
    parser.add_argument(
        "--vary",
        choices=sorted(comparing.SETTINGS),
        help="measure every chosen scenario with the working tree's server configured both "
        "ways, runs alternating (presence: `limits.presence` false as the baseline, true as "
        "the current side; webhooks: none as the baseline, one endpoint whose receiver never "
        "answers as the current side), and report medians, ratios and the setting's budgets "
        "(comparison.md, comparison.json)",
    )
    args = parser.parse_args(argv)
    if args.compare and args.vary:
        parser.error("--compare and --vary cannot be combined")
    if args.nice:
        os.environ["BENCH_NICE"] = str(args.nice)
    wanted = [name.strip() for name in args.scenarios.split(",") if name.strip()]
    unknown = [name for name in wanted if name not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario(s): {', '.join(unknown)}")
    profile = args.profile or ("quick" if args.quick else "full")
    if args.compare:
        try:
            comparing.resolve(args.compare)
        except ValueError as error:
            parser.error(str(error))
    try:
        report = run(
            profile=profile,
            scenarios=wanted,
            out=args.out,
            runs=args.runs,
            client=args.client,
            compare=args.compare,
            vary=args.vary,
        )
    except KeyboardInterrupt:
        # Servers are stopped and the worktree removed by then; what ran is in --out.
        print(f"interrupted; the scenarios that finished are in {args.out}", file=sys.stderr)
        return 130
    print()
    paired = bool(args.compare or args.vary)
    print((args.out / ("comparison.md" if paired else "results.md")).read_text())
    trees = [("", report), *([("baseline ", report["baseline"])] if paired else [])]
    failed = [
        f"{tree}{name}"
        for tree, tree_report in trees
        for name, section in tree_report["scenarios"].items()
        if section.get("error") or section.get("failed_runs")
    ]
    if failed:
        print(f"scenarios that failed to run: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0
