"""The seed's experiment: does CPU work on `/cpu` hurt `/` on the same server?

    for run in 1..R:                              interleaved over the variants
      for variant in VARIANTS:
        fresh server (apps/seed_app.py, SEED_MODE chosen by the variant)
        warm-up: wrk on `/` and on `/cpu`
        wrk -c4 on /cpu  ───────────────  (background, duration + 2 s)
           1 s later: wrk -c8 --latency on /   (duration)
        SIGTERM; the pool ends with the app's lifespan; survivors killed by PID

Variants: `/` alone (no load), `/cpu` inline, `/cpu` via run_in_executor with
ProcessPoolExecutor(2), `/cpu` via allcores' Pool(max_workers=2).run (its workers at
its default niceness, and at nice=0 like the stdlib pool's), and `allcores serve`
(SEED_MODE=offload under that server; its pool at the default --pool-nice 5, and at 0),
which runs only once the `allcores serve` command exists.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench_env import APPS_DIR, RESULTS_DIR, allcores_has
from procs import free_port, start_server, stop_server
from report import fmt, ratio, summarize, table
from wrk import finish_wrk, run_wrk, start_wrk

VARIANTS = [
    "alone",
    "inline",
    "ppe",
    "allcores",
    "allcores-nice0",
    "allcores-serve",
    "allcores-serve-nice0",
]
LABELS = {
    "alone": "`/` alone, no load",
    "inline": "`/cpu` inline (blocks the loop)",
    "ppe": "`/cpu` via run_in_executor(ProcessPoolExecutor(2))",
    "allcores": "`/cpu` via allcores Pool(max_workers=2).run",
    "allcores-nice0": "`/cpu` via allcores Pool(max_workers=2, nice=0).run",
    "allcores-serve": "`allcores serve`, `/cpu` via offload",
    "allcores-serve-nice0": "`allcores serve --pool-nice 0`, `/cpu` via offload",
}
# The `/cpu` load starts this long before `/` is measured and ends this long after, so
# the whole `/` measurement runs under load.
LOAD_LEAD_S = 1.0


@dataclass
class SeedSettings:
    runs: int
    duration_s: float
    warmup_s: float
    variants: list[str]
    anchors_python: str
    project_python: str
    wrk: str
    cpu_n: int


def serve_available(project_python: str) -> bool:
    """The `allcores serve` hook: true once the CLI has a working `serve` command."""
    cli = Path(project_python).parent / "allcores"
    if not cli.exists():
        return False
    try:
        proc = subprocess.run([str(cli), "serve", "--help"], capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return False
    return proc.returncode == 0


def available_variants(s: SeedSettings) -> dict[str, str | None]:
    """Each variant → None when it can run, or why it cannot."""
    why: dict[str, str | None] = dict.fromkeys(s.variants)
    if not allcores_has("from allcores.pool import Pool", s.project_python):
        for variant in ("allcores", "allcores-nice0"):
            if variant in why:
                why[variant] = "allcores.pool.Pool is not importable yet"
    served = [v for v in ("allcores-serve", "allcores-serve-nice0") if v in why]
    if served and not serve_available(s.project_python):
        for variant in served:
            why[variant] = "`allcores serve` is not built yet"
    return why


def _argv(variant: str, port: int, s: SeedSettings) -> tuple[list[str], str]:
    """Command line and SEED_MODE of a variant; uvicorn single process, as in the seed."""
    uvicorn_flags = ["--host", "127.0.0.1", "--port", str(port), "--loop", "uvloop"]
    uvicorn_flags += ["--http", "httptools", "--no-access-log", "--lifespan", "on"]
    if variant in ("alone", "inline", "ppe"):
        mode = "inline" if variant == "alone" else variant
        return [s.anchors_python, "-m", "uvicorn", "seed_app:app", *uvicorn_flags], mode
    if variant in ("allcores", "allcores-nice0"):
        return [s.project_python, "-m", "uvicorn", "seed_app:app", *uvicorn_flags], "allcores"
    if variant in ("allcores-serve", "allcores-serve-nice0"):
        # One HTTP worker, as uvicorn single process in the other variants; its /cpu goes
        # through offload to the server's shared pool, 2 processes as the others' pools.
        cli = str(Path(s.project_python).parent / "allcores")
        argv = [cli, "serve", "seed_app:app", "--workers", "1", "--pool", "2", "--no-access-log"]
        argv += ["--host", "127.0.0.1", "--port", str(port), "--lifespan", "on"]
        if variant == "allcores-serve-nice0":
            argv += ["--pool-nice", "0"]
        return argv, "offload"
    raise ValueError(f"unknown variant {variant!r}")


def measure_sample(variant: str, s: SeedSettings, run_index: int) -> dict[str, Any]:
    port = free_port()
    argv, mode = _argv(variant, port, s)
    env = {**os.environ, "SEED_MODE": mode, "SEED_CPU_N": str(s.cpu_n), "PYTHONPATH": str(APPS_DIR)}
    env.pop("SEED_POOL_NICE", None)
    if variant == "allcores-nice0":
        env["SEED_POOL_NICE"] = "0"
    base = f"http://127.0.0.1:{port}"
    sample: dict[str, Any] = {"variant": variant, "run": run_index, "error": None}
    log_path = RESULTS_DIR / "logs" / f"seed-{variant}-{run_index}.log"
    try:
        server = start_server(variant, argv, env, port, log_path, APPS_DIR, expected_workers=0)
    except RuntimeError as exc:
        sample["error"] = str(exc)
        return sample
    try:
        run_wrk(s.wrk, base + "/", 8, s.warmup_s, latency=False)
        if variant != "alone":
            run_wrk(s.wrk, base + "/cpu", 4, s.warmup_s, latency=False)
        load = None
        load_s = s.duration_s + 2 * LOAD_LEAD_S
        if variant != "alone":
            load = start_wrk(s.wrk, base + "/cpu", 4, load_s)
            time.sleep(LOAD_LEAD_S)
        hello = run_wrk(s.wrk, base + "/", 8, s.duration_s)
        sample.update(
            hello_rps=hello.requests_per_s,
            hello_p50_ms=hello.p50_ms,
            hello_p99_ms=hello.p99_ms,
            hello_socket_errors=hello.socket_errors,
        )
        if load is not None:
            cpu = finish_wrk(load, load_s)
            sample.update(cpu_rps=cpu.requests_per_s, cpu_socket_errors=cpu.socket_errors)
    except (RuntimeError, ValueError, OSError) as exc:
        sample["error"] = f"{type(exc).__name__}: {exc}\n{server.log_tail(800)}"
    finally:
        killed = stop_server(server)
        if killed:
            sample["killed_after_sigterm"] = killed
    return sample


def run_seed_benchmark(s: SeedSettings) -> dict[str, Any]:
    why = available_variants(s)
    runnable = [v for v in s.variants if why[v] is None]
    samples: list[dict[str, Any]] = []
    for run_index in range(s.runs):
        for variant in runnable:
            sample = measure_sample(variant, s, run_index)
            samples.append(sample)
            shown = (
                "ERROR"
                if sample["error"]
                else (
                    f"/ {fmt(sample['hello_rps'])} req/s p99 {fmt(sample['hello_p99_ms'])} ms, "
                    f"/cpu {fmt(sample.get('cpu_rps'))} req/s"
                )
            )
            print(f"  [{run_index + 1}/{s.runs}] {variant:15} {shown}", file=sys.stderr)
    summary = summaries(samples, s.variants, why)
    return {
        "settings": {
            "runs": s.runs,
            "duration_s": s.duration_s,
            "warmup_s": s.warmup_s,
            "cpu_loop_additions": s.cpu_n,
            "load": "wrk -t1 -c4 on /cpu, from 1 s before to 1 s after the / measurement",
            "measured": "wrk -t1 -c8 --latency on /",
            "server": "uvicorn, 1 process, uvloop + httptools, no access log",
            "note": "wrk shares the machine's cores with the server",
        },
        "samples": samples,
        "summary": summary,
        "goals": goals(summary),
    }


def summaries(
    samples: list[dict[str, Any]], variants: list[str], why: dict[str, str | None]
) -> dict[str, Any]:
    """Median and spread per variant; ``why`` says which variants were skipped and why."""
    summary: dict[str, Any] = {}
    for variant in variants:
        ok = [x for x in samples if x["variant"] == variant and not x["error"]]
        summary[variant] = {
            "skipped": why[variant],
            "hello_rps": summarize([x["hello_rps"] for x in ok]),
            "hello_p50_ms": summarize(
                [x["hello_p50_ms"] for x in ok if x["hello_p50_ms"] is not None]
            ),
            "hello_p99_ms": summarize(
                [x["hello_p99_ms"] for x in ok if x["hello_p99_ms"] is not None]
            ),
            "cpu_rps": summarize([x["cpu_rps"] for x in ok if "cpu_rps" in x]),
            "errors": [x["error"] for x in samples if x["variant"] == variant and x["error"]],
        }
    return summary


def goals(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """benchmarks/README.md: vs the ProcessPoolExecutor variant, `/` p99 ≤ 0.5x, `/` req/s ≥ 1.5x,
    `/cpu` req/s ≥ 1.0x (the target is for `allcores serve`; the Pool variant is shown too)."""
    ppe = summary.get("ppe")
    out = []
    for variant in ("allcores", "allcores-nice0", "allcores-serve", "allcores-serve-nice0"):
        mine = summary.get(variant)
        if ppe is None or mine is None or mine["skipped"]:
            continue
        p99 = ratio(mine["hello_p99_ms"]["median"], ppe["hello_p99_ms"]["median"])
        rps = ratio(mine["hello_rps"]["median"], ppe["hello_rps"]["median"])
        cpu = ratio(mine["cpu_rps"]["median"], ppe["cpu_rps"]["median"])
        out.append(
            {
                "variant": variant,
                "hello_p99_ratio": p99,
                "hello_p99_met": None if p99 is None else p99 <= 0.5,
                "hello_rps_ratio": rps,
                "hello_rps_met": None if rps is None else rps >= 1.5,
                "cpu_rps_ratio": cpu,
                "cpu_rps_met": None if cpu is None else cpu >= 1.0,
            }
        )
    return out


def render(result: dict[str, Any]) -> str:
    rows = []
    for variant, st in result["summary"].items():
        if st["skipped"]:
            rows.append([LABELS[variant], f"skipped: {st['skipped']}", "", "", "", ""])
            continue
        rows.append(
            [
                LABELS[variant],
                st["hello_rps"]["median"],
                _range(st["hello_rps"]),
                st["hello_p50_ms"]["median"],
                st["hello_p99_ms"]["median"],
                st["cpu_rps"]["median"],
            ]
        )
    settings = result["settings"]
    head = (
        f"{settings['server']}; {settings['load']}; measured: {settings['measured']} "
        f"for {settings['duration_s']:g} s; median of {settings['runs']} interleaved runs; "
        "wrk shares the cores with the server"
    )
    headers = ["variant", "/ req/s", "/ req/s min-max", "/ p50 ms", "/ p99 ms", "/cpu req/s"]
    text = [head, table(headers, rows)]
    if result["goals"]:
        text += [
            "",
            table(
                [
                    "vs ppe variant",
                    "/ p99 ratio",
                    "≤ 0.5",
                    "/ req/s ratio",
                    "≥ 1.5",
                    "/cpu req/s ratio",
                    "≥ 1.0",
                ],
                [
                    [
                        g["variant"],
                        g["hello_p99_ratio"],
                        g["hello_p99_met"],
                        g["hello_rps_ratio"],
                        g["hello_rps_met"],
                        g["cpu_rps_ratio"],
                        g["cpu_rps_met"],
                    ]
                    for g in result["goals"]
                ],
            ),
        ]
    errors = [
        f"{v}: {e.splitlines()[0]}" for v, st in result["summary"].items() for e in st["errors"][:1]
    ]
    if errors:
        text += ["", "errors:", *errors]
    return "\n".join(text)


def _range(stats: dict[str, Any]) -> str:
    if stats["min"] is None:
        return "-"
    return f"{fmt(stats['min'])}-{fmt(stats['max'])}"
