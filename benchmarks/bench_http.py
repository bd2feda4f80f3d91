"""The HTTP benchmark: hello world under uvicorn, gunicorn, granian and `allcores serve`.

    for run in 1..R:                       interleaved (A B C … A B C …)
      for server in SERVERS:
        fresh port, fresh server           (start; wait until it answers and has its workers)
        wrk warm-up                        (-t1 -c64, warm_s, discarded)
        CPU of the server's tree  ─┐
        wrk -t1 -c64 -d<s> --latency │ a thread samples ESTABLISHED connections per PID
        CPU of the server's tree  ─┘      of the tree at 30/50/70 % of the run
        SIGTERM; whatever of the tree survives is killed by PID

wrk runs on the same 2 cores as the server, so every figure here is a figure of a
machine shared by load generator and server; wrk's own CPU share is reported.
"""

from __future__ import annotations

import os
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bench_env import APPS_DIR, RESULTS_DIR
from procs import (
    connections_per_pid,
    free_port,
    start_server,
    stop_server,
    tree_cpu_seconds,
    worker_processes,
)
from report import fmt, ratio, summarize, table
from wrk import run_wrk

POLICIES = ["balanced", "rr", "shared", "reuseport"]
DEFAULT_SERVERS = ["uvicorn", "gunicorn", *(f"allcores-{p}" for p in POLICIES)]
OPTIONAL_SERVERS = ["granian", "uvicorn-1", "allcores-granian"]
BASELINE = "uvicorn"
# Connections are counted at these fractions of the measured run; wrk holds its 64
# keep-alive connections open throughout, so the counts are stable in between.
CONNECTION_SAMPLES = (0.3, 0.5, 0.7)


@dataclass
class HttpSettings:
    runs: int
    duration_s: float
    warmup_s: float
    connections: int
    servers: list[str]
    workers: int
    anchors_python: str
    project_python: str
    wrk: str


@dataclass
class ServerSpec:
    name: str
    argv: list[str]
    env: dict[str, str]
    workers: int


def server_spec(name: str, port: int, s: HttpSettings) -> ServerSpec:
    """The command line of each server; all serve apps/hello.py on 127.0.0.1."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BENCH_", "PYTHONPATH"))}
    host = ["--host", "127.0.0.1", "--port", str(port)]
    workers = str(s.workers)
    if name in ("uvicorn", "uvicorn-1"):
        n = workers if name == "uvicorn" else "1"
        argv = [s.anchors_python, "-m", "uvicorn", "hello:app", *host, "--workers", n]
        argv += ["--loop", "uvloop", "--http", "httptools", "--no-access-log", "--lifespan", "off"]
        # With --workers 1 uvicorn serves in its own process: no worker to wait for.
        return ServerSpec(name, argv, env, s.workers if name == "uvicorn" else 0)
    if name == "gunicorn":
        argv = [s.anchors_python, "-m", "gunicorn", "-w", workers]
        argv += ["-k", "uvicorn_worker.UvicornWorker", "-b", f"127.0.0.1:{port}", "hello:app"]
        return ServerSpec(name, argv, env, s.workers)
    if name == "granian":
        granian = os.path.join(os.path.dirname(s.anchors_python), "granian")
        argv = [granian, "--interface", "asgi", *host, "--workers", workers]
        argv += ["--loop", "uvloop", "--no-access-log", "hello:app"]
        return ServerSpec(name, argv, env, s.workers)
    if name.startswith("allcores-"):
        # `allcores serve` as a user runs it, with the flags the anchors get: uvloop and
        # httptools (its defaults), no access log, no lifespan.
        cli = os.path.join(os.path.dirname(s.project_python), "allcores")
        argv = [cli, "serve", "hello:app", *host, "--workers", workers]
        argv += ["--no-access-log", "--lifespan", "off"]
        if name == "allcores-granian":  # granian's engine accepts by itself: shared
            argv += ["--engine", "granian", "--policy", "shared"]
        else:
            argv += ["--policy", name.removeprefix("allcores-")]
        return ServerSpec(name, argv, env, s.workers)
    raise ValueError(f"unknown server {name!r}")


class ConnectionSampler(threading.Thread):
    """Counts connections per PID at fixed points of a run; keeps the fullest sample."""

    def __init__(self, sample: Callable[[], dict[int, int]], duration_s: float) -> None:
        super().__init__(daemon=True)
        self._sample = sample
        self._duration_s = duration_s
        self._stop_event = threading.Event()
        self.best: dict[int, int] = {}

    def run(self) -> None:
        start = time.monotonic()
        for fraction in CONNECTION_SAMPLES:
            delay = start + fraction * self._duration_s - time.monotonic()
            if self._stop_event.wait(max(0.0, delay)):
                return
            counts = self._sample()
            if sum(counts.values()) > sum(self.best.values()):
                self.best = counts

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=5.0)


def measure_sample(name: str, s: HttpSettings, run_index: int) -> dict[str, Any]:
    port = free_port()
    spec = server_spec(name, port, s)
    log_path = RESULTS_DIR / "logs" / f"{name}-{run_index}.log"
    url = f"http://127.0.0.1:{port}/"
    # The 1-minute load average before each sample shows how busy the shared machine was.
    sample: dict[str, Any] = {
        "server": name,
        "run": run_index,
        "error": None,
        "load_avg_1m": os.getloadavg()[0],
    }
    try:
        server = start_server(name, spec.argv, spec.env, port, log_path, APPS_DIR, spec.workers)
    except RuntimeError as exc:
        sample["error"] = str(exc)
        return sample
    try:
        run_wrk(s.wrk, url, s.connections, s.warmup_s)
        top_pid = server.proc.pid
        workers = worker_processes(server)
        tree = server.tree()
        cpu_before = tree_cpu_seconds(tree)
        top_before = tree_cpu_seconds(tree[:1])
        sampler = ConnectionSampler(lambda: connections_per_pid(server), s.duration_s)
        sampler.start()
        result = run_wrk(s.wrk, url, s.connections, s.duration_s)
        sampler.stop()
        cpu = tree_cpu_seconds(tree) - cpu_before
        # The top process: uvicorn's supervisor, gunicorn's arbiter, allcores' primary
        # (which accepts and passes every connection under balanced and rr).
        top_cpu = tree_cpu_seconds(tree[:1]) - top_before
        counts = sampler.best
        per_worker = {str(p.pid): counts.get(p.pid, 0) for p in workers}
        if counts.get(top_pid):
            per_worker[f"{top_pid} (top)"] = counts[top_pid]
        sample.update(result.as_dict())
        sample.update(
            server_cpu_s=cpu,
            server_cpu_us_per_request=cpu / result.requests * 1e6 if result.requests else None,
            top_cpu_us_per_request=top_cpu / result.requests * 1e6 if result.requests else None,
            wrk_cpu_share=result.wrk_cpu_s / (s.duration_s * (os.cpu_count() or 1)),
            connections_per_worker=per_worker,
            worker_pids=[p.pid for p in workers],
        )
    except (RuntimeError, ValueError, OSError) as exc:
        sample["error"] = f"{type(exc).__name__}: {exc}\n{server.log_tail(800)}"
    finally:
        killed = stop_server(server)
        if killed:
            sample["killed_after_sigterm"] = killed
    return sample


def run_http_benchmark(s: HttpSettings) -> dict[str, Any]:
    samples: list[dict[str, Any]] = []
    for run_index in range(s.runs):
        for name in s.servers:
            sample = measure_sample(name, s, run_index)
            samples.append(sample)
            shown = "ERROR" if sample["error"] else f"{fmt(sample['requests_per_s'])} req/s"
            split = "/".join(str(v) for v in (sample.get("connections_per_worker") or {}).values())
            print(
                f"  [{run_index + 1}/{s.runs}] {name:19} {shown:>14}  conns {split}",
                file=sys.stderr,
            )
    summary = summaries(samples, s.servers)
    return {
        "settings": {
            "runs": s.runs,
            "duration_s": s.duration_s,
            "warmup_s": s.warmup_s,
            "connections": s.connections,
            "wrk_threads": 1,
            "workers": s.workers,
            "servers": s.servers,
            "note": "wrk shares the machine's cores with the server",
        },
        "samples": samples,
        "summary": summary,
        "goals": goals(summary),
    }


def summaries(samples: list[dict[str, Any]], servers: list[str]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for name in servers:
        ok = [x for x in samples if x["server"] == name and not x["error"]]
        rps = summarize([x["requests_per_s"] for x in ok])
        out[name] = {
            "requests_per_s": rps,
            "p50_ms": _median([x["p50_ms"] for x in ok]),
            "p99_ms": _median([x["p99_ms"] for x in ok]),
            "server_cpu_us_per_request": _median([x["server_cpu_us_per_request"] for x in ok]),
            "top_cpu_us_per_request": _median([x.get("top_cpu_us_per_request") for x in ok]),
            "wrk_cpu_share": _median([x["wrk_cpu_share"] for x in ok]),
            "connections_per_worker": [
                sorted(x["connections_per_worker"].values(), reverse=True) for x in ok
            ],
            "socket_errors": sum(x["socket_errors"] for x in ok),
            "non_2xx": sum(x["non_2xx"] for x in ok),
            "errors": [x["error"] for x in samples if x["server"] == name and x["error"]],
        }
    base = out.get(BASELINE, {}).get("requests_per_s", {}).get("median")
    for name, stats in out.items():
        stats["ratio_to_uvicorn"] = ratio(stats["requests_per_s"]["median"], base)
        stats["worst_ratio_to_uvicorn"] = ratio(stats["requests_per_s"]["min"], base)
        stats["paired_ratio_to_uvicorn"] = summarize(_paired_ratios(samples, name))
    return out


def _paired_ratios(samples: list[dict[str, Any]], name: str) -> list[float]:
    """req/s over uvicorn's req/s in the same round: neighbours in time share the noise
    of the machine, so this ratio is steadier than a ratio of medians."""
    by_run = {
        (x["server"], x["run"]): x["requests_per_s"]
        for x in samples
        if not x["error"] and x["server"] in (name, BASELINE)
    }
    runs = sorted({run for _, run in by_run})
    return [
        by_run[(name, run)] / by_run[(BASELINE, run)]
        for run in runs
        if (name, run) in by_run and by_run.get((BASELINE, run))
    ]


def _median(values: list[Any]) -> float | None:
    present = [float(v) for v in values if v is not None]
    return statistics.median(present) if present else None


def goals(summary: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """benchmarks/README.md: median ≥ 1.05x uvicorn's median and the worst run ≥ 0.95x it."""
    out = []
    for name, stats in summary.items():
        if not name.startswith("allcores-"):
            continue
        med, worst = stats["ratio_to_uvicorn"], stats["worst_ratio_to_uvicorn"]
        out.append(
            {
                "server": name,
                "median_ratio": med,
                "median_met": None if med is None else med >= 1.05,
                "worst_ratio": worst,
                "worst_met": None if worst is None else worst >= 0.95,
            }
        )
    return out


def render(result: dict[str, Any]) -> str:
    rows = []
    for name, st in result["summary"].items():
        rps = st["requests_per_s"]
        splits = " ".join("/".join(str(c) for c in split) for split in st["connections_per_worker"])
        rows.append(
            [
                name,
                rps["median"],
                rps["min"],
                rps["max"],
                st["p50_ms"],
                st["p99_ms"],
                st["ratio_to_uvicorn"],
                st["worst_ratio_to_uvicorn"],
                st["paired_ratio_to_uvicorn"]["median"],
                st["server_cpu_us_per_request"],
                st.get("top_cpu_us_per_request"),
                st["wrk_cpu_share"],
                splits or ("error" if st["errors"] else "-"),
            ]
        )
    settings = result["settings"]
    head = (
        f"hello world, wrk -t1 -c{settings['connections']} -d{settings['duration_s']:g}s "
        f"--latency, {settings['warmup_s']:g} s warm-up, fresh server per sample, "
        f"{settings['runs']} interleaved runs, {settings['workers']} workers; "
        f"wrk shares the {os.cpu_count()} cores with the server"
    )
    headers = [
        "server",
        "req/s median",
        "min",
        "max",
        "p50 ms",
        "p99 ms",
        "x uvicorn",
        "worst x uvicorn",
        "paired x uvicorn",
        "server CPU µs/req",
        "of which top process",
        "wrk CPU share",
        "connections per worker, each run",
    ]
    note = (
        "x uvicorn: median / uvicorn's median; worst: min / uvicorn's median; paired: median "
        "over rounds of req/s / uvicorn's req/s in the same round"
    )
    text = [head, table(headers, rows), note]
    errors = [
        f"{n}: {e.splitlines()[0]}" for n, st in result["summary"].items() for e in st["errors"][:1]
    ]
    if errors:
        text += ["", "errors:", *errors]
    return "\n".join(text)
