"""Developer sessions: `nox -s tests`, `nox -s lint`, `nox -s bench`.

nox needs no system-wide install (which Debian's and Ubuntu's Python refuse, as an "externally
managed environment"): from a venv, `python3 -m venv .venv && .venv/bin/pip install nox &&
.venv/bin/nox -s tests`. Each session installs the project into its own venv under `.nox/`.
"""

from __future__ import annotations

import shutil

import nox

nox.options.sessions = ["tests", "lint"]
nox.options.reuse_existing_virtualenvs = True

LINT_PATHS = ["handler", "tests", "benchmarks", "test_client.py", "noxfile.py"]


@nox.session
def tests(session: nox.Session) -> None:
    """The whole test suite, with branch coverage of handler/."""
    session.install("-e", ".[test]")
    session.run(
        "pytest",
        "--cov=handler",
        "--cov-branch",
        "--cov-report=term-missing:skip-covered",
        *session.posargs,
    )


@nox.session
def lint(session: nox.Session) -> None:
    """ruff (lint + format check) everywhere, mypy --strict on the server and the Tk client."""
    session.install("-e", ".[test]", "ruff>=0.6", "mypy>=1.11")
    session.run("ruff", "check", *LINT_PATHS)
    session.run("ruff", "format", "--check", *LINT_PATHS)
    session.run("mypy", "--strict", "handler", "test_client.py")


@nox.session
def bench(session: nox.Session) -> None:
    """The benchmark suite; writes JSON, a markdown table and PNG plots to benchmarks/results/."""
    session.install("-e", ".[test,bench]")
    session.run("python", "-m", "benchmarks", *session.posargs)
    if not session.posargs and shutil.which("valgrind"):
        # The cost per message over the performance steps, in instructions (callgrind).
        session.run("python", "-m", "benchmarks.steps")
