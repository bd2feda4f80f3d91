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
from allcores.observe.scoreboard import RowState

__all__ = ["StatusBuilder"]


class StatusBuilder:
    def __init__(self, primary: Primary, app_name: str, started: float) -> None:
        self._primary = primary
        self._app = app_name
        self._started = started
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
        alive = {row["pid"] for row in rows}
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


def _state(handle_state: str, row_state: int) -> str:
    if handle_state in ("disconnecting", "disconnected", "dead"):
        return "draining" if handle_state != "dead" else "dead"
    if row_state == RowState.READY and handle_state == "listening":
        return "serving"
    return "starting"
