"""What importing allcores costs, against the stdlib's process pool.

    .venv-3.11/bin/python benchmarks/run.py import --runs 30

    harness
      for run in 1..N:                        interleaved: each statement once per run
        for statement in STATEMENTS:
          subprocess: python -c "<timer> <statement>"  ─► 1 line: ms, modules loaded

Each sample is a fresh interpreter that times one import statement with perf_counter,
so nothing is already imported but what every interpreter imports at start-up (site,
encodings), which is the same for every statement and left out. The figure is the best
of N: an import does a fixed amount of work, and anything above the minimum is other
load on the machine. The anchor, ``concurrent.futures.process``, is what a user of the
stdlib's ProcessPoolExecutor pays; every statement is also given as a ratio to it.
``modules`` counts the modules a statement loaded, a figure that load does not blur.
"""

from __future__ import annotations

import subprocess
from typing import Any

from bench_env import REPO_ROOT
from report import ratio, summarize, table

ANCHOR = "import concurrent.futures.process"
STATEMENTS = [
    ANCHOR,
    "import allcores",
    "from allcores import Pool",
    "from allcores import cluster",
]

# Times the statement, and counts the modules it loaded. Only built-in modules are
# imported before the clock starts (json would bring re, which allcores may need).
_TIMER = """\
import sys, time
before = len(sys.modules)
start = time.perf_counter()
{statement}
ms = (time.perf_counter() - start) * 1e3
print(ms, len(sys.modules) - before)
"""

# One import takes well under a second; a child still running after this is hung.
SAMPLE_TIMEOUT_S = 60
# The target for `import allcores` (it was 20 ms): what every user pays, pool
# or cluster or neither, before any of it is used.
IMPORT_GOAL_MS = 10.0


def sample(python: str, statement: str) -> dict[str, Any]:
    """One fresh interpreter's timing of *statement*."""
    proc = subprocess.run(
        [python, "-c", _TIMER.format(statement=statement)],
        capture_output=True,
        text=True,
        timeout=SAMPLE_TIMEOUT_S,
        check=False,
    )
    if proc.returncode != 0:
        return {"statement": statement, "ms": None, "modules": None, "error": proc.stderr[-500:]}
    ms, modules = proc.stdout.split()[-2:]
    return {"statement": statement, "ms": float(ms), "modules": int(modules), "error": None}


def run_import_benchmark(python: str, runs: int) -> dict[str, Any]:
    # Bytecode for allcores, as a wheel's install writes it (as in bench_pool): where
    # PYTHONDONTWRITEBYTECODE is set, each sample would otherwise time the compiler.
    subprocess.run([python, "-m", "compileall", "-q", str(REPO_ROOT / "src")], check=False)
    samples = [sample(python, s) for _ in range(runs) for s in STATEMENTS]
    return {"settings": {"runs": runs, "statements": STATEMENTS}, "samples": samples}


def summaries(samples: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per statement: the summary of its times, its best as a ratio to the anchor's best,
    and the modules it loaded."""
    result: dict[str, dict[str, Any]] = {}
    for statement in dict.fromkeys(s["statement"] for s in samples):
        mine = [s for s in samples if s["statement"] == statement and s["error"] is None]
        result[statement] = {
            **summarize([s["ms"] for s in mine]),
            "modules": max((s["modules"] for s in mine), default=None),
            "errors": [s["error"] for s in samples if s["statement"] == statement and s["error"]],
        }
    anchor_best = result.get(ANCHOR, {}).get("min")
    for summary in result.values():
        summary["best_vs_anchor"] = ratio(summary["min"], anchor_best)
    return result


def goals(summary: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    best = summary.get("import allcores", {}).get("min")
    met = None if best is None else best <= IMPORT_GOAL_MS
    return [{"goal": "import allcores, best, ms", "value": best, "target": "<= 10", "met": met}]


def render(result: dict[str, Any]) -> str:
    rows = [
        [statement, s["min"], s["median"], s["best_vs_anchor"], s["modules"], len(s["errors"])]
        for statement, s in result["summary"].items()
    ]
    headers = ["statement", "best ms", "median ms", "best / anchor", "modules", "errors"]
    goal_rows = [[g["goal"], g["value"], g["target"], g["met"]] for g in result["goals"]]
    return "\n".join(
        [
            f"import cost, fresh interpreters, best of {result['settings']['runs']}",
            table(headers, rows),
            "",
            table(["goal (this run)", "value", "target", "met"], goal_rows),
        ]
    )
