"""`--compare GIT_REF`: a baseline checkout, and the two trees' figures side by side.

The baseline is a temporary `git worktree` of the ref (detached, under a temporary
directory), removed when the comparison ends, also when it fails or is interrupted. Its
servers run with the same interpreter, the worktree as working directory and first on
PYTHONPATH, so nothing is installed; `handler_origin` checks before any run that `handler`
resolves into the worktree, and the bytecode the baseline's servers leave in the worktree
shows afterwards that they ran its modules. The load generator, the bare relays and this
module always come from the working tree: only the server under test differs.

`--vary SETTING` compares two sides of the working tree instead, whose servers differ only in
a setting of their config.json (`SETTINGS`: presence off as the baseline, on as the current
side; webhooks off, and on with a receiver that hangs); a setting may carry budgets, the least
(or, for a latency, the most) ratios its headline figures must reach.

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
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from benchmarks import webhooks
from benchmarks.report import NOISY_CORES, fmt, verdict
from benchmarks.servers import REPO, Sections, Source


@dataclass(frozen=True)
class Most:
    """A budget that bounds a ratio from above (a latency may grow this much at most); a bare
    number in `Setting.budgets` is the least ratio allowed."""

    ratio: float


def _bound(budget: float | Most) -> tuple[str, float]:
    """(">=" or "<=", the ratio) of a budget."""
    return ("<=", budget.ratio) if isinstance(budget, Most) else (">=", budget)


@dataclass(frozen=True)
class Setting:
    """A server setting measured both ways in one invocation (`--vary NAME`): two sides of the
    working tree, `baseline` and `current`, whose config.json differ in their `limits` or in
    other sections (`Source.config`) only."""

    name: str
    baseline: Source
    current: Source
    # (scenario, headline figure) -> the least ratio current / baseline allowed, or `Most`
    budgets: Mapping[tuple[str, str], float | Most] = field(default_factory=dict, hash=False)

    @property
    def difference(self) -> str:
        """The config difference, as the report states it."""
        sides = []
        for side in (self.baseline, self.current):
            parts = [f"`limits.{k}: {json.dumps(v)}`" for k, v in side.limits.items()]
            if side.config is not None:
                parts.append(side.config.summary)
            sides.append(f"{side.setting}: {', '.join(parts) or 'the defaults'}")
        return "; ".join(sides)


SETTINGS: Final = {
    "presence": Setting(
        "presence",
        baseline=Source("baseline", REPO, setting="presence off", limits={"presence": False}),
        current=Source("current", REPO, setting="presence on", limits={"presence": True}),
        # the issue's budget: what presence may cost the relay and the connect rate
        budgets={
            ("a", "delivered msg per server CPU-s"): 0.9,
            ("d", "connect+bind per server CPU-s"): 0.85,
        },
    ),
    "webhooks": Setting(
        "webhooks",
        baseline=Source("baseline", REPO, setting="webhooks off"),
        current=Source(
            "current",
            REPO,
            setting="webhooks on, receiver hung",
            config=Sections(webhooks.SUMMARY, webhooks.hung_receiver),
        ),
        # an outbox row per message in its transaction, and a delivery task whose every POST
        # times out: what that may cost the delivery latency and the relay
        budgets={
            ("a", "delivered msg per server CPU-s"): 0.9,
            ("b", "delivery latency p99 (ms)"): Most(1.1),
        },
    ),
}


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


def _budget_entry(budget: float | Most) -> dict[str, float]:
    """A budget as comparison.json lists it: `least_ratio` or `most_ratio`."""
    bound, limit = _bound(budget)
    return {"most_ratio" if bound == "<=" else "least_ratio": limit}


def _judge(scenarios: dict[str, Any], budgets: Mapping[tuple[str, str], float | Most]) -> None:
    """Mark each headline figure that has a budget: `budget` (the least ratio, or the most
    when `bound` is "<="), `bound` and `ok`."""
    for key, section in scenarios.items():
        for figure in section["headline"]:
            budget = budgets.get((key, figure["figure"]))
            if budget is not None:
                bound, limit = _bound(budget)
                ratio = figure["ratio"]
                figure["budget"] = limit
                figure["bound"] = bound
                if ratio is None:
                    figure["ok"] = None
                else:
                    figure["ok"] = ratio <= limit if bound == "<=" else ratio >= limit


def compare(
    current: dict[str, Any],
    baseline: dict[str, Any],
    *,
    compiled: int | None = None,
    setting: Setting | None = None,
) -> dict[str, Any]:
    """The comparison of two reports of the same scenarios, the `current` and `baseline`
    trees'; `compiled` is `compiled_modules` of the baseline checkout. Of two sides of one
    tree (`setting`), the budgets are judged too."""
    scenarios = {
        key: compare_section(section, baseline["scenarios"].get(key, {}))
        for key, section in current["scenarios"].items()
    }
    out: dict[str, Any] = {
        "current": current["meta"],
        "baseline": {**baseline["meta"], "modules_compiled": compiled},
        "runs": current["meta"]["runs"],
        "order": "interleaved: baseline, current, baseline, current, ...",
        "ratio": "current median / baseline median",
        "scenarios": scenarios,
    }
    if setting is not None:
        _judge(scenarios, setting.budgets)
        out["setting"] = {
            "name": setting.name,
            "difference": setting.difference,
            "budgets": [
                {"scenario": key, "figure": figure, **_budget_entry(budget)}
                for (key, figure), budget in setting.budgets.items()
            ],
        }
    return out


def _label(key: str) -> str:
    return key if key == "ceiling" else f"({key})"


def _ratio_text(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.3f}x"


def _with_unit(value: Any, unit: str) -> str:
    return "-" if value is None else f"{fmt(value)} {unit}".strip()


def _header(comparison: dict[str, Any]) -> list[str]:
    """The lines saying what was compared with what."""
    base, current = comparison["baseline"], comparison["current"]
    runs = comparison["runs"]
    dirty = current.get("uncommitted") or []
    setting = comparison.get("setting")
    if setting is not None:
        lines = [
            f"# Benchmark comparison: {current.get('setting')} vs {base.get('setting')} "
            "(same tree)",
            "",
            f"- both sides: commit `{current.get('commit')}`"
            + (f" plus uncommitted changes to {', '.join(dirty)}" if dirty else "")
            + f" (`handler` from {current.get('handler', '?')})",
            f"- the only difference, in each server's config.json: {setting['difference']}",
            f"- same scenarios and options for both: profile `{current['profile']}`, client "
            f"`{current['client']}`",
            f"- {runs} run{'s' if runs != 1 else ''} of each side per figure, interleaved "
            f"({base.get('setting')}, {current.get('setting')}, ...); medians quoted; ratio = "
            f"{current.get('setting')} median / {base.get('setting')} median",
        ]
    else:
        compiled = base.get("modules_compiled")
        trace = (
            f"its servers compiled {compiled} `handler` modules there"
            if compiled
            else "**no `handler` bytecode was left there**: see logs/baseline/"
        )
        lines = [
            f"# Benchmark comparison: current tree vs baseline `{base.get('ref')}`",
            "",
            f"- baseline: `{base.get('ref')}` = commit `{base.get('commit')}`, run from a "
            f"temporary git worktree (`handler` from {base.get('handler', '?')}; {trace})",
            f"- current: commit `{current.get('commit')}`"
            + (f" plus uncommitted changes to {', '.join(dirty)}" if dirty else "")
            + f" (`handler` from {current.get('handler', '?')})",
            f"- same scenarios and options for both: profile `{current['profile']}`, client "
            f"`{current['client']}`; the load generator is the current tree's, only the "
            "server differs",
            f"- {runs} run{'s' if runs != 1 else ''} of each tree per figure, interleaved "
            "(baseline, current, baseline, ...); medians quoted; ratio = current median / "
            "baseline median",
        ]
    return [
        *lines,
        "- per CPU-s figures are the ones to trust on a shared machine; for them a ratio above 1 "
        "means the current side does more per server CPU-second",
        "",
    ]


def _budgets(comparison: dict[str, Any]) -> list[str]:
    """The budget table of a varied setting (nothing for a comparison of commits)."""
    rows = [
        f"| {_label(key)} | {figure['figure']} | {_ratio_text(figure['ratio'])} "
        f"| {figure.get('bound', '>=')} {figure['budget']:g}x | {verdict(figure['ok'])} |"
        for key, section in comparison["scenarios"].items()
        for figure in section["headline"]
        if "budget" in figure
    ]
    if not rows:
        return []
    current, base = comparison["current"], comparison["baseline"]
    return [
        f"## Budgets: {current.get('setting')} / {base.get('setting')}",
        "",
        "| scenario | figure | ratio | budget | result |",
        "| --- | --- | ---: | --- | --- |",
        *rows,
        "",
    ]


def markdown(comparison: dict[str, Any]) -> str:
    """The comparison as printed and written to comparison.md."""
    base, current = comparison["baseline"], comparison["current"]
    before = base.get("setting") or "baseline"
    now = current.get("setting") or "current"
    names = {"baseline": before, "current": now}
    lines = [
        *_header(comparison),
        *_budgets(comparison),
        "## Headline figures",
        "",
        f"| scenario | figure | {before} runs | {now} runs | {before} | {now} | ratio |",
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
        f"| scenario | figure | {before} | {now} | ratio |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for key, section in comparison["scenarios"].items():
        for side, problem in section["problems"].items():
            lines.append(f"| {_label(key)} | {names[side]}: {problem.replace('|', '/')} | | | |")
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
                    f"- {_label(key)}: **a {names[side]} run failed** and is left out: "
                    f"{failure.splitlines()[0]}"
                )
        for side, noise in section["noise_cores"].items():
            if noise is not None and noise > NOISY_CORES:
                notes.append(
                    f"- {_label(key)}: **noisy** {names[side]} runs: other processes used "
                    f"{noise:.2f} cores during the measured windows (median)"
                )
    if "ceiling" in comparison["scenarios"]:
        notes.append(
            "- ceiling: the bare relays and the generator are the current tree's on both sides, "
            "so its ratios show the machine's noise alone"
        )
    notes.append(
        f"- every table of each side: results.md ({now}) and baseline/results.md ({before}); "
        "every run: results.json"
    )
    lines += ["", "## Notes", "", *notes]
    return "\n".join(lines) + "\n"


def write(comparison: dict[str, Any], out: Path) -> None:
    """comparison.json and comparison.md into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "comparison.json").write_text(json.dumps(comparison, indent=2, default=str))
    (out / "comparison.md").write_text(markdown(comparison))
