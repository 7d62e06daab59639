"""The run skeleton every scenario shares, and the records it fills.

A scenario is a declaration (`Scenario`): its title, its series of runs (`Variant`: which
server, which generator job, which figures one run yields), an optional dataset, and how its
table rows follow from the runs. `run_scenario` carries out the rest the same way for all:

1. per server tree, a scratch directory, and the dataset if any (a history or a contact
   graph, seeded once through that tree's store, then copied for every run, so runs start
   from the same state);
2. per series, per repetition, per tree: start the server (fresh config and database, pinned
   to its core), run one generator job against it (the generator warms up, then stops at its
   checkpoints while the orchestrator reads both sides' CPU seconds and RSS), stop the server,
   and turn the result and readings into the run's figures;
3. per tree, the table rows from the medians over its runs.

Alone there is one tree, the working tree. With `--compare` there are two, and step 2
alternates them (baseline, current, baseline, current ...) so that noise on the shared machine
falls on both alike. `--vary SETTING` alternates the same way between two sides of one tree
whose servers differ only in their config: its `limits` (`Source.limits`) or other sections
(`Source.config`). A failed run is
recorded and the others still count; a failure outside the runs becomes the section's `error`
instead of stopping the suite.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from benchmarks import seed as seeding
from benchmarks.runner import run_loadgen, window
from benchmarks.servers import (
    CURRENT,
    ServerProcess,
    Source,
    echo_server,
    handler_server,
    temp_workdir,
)

SERVER_CPUS: Final = (0,)
GENERATOR_CPUS: Final = (1,)


@dataclass(frozen=True)
class Profile:
    """Sizes of every scenario for one kind of run (full, quick, smoke)."""

    name: str
    runs: int
    params: dict[str, dict[str, Any]]
    stop_grace_s: float = 10.0


@dataclass
class Context:
    """What a scenario needs from the run: sizes, where to write, how to connect, which trees."""

    profile: Profile
    runs: int
    logs: Path
    client: str = "raw"
    say: Callable[[str], None] = print
    scratch: Path | None = None
    sources: Sequence[Source] = (CURRENT,)

    def params(self, scenario: str) -> dict[str, Any]:
        return dict(self.profile.params[scenario])

    def log(self, name: str, source: Source | None = None) -> Path:
        """logs/NAME alone; logs/TREE/NAME in a comparison, so the two trees' logs stay apart."""
        folder = self.logs
        if source is not None and len(self.sources) > 1:
            folder = folder / source.name
        folder.mkdir(parents=True, exist_ok=True)
        return folder / name

    def tag(self, source: Source) -> str:
        """Suffix of progress lines naming the tree, in a comparison only."""
        return f" [{source.label}]" if len(self.sources) > 1 else ""

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
        source: Source = CURRENT,
        cpus: tuple[int, ...] | None = SERVER_CPUS,
        **options: Any,
    ) -> Iterator[tuple[ServerProcess, str]]:
        """The handler of `source` with this profile's stop grace, logging to NAME-server.log;
        the source's `limits` (a setting being varied) win over the variant's, and its other
        config sections are started before the server (logging to NAME-sections.log) and
        stopped after it."""
        limits = {**(options.pop("limits", None) or {}), **source.limits}
        if limits:
            options["limits"] = limits
        with contextlib.ExitStack() as stack:
            if source.config is not None:
                log = self.log(f"{name}-sections.log", source)
                options["sections"] = stack.enter_context(source.config.start(log))
            server, secret = stack.enter_context(
                handler_server(
                    workdir,
                    cpus=cpus,
                    log_path=self.log(f"{name}-server.log", source),
                    stop_grace_s=self.profile.stop_grace_s,
                    root=source.root,
                    **options,
                )
            )
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
    """A scenario's report section, for one tree."""

    title: str
    params: dict[str, Any]
    runs: list[dict[str, Any]] = field(default_factory=list)
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    skipped: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    failed_runs: list[str] = field(default_factory=list)
    # The runs again, by the series (`Variant.series`) they belong to; not written out.
    series: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

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


def per(amount: float | None, cpu: float | None) -> float | None:
    """`amount` per CPU-second, or None when either is missing."""
    if amount is None or not cpu:
        return None
    return amount / cpu


@dataclass(frozen=True)
class Measured:
    """What one generator job gave back: its result and the readings at its checkpoints."""

    result: dict[str, Any]
    readings: dict[str, dict[str, float]]

    def window(self, start: str = "measure_start", end: str = "measure_end") -> dict[str, float]:
        """Wall and CPU seconds between two checkpoints (by default the measured window)."""
        return window(self.readings, start, end)


@dataclass(frozen=True)
class Variant:
    """One series of runs of a scenario: the server to start, the job to drive, the figures."""

    job: dict[str, Any]  # the generator job; port, client and the server's secret are added
    measure: Callable[[Measured], dict[str, Any]]  # one run's figures
    series: str = ""  # name of the series, "" when the scenario has only one
    label: str = ""  # how progress lines and failures name it
    echo: str | None = None  # a bare relay of `benchmarks.echo` instead of the handler
    client: str | None = None  # the generator's client, if not the run's `--client`
    server: dict[str, Any] = field(default_factory=dict)  # more `handler_server` options
    backends: tuple[str, ...] = ()  # processes whose CPU is read as well (PostgreSQL, Redis)


@dataclass(frozen=True)
class Dataset:
    """A history seeded before the runs: `params["chats"]` x `params["per_chat"]` messages
    (shapes in `benchmarks.seed`)."""

    owner: str
    sender: str

    def describe(self, params: dict[str, Any]) -> str:
        return f"{params['chats'] * params['per_chat']:,} messages"

    def seed(
        self, db_path: Path, params: dict[str, Any], *, workdir: Path, root: Path
    ) -> dict[str, Any]:
        return seeding.seed(
            db_path,
            owner=self.owner,
            sender=self.sender,
            chats=params["chats"],
            per_chat=params["per_chat"],
            workdir=workdir,
            root=root,
        )


@dataclass(frozen=True)
class Contacts:
    """A contact graph seeded before the runs: `params["users"]` users on a ring, each sharing
    a direct chat with `params["contacts"]` others (`benchmarks.seed.seed_contacts`)."""

    prefix: str

    def describe(self, params: dict[str, Any]) -> str:
        chats = params["users"] * params["contacts"] // 2
        return f"{chats:,} direct chats between {params['users']:,} users"

    def seed(
        self, db_path: Path, params: dict[str, Any], *, workdir: Path, root: Path
    ) -> dict[str, Any]:
        return seeding.seed_contacts(
            db_path,
            prefix=self.prefix,
            users=params["users"],
            contacts=params["contacts"],
            workdir=workdir,
            root=root,
        )


@dataclass(frozen=True)
class Headline:
    """A figure whose every run a comparison lists, next to the ratio of medians."""

    label: str
    key: str
    series: str = ""


@dataclass(frozen=True)
class Scenario:
    """A scenario's declaration; `run_scenario` does what all scenarios share."""

    key: str
    summary: str  # one line, printed when it starts
    title: Callable[[dict[str, Any]], str]
    variants: Callable[[Context, dict[str, Any]], list[Variant]]
    rows: Callable[[Outcome, Context], None]  # rows and notes from the runs
    dataset: Dataset | Contacts | None = None
    unavailable: Callable[[Source], str | None] | None = None  # why it cannot run, or None
    # Figures listed run by run in a comparison; a function of the params when they name them.
    headline: tuple[Headline, ...] | Callable[[dict[str, Any]], tuple[Headline, ...]] = ()

    def headlines(self, params: dict[str, Any]) -> tuple[Headline, ...]:
        return self.headline(params) if callable(self.headline) else self.headline


@dataclass
class _Arm:
    """One tree's side of a scenario while it runs."""

    source: Source
    out: Outcome
    workdir: Path
    template: Path | None = None
    seconds: float = 0.0
    error: str | None = None


def _prepare(spec: Scenario, ctx: Context, arm: _Arm, params: dict[str, Any]) -> None:
    """The tree's scratch directory and, if the scenario has one, its dataset: seeded by that
    tree's own store, since two trees' schemas may differ."""
    arm.workdir.mkdir(parents=True, exist_ok=True)
    if spec.dataset is None:
        return
    ctx.say(f"  seeding {spec.dataset.describe(params)}{ctx.tag(arm.source)}")
    arm.template = arm.workdir / "template.db"
    arm.out.extra["seeding"] = spec.dataset.seed(
        arm.template, params, workdir=arm.workdir, root=arm.source.root
    )


@contextlib.contextmanager
def _server(
    spec: Scenario, ctx: Context, arm: _Arm, variant: Variant, run: int
) -> Iterator[tuple[ServerProcess, str | None]]:
    """The server of one run: a bare relay, or the tree's handler on a fresh database (a copy
    of the dataset when there is one)."""
    if variant.echo is not None:
        log = ctx.log(f"echo-{variant.echo}.log", arm.source)
        with echo_server(log, variant.echo, cpus=SERVER_CPUS) as relay:
            yield relay, None
        return
    name = "-".join([spec.key, *filter(None, [variant.series]), str(run)])
    db = arm.workdir / f"{name}.db"
    if arm.template is not None:
        seeding.copy_database(arm.template, db)
    with ctx.handler(arm.workdir, name, source=arm.source, db_path=db, **variant.server) as (
        server,
        secret,
    ):
        yield server, secret


def _run_once(spec: Scenario, ctx: Context, arm: _Arm, variant: Variant, run: int) -> None:
    """One repetition of one series on one tree; its figures are taken once the server has
    stopped, from the readings of its checkpoints."""
    started = time.monotonic()
    label = f"{variant.label} run {run + 1}" if variant.label else f"run {run + 1}"
    prefix = f"{variant.label}: " if variant.label else ""
    with ctx.attempt(arm.out, label):
        ctx.say(f"  {prefix}run {run + 1}/{ctx.runs}{ctx.tag(arm.source)}")
        with _server(spec, ctx, arm, variant, run) as (server, secret):
            job = {**variant.job, "port": server.port, "client": variant.client or ctx.client}
            if secret is not None:
                job["secret"] = secret
            result, readings = run_loadgen(
                job,
                server=server,
                cpus=GENERATOR_CPUS,
                log_path=ctx.log(f"{spec.key}.log", arm.source),
                backends=variant.backends,
            )
        metrics = variant.measure(Measured(result, readings))
        arm.out.series.setdefault(variant.series, []).append(metrics)
        arm.out.runs.append(metrics)
    arm.seconds += time.monotonic() - started


def _section(spec: Scenario, arm: _Arm) -> dict[str, Any]:
    if arm.error is not None:
        return {"title": spec.key, "error": arm.error, "rows": [], "seconds": arm.seconds}
    section = arm.out.as_dict()
    section["headline"] = {
        figure.label: [run.get(figure.key) for run in arm.out.series.get(figure.series, [])]
        for figure in spec.headlines(arm.out.params)
    }
    section["seconds"] = arm.seconds
    return section


def run_scenario(spec: Scenario, ctx: Context) -> dict[str, dict[str, Any]]:
    """Run one scenario on every tree of `ctx`, their runs interleaved; returns each tree's
    report section by tree name."""
    params = ctx.params(spec.key)

    def fail(arm: _Arm, error: Exception, started: float) -> None:
        ctx.say(f"  FAILED{ctx.tag(arm.source)}: {error}")
        arm.error = f"{type(error).__name__}: {error}"
        arm.seconds += time.monotonic() - started

    with temp_workdir(ctx.scratch) as tmp:
        arms = [
            _Arm(source, Outcome(spec.title(params), params), Path(tmp) / source.name)
            for source in ctx.sources
        ]
        ready = []
        for arm in arms:
            started = time.monotonic()
            reason = spec.unavailable(arm.source) if spec.unavailable else None
            if reason:
                arm.out.skipped = reason
                ctx.say(f"  skipped{ctx.tag(arm.source)}: {reason}")
                continue
            try:
                _prepare(spec, ctx, arm, params)
            except Exception as error:
                fail(arm, error, started)
                continue
            arm.seconds += time.monotonic() - started
            ready.append(arm)
        try:
            variants = spec.variants(ctx, params)
        except Exception as error:
            for arm in ready:
                fail(arm, error, time.monotonic())
            ready = []
            variants = []
        for variant in variants:
            for run in range(ctx.runs):
                for arm in ready:
                    _run_once(spec, ctx, arm, variant, run)
        for arm in ready:
            started = time.monotonic()
            try:
                spec.rows(arm.out, ctx)
            except Exception as error:
                fail(arm, error, started)
    return {arm.source.name: _section(spec, arm) for arm in arms}
