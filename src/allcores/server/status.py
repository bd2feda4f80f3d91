"""What `allcores status` (and the admin endpoint's /status) says about a server:
one dict, built from the primary's workers and their scoreboard rows.

CPU is the share of one core each process used since the previous status (since it
started, the first time): a status read must not block the primary to sample it.
"""

from __future__ import annotations

import os
import time
from typing import Any

import psutil

from allcores.cluster.primary import Primary
from allcores.observe.scoreboard import LATENCY_BUCKETS_S, RowState
from allcores.server.shared_pool.owner import SharedPool

__all__ = ["StatusBuilder", "percentile"]


class StatusBuilder:
    def __init__(
        self, primary: Primary, app_name: str, started: float, pool: SharedPool | None = None
    ) -> None:
        self._primary = primary
        self._app = app_name
        self._started = started
        self._pool = pool
        self._processes: dict[int, psutil.Process] = {}

    def build(self) -> dict[str, Any]:
        primary = self._primary
        now = time.monotonic()
        rows = []
        for worker in sorted(primary.workers.values(), key=lambda w: w.id):
            snapshot = primary.scoreboard.read(worker.row)
            rss, cpu = self._usage(worker.pid, now - worker.started)
            rows.append(
                {
                    "id": worker.id,
                    "pid": worker.pid,
                    "state": _state(worker.state, snapshot.state),
                    "uptime": round(now - worker.started, 1),
                    "requests": snapshot.requests_total,
                    "in_flight": snapshot.tasks,
                    "connections": max(0, worker.open_connections),
                    "rss": rss,
                    "cpu": cpu,
                    "lag_ms": round(snapshot.lag_ms, 2),
                    "lag_max_ms": round(snapshot.lag_max_ms, 2),
                    "heartbeat_age": round(min(snapshot.heartbeat_age(now), 1e6), 3),
                }
            )
        offloads = sum(primary.scoreboard.read(w.row).offloads for w in primary.workers.values())
        pool = self._pool_status(now, offloads) if self._pool is not None else None
        alive = {row["pid"] for row in rows}
        if pool is not None:
            alive |= {process["pid"] for process in pool["processes"]}
        for pid in [pid for pid in self._processes if pid not in alive]:
            del self._processes[pid]
        return {
            "app": self._app,
            "pid": os.getpid(),
            "uptime": round(now - self._started, 1),
            "policy": primary.settings.scheduling_policy,
            "workers": rows,
            "serving": len(primary.serving(listening=True)),
            "restarts": dict(primary.restarts),
            "pool": pool,
        }

    def _pool_status(self, now: float, offloads: int) -> dict[str, Any]:
        """The shared pool: its processes, how busy, its queue, run and wait times."""
        pool = self._pool
        assert pool is not None
        processes = []
        run = [0] * (len(LATENCY_BUCKETS_S) + 1)
        wait = [0] * (len(LATENCY_BUCKETS_S) + 1)
        for snapshot in pool.rows():
            run = [a + b for a, b in zip(run, snapshot.latency_histogram, strict=True)]
            wait = [a + b for a, b in zip(wait, snapshot.wait_histogram, strict=True)]
            if not snapshot.pid:
                continue
            rss, cpu = self._usage(snapshot.pid, now - snapshot.started)
            processes.append(
                {
                    "id": snapshot.index + 1,
                    "pid": snapshot.pid,
                    "state": snapshot.state_name,
                    "uptime": round(now - snapshot.started, 1),
                    "tasks": snapshot.tasks_total,
                    "rss": rss,
                    "cpu": cpu,
                }
            )
        busy = sum(1 for p in processes if p["state"] == "busy")
        return {
            "size": pool.size,
            "busy": busy,
            # Sent by the HTTP workers and not answered, less those running: waiting.
            "queue": max(0, offloads - busy),
            "queue_limit": pool.queue,
            "tasks": sum(p["tasks"] for p in processes),
            "run_ms": {q: percentile(run, q) for q in ("p50", "p99")},
            "wait_ms": {q: percentile(wait, q) for q in ("p50", "p99")},
            "restarts": dict(pool.restarts),
            "processes": processes,
        }

    def _usage(self, pid: int, lived: float) -> tuple[int, float]:
        """(RSS bytes, CPU % of one core) of *pid*; zeros if it cannot be read."""
        try:
            process = self._processes.get(pid)
            if process is None:
                process = self._processes[pid] = psutil.Process(pid)
                times = process.cpu_times()
                cpu = 100.0 * (times.user + times.system) / max(lived, 1e-3)
                process.cpu_percent(None)  # the next reading measures from here
            else:
                cpu = process.cpu_percent(None)
            return int(process.memory_info().rss), round(cpu, 1)
        except psutil.Error:
            return 0, 0.0


def percentile(counts: list[int] | tuple[int, ...], q: str) -> float | None:
    """The p50 / p99 of a LATENCY_BUCKETS_S histogram, in ms, as its bucket's upper
    bound (None with no observations; the last bucket's lower bound past it)."""
    total = sum(counts)
    if not total:
        return None
    rank = total * int(q[1:]) / 100
    seen = 0
    for bound, count in zip(LATENCY_BUCKETS_S, counts, strict=False):
        seen += count
        if seen >= rank:
            return bound * 1000
    return LATENCY_BUCKETS_S[-1] * 1000


def _state(handle_state: str, row_state: int) -> str:
    if handle_state in ("disconnecting", "disconnected", "dead"):
        return "draining" if handle_state != "dead" else "dead"
    if row_state == RowState.READY and handle_state == "listening":
        return "serving"
    return "starting"
