"""The report's stack yardsticks table, from a hand-written report: no servers, no runs."""

from __future__ import annotations

from typing import Any

import pytest

from benchmarks.report import markdown, stack_yardsticks


def relay_runs(stack: str, *pairs: tuple[float, float]) -> list[dict[str, Any]]:
    """Ceiling runs of one relay: (delivered msg/s, msg per server CPU-s) each."""
    return [
        {"stack": stack, "delivered_per_s": rate, "delivered_per_server_cpu_s": per_cpu}
        for rate, per_cpu in pairs
    ]


def scenarios(*, with_a: bool) -> dict[str, Any]:
    ceiling = {
        "rows": [],
        "series": {
            "generator ceiling, raw client vs raw relay": relay_runs("raw", (90e3, 300e3)),
            "generator ceiling, trio-websocket client vs raw relay": relay_runs(
                "raw", (15e3, 50e3)
            ),
            "bare Quart-Trio relay on Hypercorn (stack reference)": relay_runs(
                "quart", (20e3, 24e3), (22e3, 26e3), (30e3, 28e3)
            ),
            "bare relay on asyncio websockets (stack reference)": relay_runs(
                "websockets", (40e3, 52e3)
            ),
            "latency floor": [{"p50_ms": 0.5, "p99_ms": 1.0}],
            "connect": [{"connects_per_s": 3000.0}],
        },
    }
    found: dict[str, Any] = {"ceiling": ceiling}
    if with_a:
        found["a"] = {
            "rows": [],
            "median": {"delivered_per_s": 12e3, "delivered_per_server_cpu_s": 13e3},
        }
    return found


def test_one_row_per_relay_stack_with_its_ratio_to_quart() -> None:
    rows = stack_yardsticks(scenarios(with_a=False))
    assert [row["stack"] for row in rows] == ["raw", "quart", "websockets"]
    by_stack = {row["stack"]: row for row in rows}
    # the raw relay's row is its first series, the one the raw client drove
    assert by_stack["raw"]["delivered_per_s"] == 90e3
    assert by_stack["quart"]["delivered_per_s"] == 22e3  # medians over the runs
    assert by_stack["quart"]["per_server_cpu_s"] == 26e3
    assert by_stack["quart"]["vs_quart"] == 1.0
    assert by_stack["websockets"]["vs_quart"] == pytest.approx(2.0)
    assert by_stack["websockets"]["relay"] == "bare relay: asyncio websockets"


def test_the_handler_of_a_joins_when_it_ran() -> None:
    rows = stack_yardsticks(scenarios(with_a=True))
    handler = rows[-1]
    assert handler["stack"] is None
    assert "(a)" in handler["relay"]
    assert handler["delivered_per_s"] == 12e3
    assert handler["vs_quart"] == pytest.approx(0.5)


def test_no_ceiling_no_table() -> None:
    assert stack_yardsticks({}) == []
    assert stack_yardsticks({"a": {"median": {"delivered_per_s": 1.0}}}) == []


def test_without_quart_there_is_no_ratio() -> None:
    found = scenarios(with_a=True)
    del found["ceiling"]["series"]["bare Quart-Trio relay on Hypercorn (stack reference)"]
    assert all(row["vs_quart"] is None for row in stack_yardsticks(found))


def test_markdown_has_the_table() -> None:
    report = {
        "meta": {"profile": "quick", "runs": 1, "client": "raw"},
        "scenarios": scenarios(with_a=True),
    }
    text = markdown(report)
    assert "## Stack yardsticks" in text
    header = (
        "| relay | delivered msg/s | msg per server CPU-s | per CPU-s vs Quart-Trio relay"
        " | target | result |"
    )
    table = text.split(header)[1].split("\n\n")[0].strip().splitlines()[1:]
    assert table == [
        "| bare relay: raw trio sockets | 90,000 | 300,000 | 11.5x |  |  |",
        "| bare relay: Quart-Trio on Hypercorn | 22,000 | 26,000 | 1.00x |  |  |",
        "| bare relay: asyncio websockets | 40,000 | 52,000 | 2.00x |  |  |",
        "| the handler, (a): 1 worker, SQLite | 12,000 | 13,000 | 0.500x | >= 1.6x | **FAIL** |",
    ]
    assert "## Stack yardsticks" not in markdown({**report, "scenarios": {}})
