"""Reloads under load: how many requests each server fails while it replaces its workers.

for run in 1..R, for server in SERVERS (interleaved):
  fresh server on a fresh port (2 workers), its worker pids noted
  wrk -t1 -c32 -d<s>: at 2 s, and then every <gap> s, the server's own reload
    (SIGHUP to uvicorn's supervisor, gunicorn's arbiter, allcores' primary)
  failed = wrk's socket errors + non-2xx answers; did every worker pid change?
  SIGTERM; whatever survives is killed by PID
"""

from __future__ import annotations

import os
import signal
import statistics
import time
from dataclasses import dataclass
from typing import Any

from bench_env import APPS_DIR, RESULTS_DIR
from bench_http import HttpSettings, server_spec
from procs import free_port, start_server, stop_server, worker_processes
from report import table
from wrk import finish_wrk, start_wrk

SERVERS = ["uvicorn", "gunicorn", "allcores-balanced"]
RELOADS = 3


@dataclass
class ReloadSettings:
    runs: int
    gap_s: float
    lead_s: float  # wrk runs this long before the first reload and after the last
    connections: int
    servers: list[str]
    http: HttpSettings


def measure_sample(name: str, s: ReloadSettings, run_index: int) -> dict[str, Any]:
    port = free_port()
    spec = server_spec(name, port, s.http)
    log_path = RESULTS_DIR / "logs" / f"reload-{name}-{run_index}.log"
    sample: dict[str, Any] = {"server": name, "run": run_index, "error": None}
    try:
        server = start_server(name, spec.argv, spec.env, port, log_path, APPS_DIR, spec.workers)
    except RuntimeError as exc:
        sample["error"] = str(exc)
        return sample
    duration = int(s.lead_s + RELOADS * s.gap_s + s.lead_s + 0.5)
    try:
        before = {p.pid for p in worker_processes(server)}
        wrk = start_wrk(s.http.wrk, f"http://127.0.0.1:{port}/", s.connections, duration)
        time.sleep(s.lead_s)
        for _ in range(RELOADS):
            os.kill(server.proc.pid, signal.SIGHUP)
            time.sleep(s.gap_s)
        result = finish_wrk(wrk, duration)
        after = {p.pid for p in worker_processes(server)}
        sample.update(result.as_dict())
        sample.update(
            failed=result.socket_errors + result.non_2xx,
            workers_before=sorted(before),
            workers_after=sorted(after),
            every_pid_changed=bool(after) and not before & after,
            alive=server.proc.poll() is None,
        )
    except (RuntimeError, ValueError, OSError) as exc:
        sample["error"] = f"{type(exc).__name__}: {exc}\n{server.log_tail(800)}"
    finally:
        stop_server(server)
    return sample


def run_reload_benchmark(s: ReloadSettings) -> dict[str, Any]:
    samples = [measure_sample(name, s, run) for run in range(1, s.runs + 1) for name in s.servers]
    settings = {
        "runs": s.runs,
        "gap_s": s.gap_s,
        "reloads": RELOADS,
        "connections": s.connections,
        "servers": s.servers,
        "workers": s.http.workers,
    }
    summary = summaries(samples)
    return {"settings": settings, "samples": samples, "summary": summary, "goals": goals(summary)}


def goals(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """The serve issue's goal: no failed request over the reloads, in every run."""
    out = []
    for name, st in summary.items():
        if name.startswith("allcores-") and st["failed_each_run"]:
            worst = max(st["failed_each_run"])
            out.append(
                {
                    "goal": f"{name}: failed requests over {RELOADS} reloads, worst run",
                    "value": worst,
                    "target": 0,
                    "met": worst == 0,
                }
            )
    return out


def summaries(samples: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in dict.fromkeys(sample["server"] for sample in samples):
        ok = [x for x in samples if x["server"] == name and not x["error"]]
        failed = [x["failed"] for x in ok]
        out[name] = {
            "runs": len(ok),
            "failed_each_run": failed,
            "failed_median": statistics.median(failed) if failed else None,
            "requests_median": statistics.median(x["requests"] for x in ok) if ok else None,
            "every_pid_changed": [x["every_pid_changed"] for x in ok],
            "errors": [x["error"] for x in samples if x["server"] == name and x["error"]],
        }
    return out


def render(result: dict[str, Any]) -> str:
    rows = []
    for name, st in result["summary"].items():
        changed = st["every_pid_changed"]
        rows.append(
            [
                name,
                " ".join(str(f) for f in st["failed_each_run"]) or "-",
                f"{st['requests_median']:,.0f}" if st["requests_median"] else "-",
                f"{sum(changed)}/{len(changed)}",
                str(len(st["errors"])),
            ]
        )
    header = [
        f"server ({RELOADS} reloads under wrk)",
        "failed requests, each run",
        "requests, median",
        "runs where every pid changed",
        "runs that broke",
    ]
    return table(header, rows)
