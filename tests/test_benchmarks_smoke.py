"""Smoke run of every benchmark scenario at tiny sizes.

It keeps `python -m benchmarks` working as the handler changes: real server processes, the
real generator, the real report. It checks that each section has the fields the report
promises and that they are sane, never timing targets (this machine is shared and noisy).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from benchmarks.cli import run
from benchmarks.scenarios import PROFILES, SCENARIOS

pytestmark = pytest.mark.slow  # about 25 s: every scenario starts its own servers

SMOKE = PROFILES["smoke"].params


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    out = tmp_path_factory.mktemp("bench")
    report = run(profile="smoke", out=out, say=lambda _line: None)
    return report, out


def section(smoke: tuple[dict[str, Any], Path], name: str) -> dict[str, Any]:
    report, _ = smoke
    data: dict[str, Any] = report["scenarios"][name]
    assert "error" not in data, data.get("error")
    assert not data["failed_runs"], data["failed_runs"]
    return data


def test_every_scenario_ran_and_wrote_the_report(smoke: tuple[dict[str, Any], Path]) -> None:
    report, out = smoke
    assert list(report["scenarios"]) == list(SCENARIOS)
    saved = json.loads((out / "results.json").read_text())
    assert saved["meta"]["profile"] == "smoke"
    table = (out / "results.md").read_text()
    assert "| scenario | metric | median | per CPU-s | target | result |" in table
    for name, data in report["scenarios"].items():
        assert "error" not in data, f"{name}: {data.get('error')}"
        if not data.get("skipped"):
            assert data["rows"], name
            assert all(isinstance(row["metric"], str) for row in data["rows"])
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "plots_skipped" in saved
    else:
        assert {"latency.png", "throughput.png", "memory.png"} <= set(saved["plots"])
        assert all((out / name).stat().st_size > 0 for name in saved["plots"])


def test_ceiling(smoke: tuple[dict[str, Any], Path]) -> None:
    data = section(smoke, "ceiling")
    series = data["series"]
    assert len(series) == 5
    for label, runs in series.items():
        for run_ in runs:
            if label == "latency floor":
                assert 0 < run_["p50_ms"] <= run_["p99_ms"]
            else:
                assert run_.get("delivered_per_s", run_.get("connects_per_s", 0)) > 0


def test_a_saturated_relay(smoke: tuple[dict[str, Any], Path]) -> None:
    median = section(smoke, "a")["median"]
    assert median["delivered_per_s"] > 0
    assert median["delivered_per_server_cpu_s"] > 0
    assert 0 < median["server_cpu_frac"] <= 1.2  # pinned to one core
    assert 0 < median["delivery_p50_ms"] <= median["delivery_p99_ms"]
    assert all(not run_["errors"] for run_ in section(smoke, "a")["runs"])


def test_b_fixed_load(smoke: tuple[dict[str, Any], Path]) -> None:
    data = section(smoke, "b")
    median = data["median"]
    assert median["lost"] == 0
    assert 0 < median["p50_ms"] <= median["p99_ms"] <= median["max_ms"]
    assert 0 < median["server_cpu_frac"] <= 1.2
    assert median["delivered_per_s"] > 0
    assert all(not run_["errors"] for run_ in data["runs"])


def test_c_idle_memory(smoke: tuple[dict[str, Any], Path]) -> None:
    median = section(smoke, "c")["median"]
    steps = SMOKE["c"]["steps"]
    for step in steps:
        assert median[f"held_{step}"] == step
        assert median[f"rss_mib_{step}"] > median["base_rss_mib"] > 0
    assert median[f"per_conn_kib_{steps[-1]}"] > 0


def test_d_connect_rate(smoke: tuple[dict[str, Any], Path]) -> None:
    data = section(smoke, "d")
    assert data["median"]["bound"] == SMOKE["d"]["count"]
    assert data["median"]["connects_per_s"] > 0
    assert all(not run_["errors"] for run_ in data["runs"])


def test_e_backlog(smoke: tuple[dict[str, Any], Path]) -> None:
    median = section(smoke, "e")["median"]
    params = SMOKE["e"]
    assert median["messages"] == params["chats"] * params["per_chat"]
    assert median["chats"] == params["chats"]
    assert median["bytes"] > median["messages"] * 100  # every message carries 100 characters
    assert median["elapsed_s"] > 0


def test_f_fetch_chats(smoke: tuple[dict[str, Any], Path]) -> None:
    data = section(smoke, "f")
    params = SMOKE["f"]
    assert data["median"]["chats"] == params["chats"]
    assert data["median"]["messages"] == params["chats"] * params["per_chat"]
    assert data["median"]["first_s"] > 0
    assert data["seeding"]["method"] in ("store", "frames")


def test_g_two_workers(smoke: tuple[dict[str, Any], Path]) -> None:
    data = section(smoke, "g")
    if data["skipped"]:
        assert isinstance(data["skipped"], str)
        pytest.skip(f"(g) skipped itself: {data['skipped']}")
    workers = {run_["workers"] for run_ in data["runs"]}
    assert workers == {1, 2}
    assert all(run_["delivered_per_s"] > 0 for run_ in data["runs"])
    assert any("projected" in row["metric"] for row in data["rows"])
