"""The benchmark harness still runs: each part once, on --quick tiny settings.

No figure is judged here (timings belong to benchmarks/, not to tests); only the shape
of the JSON each part writes. The anchors run from this interpreter (--anchors-python),
which has uvicorn and the stdlib's ProcessPoolExecutor, so no venv is built. The pool
part needs nothing else; the HTTP and seed parts need wrk, which the harness installs
with apt-get when it can, and are skipped only when it cannot.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[2]
RUN = ROOT / "benchmarks" / "run.py"
# One quick part takes 5-15 s here; a run still going after this is hung.
RUN_TIMEOUT_S = 120
COMMON_KEYS = {"benchmark", "command", "date", "machine", "versions", "settings", "samples"}


def run_quick(tmp_path: Path, part: str, *extra: str) -> dict[str, Any]:
    out = tmp_path / f"{part}.json"
    argv = [sys.executable, str(RUN), part, "--quick", "--anchors-python", sys.executable]
    proc = subprocess.run(
        [*argv, "--out", str(out), *extra],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        cwd=ROOT,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result: dict[str, Any] = json.loads(out.read_text())
    assert COMMON_KEYS | {"summary", "goals"} <= result.keys()
    assert result["benchmark"] == part
    return result


def still_running(pids: list[int]) -> list[int]:
    """The workers of a measured server that outlived the harness (should be none)."""
    return [pid for pid in pids if psutil.pid_exists(pid) and _not_zombie(pid)]


def _not_zombie(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wrk_or_skip() -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import bench_env
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    if bench_env.ensure_wrk(log=False) is None:
        pytest.skip("wrk is not installed and could not be installed with apt-get")


def test_pool_part_writes_every_workload(tmp_path: Path) -> None:
    workloads = "one_by_one,map_cs1,map_auto,asyncio64,cpu_batch,startup,payload"
    result = run_quick(tmp_path, "pool", "--pools", "ppe,allcores", "--workloads", workloads)

    assert set(result["summary"]) == {*workloads.split(","), "startup_first", "import"}
    # Imports are timed apart from start-up, for every pool.
    assert all(result["summary"]["import"][p]["median"] >= 0 for p in ("ppe", "allcores"))
    ppe = [s for s in result["samples"] if s["pool"] == "ppe"]
    assert ppe and all(s["error"] is None and s["value"] > 0 for s in ppe)
    assert {"median", "min", "max", "spread"} <= result["summary"]["one_by_one"]["ppe"].keys()
    assert {g["goal"] for g in result["goals"]} >= {"CPU batch vs serial"}
    # The floor (a bare socketpair ping-pong) runs beside one by one, as its first column.
    assert result["settings"]["pools"][0] == "floor"
    floor = [s for s in result["samples"] if s["pool"] == "floor"]
    assert [s["workload"] for s in floor] == ["one_by_one"]
    assert floor[0]["error"] is None and floor[0]["value"] > 0
    assert result["summary"]["one_by_one"]["ppe"]["ratio_to_floor"] > 0
    assert "one by one vs the floor (socketpair + pickle)" in {g["goal"] for g in result["goals"]}


def test_http_part_measures_and_counts_connections(tmp_path: Path) -> None:
    wrk_or_skip()
    result = run_quick(tmp_path, "http", "--servers", "uvicorn,allcores-balanced")

    uvicorn = [s for s in result["samples"] if s["server"] == "uvicorn"]
    assert len(uvicorn) == 1 and uvicorn[0]["error"] is None
    sample = uvicorn[0]
    assert sample["requests"] > 0
    assert {"p50_ms", "p99_ms", "server_cpu_us_per_request", "wrk_cpu_share"} <= sample.keys()
    assert len(sample["connections_per_worker"]) == 2
    assert result["summary"]["uvicorn"]["ratio_to_uvicorn"] == 1.0
    workers = [pid for s in result["samples"] for pid in s.get("worker_pids", [])]
    assert still_running(workers) == []


def test_seed_part_runs_the_served_variant(tmp_path: Path) -> None:
    wrk_or_skip()
    result = run_quick(tmp_path, "seed", "--variants", "allcores-serve")

    served = result["summary"]["allcores-serve"]
    assert served["skipped"] is None and served["errors"] == []
    assert served["hello_rps"]["median"] > 0 and served["cpu_rps"]["median"] > 0


def test_reload_part_counts_failed_requests_and_new_pids(tmp_path: Path) -> None:
    wrk_or_skip()
    result = run_quick(tmp_path, "reload", "--servers", "allcores-balanced")

    (sample,) = result["samples"]
    assert sample["error"] is None and sample["requests"] > 0
    assert {"failed", "every_pid_changed", "workers_before", "workers_after"} <= sample.keys()
    assert [g["goal"] for g in result["goals"]] == [
        "allcores-balanced: failed requests over 3 reloads, worst run"
    ]
    assert still_running(sample["workers_before"] + sample["workers_after"]) == []


def test_import_part_times_every_statement(tmp_path: Path) -> None:
    out = tmp_path / "import.json"
    proc = subprocess.run(
        [sys.executable, str(RUN), "import", "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        cwd=ROOT,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert COMMON_KEYS | {"summary", "goals"} <= result.keys()
    summary = result["summary"]
    assert {"import allcores", "from allcores import Pool"} <= summary.keys()
    assert all(s["errors"] == [] and s["min"] > 0 for s in summary.values())
    assert summary["import concurrent.futures.process"]["best_vs_anchor"] == 1.0
