"""The pool benchmark: allcores' Pool beside ProcessPoolExecutor, loky, pebble and anyio.

    harness (project venv)
      for repeat in 1..R:                     interleaved: every pool runs each workload
        for workload in WORKLOADS:            once per repeat, one after the other
          for pool in POOLS:
            subprocess: <pool's python> pool_worker.py --pool P --workload W  ─► 1 JSON line

The anchors run from benchmarks/.anchors-venv, allcores from the project venv; each
measurement is a fresh process, so no pool inherits another's workers or threads.
Wherever one_by_one runs, the floor runs beside the pools (pool_floor.py: a bare
socketpair + pickle ping-pong between two processes), and each pool's one by one is
also given as a ratio to it.
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
# Not a pool: added as the first column whenever one_by_one runs (pool_floor.py).
FLOOR = "floor"

# Which workloads each pool runs (mirrors the adapters in pool_worker.py).
_EXECUTOR = set(WORKLOADS) - {"map_auto"}
SUPPORTED = {
    "ppe": _EXECUTOR,
    "loky": _EXECUTOR,
    "pebble": _EXECUTOR,
    "anyio": {"asyncio64", "asyncio64_uvloop", "cpu_batch", "startup", "payload"},
    "allcores": set(WORKLOADS),
    FLOOR: {"one_by_one"},
}
# Derived from the start-up samples (their first cycle), never run on its own.
for _supported in SUPPORTED.values():
    if "startup" in _supported:
        _supported.add("startup_first")
        _supported.add("import")

LABELS = {
    "one_by_one": "tiny task one by one (submit → result), µs/task",
    "submit_all": "all submitted, then results, µs/task",
    "map_cs1": "map chunksize=1, µs/task",
    "map_cs100": "map chunksize=100, µs/task",
    "map_auto": "map, no chunksize given, µs/task",
    "asyncio64": "asyncio, 64 in flight, tasks/s",
    "asyncio64_uvloop": "asyncio on uvloop, 64 in flight, tasks/s",
    "cpu_batch": "CPU batch, x serial",
    "startup": "start-up, create → first result, ms (median of cycles)",
    "startup_first": "start-up, first pool of a fresh process, ms",
    "import": "import of the pool's modules, ms (not in start-up)",
    "payload": "bytes round trip, s",
}
HIGHER_IS_BETTER = {"asyncio64", "asyncio64_uvloop", "cpu_batch"}

# The sizes of benchmarks/README.md; --quick shrinks them to prove the harness runs (~10 s).
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
    workers: int = 2


def _measure_once(
    python: str, pool: str, workload: str, params: dict[str, Any], timeout: float
) -> dict[str, Any]:
    # allcores from this checkout's src/, the code the result's commit names (the project
    # venv's editable install may point at another checkout, as from a git worktree).
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(BENCH_DIR), str(REPO_ROOT / "src")])}
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
    params = {**(QUICK_PARAMS if settings.quick else FULL_PARAMS), "workers": settings.workers}
    timeout = QUICK_TIMEOUT_S if settings.quick else FULL_TIMEOUT_S
    # Bytecode for allcores, as a wheel's install writes it: where PYTHONDONTWRITEBYTECODE
    # is set (these machines set it) every measuring process would otherwise compile
    # allcores from source (~40 ms), while the anchors' stdlib ships compiled.
    subprocess.run(
        [settings.project_python, "-m", "compileall", "-q", str(REPO_ROOT / "src")], check=False
    )
    pools = with_floor(settings.pools, settings.workloads)
    samples: list[dict[str, Any]] = []
    for repeat in range(settings.repeats):
        for workload in settings.workloads:
            for pool in pools:
                if workload not in SUPPORTED[pool]:
                    continue
                python = (
                    settings.anchors_python if pool in ANCHOR_POOLS else settings.project_python
                )
                result = _measure_once(python, pool, workload, params, timeout)
                result["repeat"] = repeat
                samples.append(result)
                shown = fmt(result.get("value")) if result.get("error") is None else "ERROR"
                print(
                    f"  [{repeat + 1}/{settings.repeats}] {workload:17} {pool:9} {shown}",
                    file=sys.stderr,
                )
    summary = summaries(samples, settings.workloads, pools)
    return {
        "settings": {
            "repeats": settings.repeats,
            "quick": settings.quick,
            "pools": pools,
            "workloads": settings.workloads,
            "params": params,
            "workers": settings.workers,
        },
        "samples": samples,
        "summary": summary,
        "goals": goals(summary),
    }


def with_floor(pools: list[str], workloads: list[str]) -> list[str]:
    """The pools, with the floor first when one_by_one runs (no pool is measured alone)."""
    if "one_by_one" in workloads and FLOOR not in pools:
        return [FLOOR, *pools]
    return pools


def summaries(
    samples: list[dict[str, Any]], workloads: list[str], pools: list[str]
) -> dict[str, dict[str, Any]]:
    """Median and spread per workload and pool, and each pool's ratio to PPE's; for
    one_by_one, also to the floor's (``ratio_to_floor``, ``paired_ratio_to_floor``).

    The start-up workload also yields ``startup_first``: its first cycle only, which is
    the one that pays for imports and any helper process a pool starts once per program.
    """
    if "startup" in workloads:
        startups = [s for s in samples if s["workload"] == "startup"]
        samples = samples + [_first_startup(s) for s in startups] + [_import(s) for s in startups]
        at = workloads.index("startup") + 1
        workloads = [*workloads[:at], "startup_first", "import", *workloads[at:]]
    out: dict[str, dict[str, Any]] = {}
    for workload in workloads:
        out[workload] = {}
        for pool in pools:
            if workload not in SUPPORTED[pool]:
                continue
            mine = [s for s in samples if s["pool"] == pool and s["workload"] == workload]
            values = [float(s["value"]) for s in mine if s.get("value") is not None]
            stats: dict[str, Any] = summarize(values)
            stats["errors"] = [s["error"] for s in mine if s.get("error")]
            out[workload][pool] = stats
        anchors = ["ppe", FLOOR] if workload == "one_by_one" else ["ppe"]
        for pool, stats in out[workload].items():
            for anchor in anchors:
                stats[f"ratio_to_{anchor}"] = ratio(
                    stats["median"], out[workload].get(anchor, {}).get("median")
                )
                stats[f"paired_ratio_to_{anchor}"] = summarize(
                    _paired_ratios(samples, workload, pool, anchor)
                )
    return out


def _first_startup(sample: dict[str, Any]) -> dict[str, Any]:
    cycles = (sample.get("extra") or {}).get("cycles_ms") or [None]
    return {**sample, "workload": "startup_first", "value": cycles[0], "extra": None}


def _import(sample: dict[str, Any]) -> dict[str, Any]:
    value = (sample.get("extra") or {}).get("import_ms")
    return {**sample, "workload": "import", "value": value, "extra": None}


def _paired_ratios(
    samples: list[dict[str, Any]], workload: str, pool: str, anchor: str = "ppe"
) -> list[float]:
    """This pool's value over the anchor's (ProcessPoolExecutor or the floor) in the same
    repeat (measured moments apart, so they share the machine's noise)."""
    by_repeat = {
        (s["pool"], s["repeat"]): float(s["value"])
        for s in samples
        if s["workload"] == workload and s.get("value") is not None
    }
    return [
        value / by_repeat[(anchor, repeat)]
        for (name, repeat), value in sorted(by_repeat.items())
        if name == pool and by_repeat.get((anchor, repeat))
    ]


def _median(summary: dict[str, dict[str, Any]], workload: str, pool: str) -> float | None:
    value = summary.get(workload, {}).get(pool, {}).get("median")
    return float(value) if value is not None else None


# (goal, workload, target, comparison, anchor) of benchmarks/README.md: against
# ProcessPoolExecutor, or the floor under one by one (a bare socketpair ping-pong).
_ANCHOR_GOALS = [
    ("one by one vs ProcessPoolExecutor", "one_by_one", 0.25, "<=", "ppe"),
    ("one by one vs the floor (socketpair + pickle)", "one_by_one", 1.5, "<=", FLOOR),
    ("asyncio, 64 in flight: tasks/s vs ProcessPoolExecutor", "asyncio64", 5.0, ">=", "ppe"),
    ("asyncio on uvloop, 64 in flight: tasks/s vs PPE", "asyncio64_uvloop", 5.0, ">=", "ppe"),
    ("bytes round trip vs ProcessPoolExecutor", "payload", 0.1, "<=", "ppe"),
    ("start-up vs ProcessPoolExecutor (fork)", "startup", 1.0, "<=", "ppe"),
    ("start-up, first pool of a process, vs PPE", "startup_first", 1.0, "<=", "ppe"),
]


def _met(value: float | None, target: float, comparison: str) -> bool | None:
    if value is None:
        return None
    return value <= target if comparison == "<=" else value >= target


def goals(summary: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The targets of benchmarks/README.md for allcores, from medians of this same run.

    ``ratio`` is allcores' median over the anchor's median; ``paired`` is the median over
    repeats of allcores' value over the anchor's value measured moments before it.
    """
    ac = "allcores"
    out: list[dict[str, Any]] = []
    for name, workload, target, comparison, anchor in _ANCHOR_GOALS:
        r = ratio(_median(summary, workload, ac), _median(summary, workload, anchor))
        paired = summary.get(workload, {}).get(ac, {}).get(f"paired_ratio_to_{anchor}", {})
        out.append(
            {
                "goal": name,
                "ratio": r,
                "paired": paired.get("median"),
                "target": f"{comparison} {target:g}",
                "met": _met(r, target, comparison),
                "against": anchor,
            }
        )
    tuned = {
        f"{pool} {w}": m
        for pool in POOLS
        for w in ("map_cs1", "map_cs100")
        if (m := _median(summary, w, pool)) is not None
    }
    best_name, best = min(tuned.items(), key=lambda kv: kv[1]) if tuned else ("-", None)
    r = ratio(_median(summary, "map_auto", ac), best)
    out.append(
        {
            "goal": "map, no chunksize vs best hand-tuned chunksize",
            "ratio": r,
            "paired": None,
            "target": "<= 2",
            "met": _met(r, 2.0, "<="),
            "against": best_name,
        }
    )
    cpu = _median(summary, "cpu_batch", ac)
    best_anchor = max(
        (m for pool in ANCHOR_POOLS if (m := _median(summary, "cpu_batch", pool)) is not None),
        default=None,
    )
    out.append(
        {
            "goal": "CPU batch vs serial",
            "ratio": cpu,
            "paired": None,
            "target": ">= 1.9",
            "met": _met(cpu, 1.9, ">="),
            "against": f"serial, same process (best anchor: {fmt(best_anchor)}x)",
        }
    )
    return out


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
        if workload == "one_by_one" and FLOOR in per_pool:
            rows.append(
                [
                    "tiny task one by one, x the floor",
                    *(fmt(per_pool.get(p, {}).get("ratio_to_floor")) for p in pools),
                ]
            )
    payload_mib = result["settings"]["params"]["payload_mib"]
    text = [
        f"median of {result['settings']['repeats']} interleaved repeats, ± half the spread "
        f"(max - min) / median; bytes payload {payload_mib} MiB; "
        f"{result['settings']['workers']} workers each",
        table(["workload", *pools], rows),
        *(
            [
                "floor: two processes, a blocking ping-pong of pickled frames over a "
                "socketpair, no pool (pool_floor.py), µs per round trip"
            ]
            if FLOOR in pools
            else []
        ),
        "",
        table(
            ["goal (allcores, this run)", "ratio of medians", "paired", "target", "met", "against"],
            [
                [g["goal"], g["ratio"], g["paired"], g["target"], g["met"], g["against"]]
                for g in result["goals"]
            ],
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
