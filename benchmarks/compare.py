"""`--compare GIT_REF`: a baseline checkout, and the two trees' figures side by side.

The baseline is a temporary `git worktree` of the ref (detached, under a temporary
directory), removed when the comparison ends, also when it fails or is interrupted. Its
servers run with the same interpreter, the worktree as working directory and first on
PYTHONPATH, so nothing is installed; `handler_origin` checks before any run that `handler`
resolves into the worktree, and the bytecode the baseline's servers leave in the worktree
shows afterwards that they ran its modules. The load generator, the bare relays and this
module always come from the working tree: only the server under test differs.

The comparison itself is arithmetic on the two report sections of each scenario: for every
row of the table, both medians and the ratio current / baseline (per CPU-second figures as
rows of their own), and for the scenario's headline figures every run, in the order they ran.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import statistics
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from benchmarks.report import NOISY_CORES, fmt
from benchmarks.servers import REPO, Source


def _git(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["git", *args], cwd=REPO, capture_output=True, text=True, timeout=120, check=False
    )


def resolve(ref: str) -> str:
    """The full commit id `ref` names; ValueError when it names none."""
    found = _git("rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}")
    if found.returncode != 0 or not found.stdout.strip():
        raise ValueError(f"--compare: {ref!r} is not a commit of {REPO}")
    return found.stdout.strip()


@contextlib.contextmanager
def checkout(ref: str) -> Iterator[Source]:
    """A detached worktree of `ref` in a temporary directory, as the baseline `Source`;
    removed (and git's record of it pruned) on the way out, however that happens."""
    commit = resolve(ref)
    parent = Path(tempfile.mkdtemp(prefix="bench-baseline-"))
    tree = parent / "tree"
    try:
        added = _git("worktree", "add", "--detach", "--quiet", str(tree), commit)
        if added.returncode != 0:
            raise RuntimeError(f"git worktree add {ref} failed: {added.stderr.strip()}")
        yield Source("baseline", tree, ref=ref, commit=commit)
    finally:
        _git("worktree", "remove", "--force", str(tree))
        shutil.rmtree(parent, ignore_errors=True)
        _git("worktree", "prune")


def compiled_modules(root: Path) -> int:
    """How many `handler` modules were compiled inside the checkout at `root`: its servers
    write their bytecode there (`benchmarks.servers.server_env`), so this counts the modules
    they imported from it."""
    return sum(1 for _ in (root / "handler").rglob("__pycache__/*.pyc"))


def _ratio(current: Any, baseline: Any) -> float | None:
    """current / baseline, for two numbers (not pass/fail booleans) and a baseline not 0."""
    numbers = all(
        isinstance(v, int | float) and not isinstance(v, bool) for v in (current, baseline)
    )
    return current / baseline if numbers and baseline else None


def _pairs(
    current: list[dict[str, Any]], baseline: list[dict[str, Any]]
) -> list[tuple[dict[str, Any] | None, dict[str, Any] | None]]:
    """Rows of the two trees side by side: by position when both have the same rows (a label
    may carry a measured value, such as the ceiling's generator load), else by metric."""
    if len(current) == len(baseline):
        return list(zip(current, baseline, strict=True))
    by_metric = {row["metric"]: row for row in baseline}
    pairs: list[tuple[dict[str, Any] | None, dict[str, Any] | None]] = [
        (row, by_metric.pop(row["metric"], None)) for row in current
    ]
    return pairs + [(None, row) for row in by_metric.values()]


def _get(row: dict[str, Any] | None, key: str) -> Any:
    return None if row is None else row.get(key)


def _figures(current: dict[str, Any], baseline: dict[str, Any]) -> list[dict[str, Any]]:
    """Every table row of both trees; a per CPU-s figure is a row of its own."""
    figures = []
    for now, before in _pairs(current.get("rows", []), baseline.get("rows", [])):
        row = now if now is not None else before
        assert row is not None
        figures.append(
            {
                "figure": row["metric"],
                "unit": row["unit"],
                "baseline": _get(before, "value"),
                "current": _get(now, "value"),
                "ratio": _ratio(_get(now, "value"), _get(before, "value")),
            }
        )
        if _get(now, "per_cpu_s") or _get(before, "per_cpu_s"):
            figures.append(
                {
                    "figure": f"{row['metric']}: per CPU-s",
                    "unit": row.get("per_cpu_unit", ""),
                    "baseline": _get(before, "per_cpu_s"),
                    "current": _get(now, "per_cpu_s"),
                    "ratio": _ratio(_get(now, "per_cpu_s"), _get(before, "per_cpu_s")),
                }
            )
    return figures


def _median(values: list[Any]) -> float | None:
    numbers = [v for v in values if isinstance(v, int | float)]
    return statistics.median(numbers) if numbers else None


def compare_section(current: dict[str, Any], baseline: dict[str, Any]) -> dict[str, Any]:
    """One scenario's comparison, from the two trees' report sections."""
    sections = {"baseline": baseline, "current": current}
    out: dict[str, Any] = {
        "title": current.get("title") or baseline.get("title"),
        "problems": {},
        "failed_runs": {side: s.get("failed_runs", []) for side, s in sections.items()},
        "noise_cores": {
            side: (s.get("median") or {}).get("other_cpu_frac") for side, s in sections.items()
        },
        "figures": _figures(current, baseline),
        "headline": [],
    }
    for side, section in sections.items():
        if section.get("error"):
            out["problems"][side] = f"error: {section['error'].splitlines()[0]}"
        elif section.get("skipped"):
            out["problems"][side] = f"skipped: {section['skipped']}"
    labels = list(current.get("headline") or {}) or list(baseline.get("headline") or {})
    for label in labels:
        runs = {
            side: list((s.get("headline") or {}).get(label, [])) for side, s in sections.items()
        }
        medians = {side: _median(values) for side, values in runs.items()}
        out["headline"].append(
            {
                "figure": label,
                "baseline_runs": runs["baseline"],
                "current_runs": runs["current"],
                "baseline": medians["baseline"],
                "current": medians["current"],
                "ratio": _ratio(medians["current"], medians["baseline"]),
            }
        )
    return out


def compare(
    current: dict[str, Any], baseline: dict[str, Any], *, compiled: int | None = None
) -> dict[str, Any]:
    """The comparison of two reports of the same scenarios, the `current` and `baseline`
    trees'; `compiled` is `compiled_modules` of the baseline checkout."""
    return {
        "current": current["meta"],
        "baseline": {**baseline["meta"], "modules_compiled": compiled},
        "runs": current["meta"]["runs"],
        "order": "interleaved: baseline, current, baseline, current, ...",
        "ratio": "current median / baseline median",
        "scenarios": {
            key: compare_section(section, baseline["scenarios"].get(key, {}))
            for key, section in current["scenarios"].items()
        },
    }


def _label(key: str) -> str:
    return key if key == "ceiling" else f"({key})"


def _ratio_text(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.3f}x"


def _with_unit(value: Any, unit: str) -> str:
    return "-" if value is None else f"{fmt(value)} {unit}".strip()


def markdown(comparison: dict[str, Any]) -> str:
    """The comparison as printed and written to comparison.md."""
    base, current = comparison["baseline"], comparison["current"]
    runs = comparison["runs"]
    compiled = base.get("modules_compiled")
    trace = (
        f"its servers compiled {compiled} `handler` modules there"
        if compiled
        else "**no `handler` bytecode was left there**: see logs/baseline/"
    )
    dirty = current.get("uncommitted") or []
    lines = [
        f"# Benchmark comparison: current tree vs baseline `{base.get('ref')}`",
        "",
        f"- baseline: `{base.get('ref')}` = commit `{base.get('commit')}`, run from a temporary "
        f"git worktree (`handler` from {base.get('handler', '?')}; {trace})",
        f"- current: commit `{current.get('commit')}`"
        + (f" plus uncommitted changes to {', '.join(dirty)}" if dirty else "")
        + f" (`handler` from {current.get('handler', '?')})",
        f"- same scenarios and options for both: profile `{current['profile']}`, client "
        f"`{current['client']}`; the load generator is the current tree's, only the server differs",
        f"- {runs} run{'s' if runs != 1 else ''} of each tree per figure, interleaved (baseline, "
        "current, baseline, ...); medians quoted; ratio = current median / baseline median",
        "- per CPU-s figures are the ones to trust on a shared machine; for them a ratio above 1 "
        "means the current tree does more per server CPU-second",
        "",
        "## Headline figures",
        "",
        "| scenario | figure | baseline runs | current runs | baseline | current | ratio |",
        "| --- | --- | --- | --- | ---: | ---: | ---: |",
    ]
    for key, section in comparison["scenarios"].items():
        for figure in section["headline"]:
            lines.append(
                f"| {_label(key)} | {figure['figure']} "
                f"| {', '.join(fmt(v) for v in figure['baseline_runs']) or '-'} "
                f"| {', '.join(fmt(v) for v in figure['current_runs']) or '-'} "
                f"| {fmt(figure['baseline'])} | {fmt(figure['current'])} "
                f"| **{_ratio_text(figure['ratio'])}** |"
            )
    lines += [
        "",
        "## Every figure (medians)",
        "",
        "| scenario | figure | baseline | current | ratio |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for key, section in comparison["scenarios"].items():
        for side, problem in section["problems"].items():
            lines.append(f"| {_label(key)} | {side}: {problem.replace('|', '/')} | | | |")
        for figure in section["figures"]:
            unit = figure["unit"]
            lines.append(
                f"| {_label(key)} | {figure['figure']} | {_with_unit(figure['baseline'], unit)} "
                f"| {_with_unit(figure['current'], unit)} | {_ratio_text(figure['ratio'])} |"
            )
    notes = []
    for key, section in comparison["scenarios"].items():
        for side, failures in section["failed_runs"].items():
            for failure in failures:
                notes.append(
                    f"- {_label(key)}: **a {side} run failed** and is left out: "
                    f"{failure.splitlines()[0]}"
                )
        for side, noise in section["noise_cores"].items():
            if noise is not None and noise > NOISY_CORES:
                notes.append(
                    f"- {_label(key)}: **noisy** {side} runs: other processes used {noise:.2f} "
                    "cores during the measured windows (median)"
                )
    if "ceiling" in comparison["scenarios"]:
        notes.append(
            "- ceiling: the bare relays and the generator are the current tree's on both sides, "
            "so its ratios show the machine's noise alone"
        )
    notes.append(
        "- every table of each tree: results.md (current) and baseline/results.md; every run: "
        "results.json"
    )
    lines += ["", "## Notes", "", *notes]
    return "\n".join(lines) + "\n"


def write(comparison: dict[str, Any], out: Path) -> None:
    """comparison.json and comparison.md into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "comparison.json").write_text(json.dumps(comparison, indent=2, default=str))
    (out / "comparison.md").write_text(markdown(comparison))
