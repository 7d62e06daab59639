"""Smoke run of every benchmark scenario at tiny sizes, and of `--compare`.

It keeps `python -m benchmarks` working as the handler changes: real server processes, the
real generator, the real report. It checks that each section has the fields the report
promises and that they are sane, never timing targets (this machine is shared and noisy).
The comparison runs (a) and (d) against a worktree of HEAD and checks that both trees ran,
interleaved, that the baseline's servers ran the worktree's code, and that the worktree is
gone afterwards. `--vary presence` runs (a), (d) and (j) with presence off and on, and checks
that the two configs reached their servers (what (j) saw) and that the budgets were judged;
`--vary webhooks` runs (a) and (b) without webhooks and with a receiver that never answers, and
checks that the servers POSTed to it and that both budgets (a least and a most) were judged.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from benchmarks.cli import run
from benchmarks.report import stack_yardsticks
from benchmarks.scenarios import PROFILES, SCENARIOS
from benchmarks.servers import REPO

# about 40 s, 15 s for the comparison and 40 s for presence off vs on: real servers
pytestmark = pytest.mark.slow

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
    assert len(series) == 8  # 6 relay series (the raw relay once per client), floor, connects
    stacks = {run_["stack"] for runs in series.values() for run_ in runs if "stack" in run_}
    assert stacks == {"raw", "quart", "asgi", "trio-websocket", "websockets"}
    for label, runs in series.items():
        for run_ in runs:
            if label == "latency floor":
                assert 0 < run_["p50_ms"] <= run_["p99_ms"]
            else:
                assert run_.get("delivered_per_s", run_.get("connects_per_s", 0)) > 0
    report, out = smoke
    yardsticks = stack_yardsticks(report["scenarios"])
    assert [row["stack"] for row in yardsticks] == [
        "raw",
        "quart",
        "asgi",
        "trio-websocket",
        "websockets",
        None,  # the handler, (a)
    ]
    assert all(row["per_server_cpu_s"] > 0 and row["vs_quart"] > 0 for row in yardsticks)
    assert "## Stack yardsticks" in (out / "results.md").read_text()


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


def test_i_group_fanout(smoke: tuple[dict[str, Any], Path]) -> None:
    data = section(smoke, "i")
    params = SMOKE["i"]
    for run_ in data["runs"]:
        assert run_["members"] == params["members"]
        assert run_["senders"] == params["senders"]
        assert run_["sent"] > 0
        assert run_["expected_copies"] == run_["sent"] * params["members"]
        # exactly once: every other member got every message, every sender its own copy
        assert run_["delivered"] == run_["sent"] * (params["members"] - 1)
        assert run_["acks"] == run_["sent"]
        assert run_["duplicates"] == run_["missing"] == run_["foreign"] == 0
        assert not run_["errors"]
        assert 0 < run_["p50_ms"] <= run_["p99_ms"] <= run_["max_ms"]
        assert run_["receipts_per_s"] > 0  # the server's receipts were read
    assert data["median"]["delivered_per_s"] > 0
    checks = {row["metric"].split(" (")[0]: row["ok"] for row in data["rows"] if row["target"]}
    assert checks["duplicate copies"] is checks["missing copies"] is True


def test_j_presence_churn(smoke: tuple[dict[str, Any], Path]) -> None:
    data = section(smoke, "j")
    params = SMOKE["j"]
    assert data["seeding"]["method"] in ("store", "frames")
    series = {run_["series"]: run_ for run_ in data["runs"]}
    assert set(series) == {"reconnect", "departures"}
    for run_ in data["runs"]:
        assert run_["users"] == params["users"]
        assert run_["contacts"] == params["contacts"]
        assert run_["reconnects"] > 0
        assert run_["answers"] > 0  # fetch_presence after every bind, counted apart
        assert run_["answer_online_frac"] > 0
        assert run_["answer_missing"] == run_["strangers"] == 0
        assert 0 < run_["reconnect_p50_ms"] <= run_["reconnect_p99_ms"]
        assert 0 < run_["server_cpu_frac"] <= 1.2
        assert run_["setup_live_online"] > 0  # contacts coming online during the setup
        # the grace hides a reconnect; every view ends with every contact online
        assert run_["flicker"] == run_["final_stale"] == run_["setup_stale"] == 0
        assert run_["disconnected"] == run_["skipped"] == 0
        assert not run_["errors"]
    assert series["reconnect"]["offline_frames"] == 0
    # the control: users away past the grace are announced offline, then online again
    away = series["departures"]
    assert away["departures_per_s"] > 0
    assert away["offline_departed_per_s"] > 0
    assert away["online_return_per_s"] > 0
    checks = [row for row in data["rows"] if row["target"]]
    assert checks
    assert all(row["ok"] is True for row in checks), checks


@pytest.fixture(scope="module")
def comparison(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[dict[str, Any], Path, list[str]]:
    head = subprocess.run(
        ["git", "rev-parse", "--verify", "HEAD"], cwd=REPO, capture_output=True, check=False
    )
    if head.returncode != 0:
        pytest.skip(f"--compare needs a git checkout with a commit; {REPO} is not one")
    out = tmp_path_factory.mktemp("compare")
    said: list[str] = []
    report = run(
        profile="smoke", scenarios=["a", "d"], runs=2, compare="HEAD", out=out, say=said.append
    )
    return report, out, said


def test_compare_runs_both_trees_interleaved(
    comparison: tuple[dict[str, Any], Path, list[str]],
) -> None:
    report, _, said = comparison
    runs = [line.strip() for line in said if line.strip().startswith("run ")]
    assert runs == [
        f"run {n}/2 [{tree}]"
        for _ in "ad"
        for n in (1, 2)
        for tree in ("baseline HEAD", "current tree")
    ], said
    for tree in (report, report["baseline"]):
        assert set(tree["scenarios"]) == {"a", "d"}
        for name, section in tree["scenarios"].items():
            assert "error" not in section, f"{name}: {section.get('error')}"
            assert not section["failed_runs"], section["failed_runs"]
            # (d) has two series: fresh users, and the reconnect storm.
            assert len(section["runs"]) == (4 if name == "d" else 2)


def test_compare_reports_medians_and_ratios(
    comparison: tuple[dict[str, Any], Path, list[str]],
) -> None:
    report, out, _ = comparison
    data = report["comparison"]
    assert data == json.loads((out / "comparison.json").read_text())
    assert data["runs"] == 2
    headline = {
        (key, figure["figure"]): figure
        for key, section in data["scenarios"].items()
        for figure in section["headline"]
    }
    for key in ("a", "d"):
        per_cpu = "delivered msg" if key == "a" else "connect+bind"
        figure = headline[(key, f"{per_cpu} per server CPU-s")]
        assert len(figure["baseline_runs"]) == len(figure["current_runs"]) == 2
        assert figure["baseline"] > 0
        assert figure["current"] > 0
        assert figure["ratio"] == pytest.approx(figure["current"] / figure["baseline"])
    rows = data["scenarios"]["a"]["figures"]
    assert any(row["figure"].endswith("per CPU-s") and row["ratio"] for row in rows)
    text = (out / "comparison.md").read_text()
    assert "baseline `HEAD`" in text
    assert (
        "| scenario | figure | baseline runs | current runs | baseline | current | ratio |" in text
    )
    assert "2 runs of each tree per figure, interleaved" in text
    assert "x** |" in text  # a headline ratio
    assert json.loads((out / "baseline" / "results.json").read_text())["meta"]["ref"] == "HEAD"
    assert (out / "results.md").is_file()


def test_compare_ran_the_worktree_and_removed_it(
    comparison: tuple[dict[str, Any], Path, list[str]],
) -> None:
    report, _, _ = comparison
    baseline = report["comparison"]["baseline"]
    handler = Path(baseline["handler"])
    tree = handler.parent
    assert handler.name == "handler"
    assert tree.name == "tree"
    assert tree.parent.name.startswith("bench-baseline-")
    assert baseline["modules_compiled"] > 0  # the baseline's servers imported from it
    assert Path(report["meta"]["handler"]) == REPO / "handler"
    assert not tree.parent.exists()
    listed = subprocess.run(
        ["git", "worktree", "list", "--porcelain"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert str(tree) not in listed


@pytest.fixture(scope="module")
def presence_varied(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[dict[str, Any], Path, list[str]]:
    out = tmp_path_factory.mktemp("vary")
    said: list[str] = []
    report = run(
        profile="smoke",
        scenarios=["a", "d", "j"],
        runs=1,
        vary="presence",
        out=out,
        say=said.append,
    )
    return report, out, said


def test_vary_presence_alternates_the_two_configs(
    presence_varied: tuple[dict[str, Any], Path, list[str]],
) -> None:
    report, _, said = presence_varied
    runs = [line.strip() for line in said if "run 1/1 [" in line]
    assert runs == [
        f"{prefix}run 1/1 [{side}]"
        for prefix in ("", "", "reconnect storm: ", "reconnect: ", "departures: ")
        for side in ("presence off", "presence on")
    ], said
    baseline = report["baseline"]
    assert baseline["meta"]["limits"] == {"presence": False}
    assert report["meta"]["limits"] == {"presence": True}
    assert baseline["meta"]["setting"] == "presence off"
    for tree in (report, baseline):
        assert set(tree["scenarios"]) == {"a", "d", "j"}
        for name, data in tree["scenarios"].items():
            assert "error" not in data, f"{name}: {data.get('error')}"
            assert not data["failed_runs"], data["failed_runs"]
    # the setting reached the servers: with presence off nobody is ever online (the answers
    # come, with nobody in them or everyone offline)
    for run_ in baseline["scenarios"]["j"]["runs"]:
        assert run_["live_frames"] == 0
        assert not run_["answer_online_frac"]
        assert run_["answers"] > 0
    assert all(run_["answer_online_frac"] > 0 for run_ in report["scenarios"]["j"]["runs"])
    notes = " ".join(baseline["scenarios"]["j"]["notes"])
    assert "presence is off" in notes
    off_checks = [row for row in baseline["scenarios"]["j"]["rows"] if "grace" in row["metric"]]
    assert off_checks
    assert all(row["ok"] is None for row in off_checks)  # presence targets do not apply


def test_vary_presence_reports_ratios_and_budgets(
    presence_varied: tuple[dict[str, Any], Path, list[str]],
) -> None:
    report, out, _ = presence_varied
    data = report["comparison"]
    assert data == json.loads((out / "comparison.json").read_text())
    assert data["setting"]["name"] == "presence"
    assert "`limits.presence: false`" in data["setting"]["difference"]
    judged = {
        (key, figure["figure"]): figure
        for key, section in data["scenarios"].items()
        for figure in section["headline"]
        if "budget" in figure
    }
    assert set(judged) == {
        ("a", "delivered msg per server CPU-s"),
        ("d", "connect+bind per server CPU-s"),
    }
    for figure in judged.values():
        assert figure["ratio"] == pytest.approx(figure["current"] / figure["baseline"])
        assert figure["ok"] is (figure["ratio"] >= figure["budget"])
    assert judged[("a", "delivered msg per server CPU-s")]["budget"] == 0.9
    assert judged[("d", "connect+bind per server CPU-s")]["budget"] == 0.85
    text = (out / "comparison.md").read_text()
    assert "# Benchmark comparison: presence on vs presence off (same tree)" in text
    assert "## Budgets: presence on / presence off" in text
    assert "| scenario | figure | presence off runs | presence on runs |" in text
    assert "server setting: presence off" in (out / "baseline" / "results.md").read_text()
    assert "server setting: presence on" in (out / "results.md").read_text()


@pytest.fixture(scope="module")
def webhooks_varied(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[dict[str, Any], Path, list[str]]:
    out = tmp_path_factory.mktemp("vary-webhooks")
    said: list[str] = []
    report = run(
        profile="smoke", scenarios=["a", "b"], runs=1, vary="webhooks", out=out, say=said.append
    )
    return report, out, said


def test_vary_webhooks_alternates_the_two_configs(
    webhooks_varied: tuple[dict[str, Any], Path, list[str]],
) -> None:
    report, out, said = webhooks_varied
    runs = [line.strip() for line in said if "run 1/1 [" in line]
    assert runs == [
        f"run 1/1 [{side}]" for _ in "ab" for side in ("webhooks off", "webhooks on, receiver hung")
    ], said
    assert not [line for line in said if "was killed" in line], said  # stopped in time
    baseline = report["baseline"]
    assert baseline["meta"]["setting"] == "webhooks off"
    assert baseline["meta"]["limits"] == report["meta"]["limits"] == {}
    assert "config" not in baseline["meta"]
    assert "never answering" in report["meta"]["config"]
    for tree in (report, baseline):
        assert set(tree["scenarios"]) == {"a", "b"}
        for name, data in tree["scenarios"].items():
            assert "error" not in data, f"{name}: {data.get('error')}"
            assert not data["failed_runs"], data["failed_runs"]
            assert all(not run_["errors"] for run_ in data["runs"])
    assert report["scenarios"]["b"]["median"]["lost"] == 0
    # the setting reached the servers: the webhooks side's servers POSTed to the receiver,
    # which never answered; the other side has no receiver at all
    for name in ("a-0", "b-0"):
        seen = (out / "logs" / "current" / f"{name}-sections.log").read_text()
        assert "none answered" in seen
        requests = int(seen.split(" connections, ")[1].split(" requests")[0])
        assert requests > 0, seen
    assert not list((out / "logs" / "baseline").glob("*-sections.log"))
    text = (out / "results.md").read_text()
    assert "server setting: webhooks on, receiver hung (`webhooks.endpoints`" in text
    assert (
        "server setting: webhooks off (the defaults)"
        in (out / "baseline" / "results.md").read_text()
    )


def test_vary_webhooks_reports_ratios_and_budgets(
    webhooks_varied: tuple[dict[str, Any], Path, list[str]],
) -> None:
    report, out, _ = webhooks_varied
    data = report["comparison"]
    assert data == json.loads((out / "comparison.json").read_text())
    assert data["setting"]["name"] == "webhooks"
    assert "webhooks off: the defaults" in data["setting"]["difference"]
    assert data["setting"]["budgets"] == [
        {"scenario": "a", "figure": "delivered msg per server CPU-s", "least_ratio": 0.9},
        {"scenario": "b", "figure": "delivery latency p99 (ms)", "most_ratio": 1.1},
    ]
    judged = {
        (key, figure["figure"]): figure
        for key, section in data["scenarios"].items()
        for figure in section["headline"]
        if "budget" in figure
    }
    assert set(judged) == {
        ("a", "delivered msg per server CPU-s"),
        ("b", "delivery latency p99 (ms)"),
    }
    for figure in judged.values():
        assert len(figure["baseline_runs"]) == len(figure["current_runs"]) == 1
        assert figure["baseline"] > 0
        assert figure["current"] > 0
        assert figure["ratio"] == pytest.approx(figure["current"] / figure["baseline"])
    relay = judged[("a", "delivered msg per server CPU-s")]
    assert (relay["bound"], relay["budget"]) == (">=", 0.9)
    assert relay["ok"] is (relay["ratio"] >= 0.9)
    latency = judged[("b", "delivery latency p99 (ms)")]
    assert (latency["bound"], latency["budget"]) == ("<=", 1.1)
    assert latency["ok"] is (latency["ratio"] <= 1.1)
    text = (out / "comparison.md").read_text()
    assert "# Benchmark comparison: webhooks on, receiver hung vs webhooks off (same tree)" in text
    assert "## Budgets: webhooks on, receiver hung / webhooks off" in text
    assert "| (b) | delivery latency p99 (ms) |" in text
    assert "| <= 1.1x |" in text
    assert "| >= 0.9x |" in text
    assert "| scenario | figure | webhooks off runs | webhooks on, receiver hung runs |" in text
