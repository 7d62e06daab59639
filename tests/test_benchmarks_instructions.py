"""The parts of `benchmarks.instructions` that need no valgrind: reading a callgrind dump and
the table. The counting itself runs servers under callgrind for minutes, so it has no test."""

from __future__ import annotations

from typing import Any

import pytest

from benchmarks.instructions import dump_totals, failure, figures, table

# The head and tail of a dump taken with `callgrind_control -d` after `--instr-atstart=no`:
# the header's summary stays 0, the totals line holds the window's count.
DUMP = """\
# callgrind format
version: 1
creator: callgrind-3.19.0
pid: 9250
cmd:  /work/main/.venv/bin/python -m handler --config config.json
part: 1

desc: I1 cache:
desc: Timerange: Basic block 0 - 13722845
desc: Trigger: dump

positions: line
events: Ir
summary: 0

ob=(1) /usr/lib/x86_64-linux-gnu/libsqlite3.so.0.8.6
fl=(1) ???
fn=(1) sqlite3VdbeExec
0 1207054

totals: 65616366
"""


def test_totals_win_over_the_summary() -> None:
    assert dump_totals(DUMP) == 65_616_366


def test_the_event_column_is_read_from_the_events_line() -> None:
    text = "events: Ir Dr Dw\nsummary: 10 20 30\n"
    assert dump_totals(text) == 10
    assert dump_totals(text, "Dw") == 30


def test_a_dump_without_counts_is_an_error() -> None:
    with pytest.raises(ValueError, match="totals"):
        dump_totals("events: Ir\n")
    with pytest.raises(ValueError, match="Ir"):
        dump_totals("events: Dr\ntotals: 5\n")


def _tree(per_message: float, per_bind: float) -> dict[str, Any]:
    """A tree's counts as `benchmarks.instructions.measure` reports them (the table's keys)."""
    relay = {"per_delivered_message": per_message, "instructions": per_message * 10}
    connect = {"per_connect_bind": per_bind, "instructions": per_bind * 2}
    return {
        "relay": {**relay, "delivered": 10, "receipts": 4},
        "connect": {**connect, "bound": 2},
    }


LABELS = {"baseline": "baseline HEAD~1", "current": "current tree"}


def test_the_table_has_counts_with_separators_and_ratios() -> None:
    rows = figures({"baseline": _tree(1_000_000, 4_000_000), "current": _tree(900_000, 4e6)})
    text = table(rows, LABELS)
    assert "| figure | baseline HEAD~1 | current tree | current / baseline |" in text
    assert "| instructions per delivered message | 1,000,000 | 900,000 | 0.900x |" in text
    assert "| instructions per connect+bind | 4,000,000 | 4,000,000 | 1.000x |" in text


def test_a_tree_that_failed_shows_dashes_and_its_cause() -> None:
    rows = figures({"baseline": {"error": "RuntimeError: x"}, "current": _tree(900_000, 4e6)})
    assert "| instructions per delivered message | - | 900,000 | - |" in table(rows, LABELS)
    nested = ExceptionGroup("nursery", [ExceptionGroup("inner", [OSError("refused")])])
    assert failure(nested) == "OSError: refused"
