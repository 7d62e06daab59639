"""Orchestration: run the load generator next to a server and read both at its checkpoints.

The orchestrator is plain synchronous Python: it starts processes, relays checkpoints and does
arithmetic. Keeping it out of the event loops under test means its own work never shows up in
either side's CPU figures.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.servers import REPO, ServerProcess, cpu_seconds, pids_named, rss_bytes


class LoadgenError(RuntimeError):
    """The generator failed; the message quotes the end of its log."""


def machine_busy_seconds() -> float:
    """CPU seconds all cores spent not idle since boot (to tell how noisy a window was)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def snapshot(
    server: ServerProcess | None, loadgen_pid: int, backends: Sequence[str] = ()
) -> dict[str, float]:
    """CPU seconds and RSS of the server (all its processes) and of the generator, now."""
    reading: dict[str, float] = {"t": time.monotonic(), "machine_busy_s": machine_busy_seconds()}
    if server is not None:
        pids = server.pids()
        reading["server_cpu_s"] = cpu_seconds(pids)
        reading["server_rss"] = rss_bytes(pids)
        reading["server_processes"] = len(pids)
    reading["generator_cpu_s"] = cpu_seconds([loadgen_pid])
    if backends:
        reading["backend_cpu_s"] = cpu_seconds(pids_named(*backends))
    return reading


def run_loadgen(
    job: dict[str, Any],
    *,
    server: ServerProcess | None,
    cpus: Sequence[int] | None = (1,),
    log_path: Path,
    backends: Sequence[str] = (),
    timeout: float = 900.0,
) -> tuple[dict[str, Any], dict[str, dict[str, float]]]:
    """Run one generator job; return its result and the readings taken at its checkpoints."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["BENCH_LOADGEN_CPUS"] = json.dumps(list(cpus) if cpus is not None else None)
    job = {"deadline_s": timeout - 30, **job}
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.loadgen"],
            cwd=REPO,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
        )
    watchdog = threading.Timer(timeout, proc.kill)
    watchdog.start()
    readings: dict[str, dict[str, float]] = {}
    result: dict[str, Any] | None = None
    try:
        assert proc.stdin is not None
        assert proc.stdout is not None
        proc.stdin.write(json.dumps(job) + "\n")
        proc.stdin.flush()
        for line in proc.stdout:
            message = json.loads(line)
            if "checkpoint" in message:
                readings[message.pop("checkpoint")] = {
                    **snapshot(server, proc.pid, backends),
                    **message,
                }
                proc.stdin.write("ok\n")
                proc.stdin.flush()
            elif "result" in message:
                result = message["result"]
    except BaseException:
        # Interrupted, or the orchestrator failed: the generator's result is lost anyway, and
        # waiting for its job to end would keep Ctrl-C from stopping the suite for a while.
        proc.kill()
        raise
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                stream.close()
    if proc.returncode != 0 or result is None:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-25:])
        raise LoadgenError(f"load generator exited with {proc.returncode}:\n{tail}")
    return result, readings


def window(readings: dict[str, dict[str, float]], start: str, end: str) -> dict[str, float]:
    """Differences between two checkpoints: wall seconds and CPU seconds of each side."""
    first, last = readings[start], readings[end]
    out = {"wall_s": last["t"] - first["t"]}
    for key in ("server_cpu_s", "generator_cpu_s", "backend_cpu_s", "machine_busy_s"):
        if key in first and key in last:
            out[key] = last[key] - first[key]
    ours = sum(out.get(key, 0.0) for key in ("server_cpu_s", "generator_cpu_s", "backend_cpu_s"))
    # CPU that neither side of the benchmark used: other tenants of the machine.
    out["other_cpu_frac"] = max(0.0, out["machine_busy_s"] - ours) / max(out["wall_s"], 1e-9)
    return out
