"""The pool benchmark: allcores' Pool beside ProcessPoolExecutor, loky, pebble and anyio.

    harness (project venv)
      for repeat in 1..R:                     interleaved: every pool runs each workload
        for workload in WORKLOADS:            once per repeat, one after the other
          for pool in POOLS:
            subprocess: <pool's python> pool_worker.py --pool P --workload W  ─► 1 JSON line

The anchors run from benchmarks/.anchors-venv, allcores from the project venv; each
measurement is a fresh process, so no pool inherits another's workers or threads.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

from bench_env import BENCH_DIR, REPO_ROOT
from report import fmt, ratio, summarize, table

WORKLOADS = [
    "one_by_one",
    "submit_all",
    "map_cs1",
    "map_cs100",
    "map_auto",
    "asyncio64",
    "asyncio64_uvloop",
    "cpu_batch",
    "startup",
    "payload",
]
POOLS = ["ppe", "loky", "pebble", "anyio", "allcores"]
ANCHOR_POOLS = ["ppe", "loky", "pebble", "anyio"]

# Which workloads each pool runs (mirrors the adapters in pool_worker.py).
_EXECUTOR = set(WORKLOADS) - {"map_auto"}
SUPPORTED = {
    "ppe": _EXECUTOR,
    "loky": _EXECUTOR,
    "pebble": _EXECUTOR,
    "anyio": {"asyncio64", "asyncio64_uvloop", "cpu_batch", "startup", "payload"},
    "allcores": set(WORKLOADS),
}

LABELS = {
    "one_by_one": "tiny task one by one (submit → result), µs/task",
    "submit_all": "all submitted, then results, µs/task",
    "map_cs1": "map chunksize=1, µs/task",
    "map_cs100": "map chunksize=100, µs/task",
    "map_auto": "map, no chunksize given, µs/task",
    "asyncio64": "asyncio, 64 in flight, tasks/s",
    "asyncio64_uvloop": "asyncio on uvloop, 64 in flight, tasks/s",
    "cpu_batch": "CPU batch, x serial",
    "startup": "start-up, create → first result, ms",
    "payload": "bytes round trip, s",
}
HIGHER_IS_BETTER = {"asyncio64", "asyncio64_uvloop", "cpu_batch"}

# The sizes of BENCHMARKS.md; --quick shrinks them to prove the harness runs (~10 s).
FULL_PARAMS: dict[str, Any] = {
    "n_tasks": 20_000,
    "n_async": 5_000,
    "in_flight": 64,
    "cpu_n": 5_000_000,
    "cpu_count": 16,
    "payload_mib": 100,
    "startup_cycles": 5,
}
QUICK_PARAMS: dict[str, Any] = {
    "n_tasks": 200,
    "n_async": 200,
    "in_flight": 64,
    "cpu_n": 100_000,
    "cpu_count": 4,
    "payload_mib": 1,
    "startup_cycles": 1,
}
# One measurement is at most ~10 s at full size (loky one by one, 20,000 tasks); a
# process still running after this is hung, and its sample is recorded as an error.
FULL_TIMEOUT_S = 300
QUICK_TIMEOUT_S = 60


@dataclass
class PoolSettings:
    repeats: int
    quick: bool
    pools: list[str]
    workloads: list[str]
    anchors_python: str
    project_python: str


def _measure_once(
    python: str, pool: str, workload: str, params: dict[str, Any], timeout: float
) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(BENCH_DIR)}
    argv = [python, str(BENCH_DIR / "pool_worker.py"), "--pool", pool, "--workload", workload]
    argv += ["--params", json.dumps(params)]
    try:
        proc = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            cwd=REPO_ROOT,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return {
            "pool": pool,
            "workload": workload,
            "value": None,
            "error": f"timed out after {timeout} s",
        }
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout)[-1500:]
        return {
            "pool": pool,
            "workload": workload,
            "value": None,
            "error": f"exit code {proc.returncode}: {tail}",
        }
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def run_pool_benchmark(settings: PoolSettings) -> dict[str, Any]:
    params = QUICK_PARAMS if settings.quick else FULL_PARAMS
    timeout = QUICK_TIMEOUT_S if settings.quick else FULL_TIMEOUT_S
    samples: list[dict[str, Any]] = []
    for repeat in range(settings.repeats):
        for workload in settings.workloads:
            for pool in settings.pools:
                if workload not in SUPPORTED[pool]:
                    continue
                python = settings.project_python if pool == "allcores" else settings.anchors_python
                result = _measure_once(python, pool, workload, params, timeout)
                result["repeat"] = repeat
                samples.append(result)
                shown = fmt(result.get("value")) if result.get("error") is None else "ERROR"
                print(
                    f"  [{repeat + 1}/{settings.repeats}] {workload:17} {pool:9} {shown}",
                    file=sys.stderr,
                )
    summary = _summaries(samples, settings)
    return {
        "settings": {
            "repeats": settings.repeats,
            "quick": settings.quick,
            "pools": settings.pools,
            "workloads": settings.workloads,
            "params": params,
            "workers": 2,
        },
        "samples": samples,
        "summary": summary,
        "goals": _goals(summary),
    }


def _summaries(samples: list[dict[str, Any]], settings: PoolSettings) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for workload in settings.workloads:
        out[workload] = {}
        for pool in settings.pools:
            if workload not in SUPPORTED[pool]:
                continue
            mine = [s for s in samples if s["pool"] == pool and s["workload"] == workload]
            values = [float(s["value"]) for s in mine if s.get("value") is not None]
            stats: dict[str, Any] = summarize(values)
            stats["errors"] = [s["error"] for s in mine if s.get("error")]
            stats["ratio_to_ppe"] = ratio(
                stats["median"], out[workload].get("ppe", {}).get("median")
            )
            out[workload][pool] = stats
    return out


def _median(summary: dict[str, dict[str, Any]], workload: str, pool: str) -> float | None:
    value = summary.get(workload, {}).get(pool, {}).get("median")
    return float(value) if value is not None else None


def _goals(summary: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The targets of BENCHMARKS.md, as ratios of medians measured in this same run."""
    ac = "allcores"
    goals: list[dict[str, Any]] = []

    def goal(
        name: str, measured: float | None, target: str, met: bool | None, against: str
    ) -> None:
        goals.append(
            {"goal": name, "ratio": measured, "target": target, "met": met, "against": against}
        )

    r = ratio(_median(summary, "one_by_one", ac), _median(summary, "one_by_one", "ppe"))
    goal("one by one vs ProcessPoolExecutor", r, "≤ 0.25", None if r is None else r <= 0.25, "ppe")
    for workload in ("asyncio64", "asyncio64_uvloop"):
        r = ratio(_median(summary, workload, ac), _median(summary, workload, "ppe"))
        goal(
            f"{workload} tasks/s vs ProcessPoolExecutor",
            r,
            "≥ 5",
            None if r is None else r >= 5,
            "ppe",
        )
    tuned = {
        f"{pool} {w}": m
        for pool in POOLS
        for w in ("map_cs1", "map_cs100")
        if (m := _median(summary, w, pool)) is not None
    }
    best_name, best = min(tuned.items(), key=lambda kv: kv[1]) if tuned else ("-", None)
    r = ratio(_median(summary, "map_auto", ac), best)
    goal(
        "map, no chunksize vs best hand-tuned chunksize",
        r,
        "≤ 2",
        None if r is None else r <= 2,
        best_name,
    )
    cpu = _median(summary, "cpu_batch", ac)
    goal("CPU batch vs serial", cpu, "≥ 1.9", None if cpu is None else cpu >= 1.9, "serial")
    r = ratio(_median(summary, "payload", ac), _median(summary, "payload", "ppe"))
    goal(
        "bytes round trip vs ProcessPoolExecutor",
        r,
        "≤ 0.1",
        None if r is None else r <= 0.1,
        "ppe",
    )
    r = ratio(_median(summary, "startup", ac), _median(summary, "startup", "ppe"))
    goal(
        "start-up vs ProcessPoolExecutor (fork)", r, "≤ 1.0", None if r is None else r <= 1.0, "ppe"
    )
    return goals


def render(result: dict[str, Any]) -> str:
    summary = result["summary"]
    pools = result["settings"]["pools"]
    rows = []
    for workload, per_pool in summary.items():
        row: list[object] = [LABELS[workload]]
        for pool in pools:
            stats = per_pool.get(pool)
            if stats is None:
                row.append("n/a")
            elif stats["median"] is None:
                row.append("error" if stats["errors"] else "-")
            else:
                spread = stats["spread"]
                spread_text = f" ±{spread * 50:.0f}%" if spread is not None else ""
                row.append(f"{fmt(stats['median'])}{spread_text}")
        rows.append(row)
    payload_mib = result["settings"]["params"]["payload_mib"]
    text = [
        f"median of {result['settings']['repeats']} interleaved repeats, ± half the spread "
        f"(max - min) / median; bytes payload {payload_mib} MiB; 2 workers each",
        table(["workload", *pools], rows),
        "",
        table(
            ["goal (allcores, medians of this run)", "ratio", "target", "met", "against"],
            [[g["goal"], g["ratio"], g["target"], g["met"], g["against"]] for g in result["goals"]],
        ),
    ]
    errors = [
        f"{pool} {workload}: {err.splitlines()[0] if err else err}"
        for workload, per_pool in summary.items()
        for pool, stats in per_pool.items()
        for err in stats["errors"][:1]
    ]
    if errors:
        text += ["", "errors:", *errors]
    return "\n".join(text)
