"""The steps table of `benchmarks.steps` (pure: no valgrind, no server)."""

from __future__ import annotations

from pathlib import Path

from benchmarks.steps import STEPS, plot, table


def test_the_table_gives_each_step_its_counts_and_the_ratio_to_the_start() -> None:
    rows = [
        {"ref": "aaa", "label": "start", "per_message": 2_000_000.0, "per_connect": 4e6},
        {"ref": "bbb", "label": "faster", "per_message": 1_500_000.0, "per_connect": None},
    ]
    lines = table(rows).splitlines()
    assert lines[2] == "| 0 | `aaa` start | 2,000,000 | 1.000x | 4,000,000 | 1.000x |"
    assert lines[3] == "| 1 | `bbb` faster | 1,500,000 | 0.750x | - | - |"


def test_the_plot_is_written(tmp_path: Path) -> None:
    rows = [
        {"ref": ref, "label": label, "per_message": 1e6 / (n + 1), "per_connect": 4e6}
        for n, (ref, label) in enumerate(STEPS)
    ]
    plot(rows, tmp_path / "steps.png")
    assert (tmp_path / "steps.png").stat().st_size > 10_000
