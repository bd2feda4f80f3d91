"""The primary's periodic look at every worker: a hung loop, and workers due to be
recycled. Reads the scoreboard (and, for `max_rss`, /proc through psutil); no message.

::

    every `interval` s, from the primary's supervision loop:
      serving worker whose heartbeat is older than timeout_hung
        ─► log it, SIGQUIT: its faulthandler writes every thread's Python stack to
           its stderr, which the primary shows ─► SIGKILL `_DUMP_TIME` s later; it is
           respawned as a crash. Meanwhile `balanced` already routes around it.
      serving worker past max_requests (jittered), max_rss or max_lifetime
        ─► Rolling.recycle(worker): a successor first, then it drains
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import signal
from typing import TYPE_CHECKING

from allcores._system import resident_bytes
from allcores.cluster.handle import Worker
from allcores.cluster.messages import DUMP_SIGNAL

if TYPE_CHECKING:
    from allcores.cluster.primary import Primary

__all__ = ["Health"]

log = logging.getLogger("allcores.cluster")

# Between the stack dump and the kill: faulthandler writes from its signal handler
# at once, even while Python code blocks; this is for the pipe to be read.
_DUMP_TIME = 0.5
_MB = 1024 * 1024


class Health:
    """Looks after the primary's workers between other events."""

    def __init__(self, primary: Primary) -> None:
        self._primary = primary
        self._request_limits: dict[int, int] = {}

    @property
    def interval(self) -> float | None:
        """How often `check` wants to run; None when every check is off."""
        settings = self._primary.settings
        wanted = [
            settings.timeout_hung / 4 if settings.timeout_hung else None,
            1.0 if settings.max_requests or settings.max_rss_mb else None,
            min(1.0, settings.max_lifetime / 10) if settings.max_lifetime else None,
        ]
        periods = [period for period in wanted if period is not None]
        return min(1.0, *periods) if periods else None

    def check(self, now: float) -> None:
        settings = self._primary.settings
        for worker in list(self._primary.workers.values()):
            if worker.is_dead() or worker.candidate or not worker.listening_once:
                continue
            if settings.timeout_hung and not worker.hung:
                age = worker.heartbeat_age
                if age > settings.timeout_hung:
                    self._kill_hung(worker, age)
                    continue
            if worker.exited_after_disconnect or worker.recycling:
                continue
            reason = self._recycle_reason(worker, now)
            if reason:
                worker.recycling = True
                self._primary._rolling.recycle(worker, reason)

    def _kill_hung(self, worker: Worker, age: float) -> None:
        worker.hung = True
        log.error(
            "allcores: worker %d (pid %d): its event loop has not run for %.1f s "
            "(timeout_hung=%g); its stack follows, then it is killed and replaced",
            worker.id,
            worker.pid,
            age,
            self._primary.settings.timeout_hung,
        )
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker.pid, DUMP_SIGNAL)

        def kill() -> None:
            if not worker.is_dead():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.pid, signal.SIGKILL)

        self._primary.loop.call_later(_DUMP_TIME, kill)

    def _recycle_reason(self, worker: Worker, now: float) -> str:
        settings = self._primary.settings
        if settings.max_requests:
            limit = self._request_limits.get(worker.id)
            if limit is None:
                # Jittered per worker, so that workers started together are not all
                # recycled at once.
                jitter = random.randint(0, settings.max_requests_jitter)
                limit = self._request_limits[worker.id] = settings.max_requests + jitter
            served = worker.requests_served
            if served >= limit:
                return f"served {served} requests (max_requests={limit})"
        if settings.max_lifetime and now - worker.started > settings.max_lifetime:
            return f"up {now - worker.started:.0f} s (max_lifetime={settings.max_lifetime:g})"
        if settings.max_rss_mb:
            rss = resident_bytes(worker.pid)
            if rss > settings.max_rss_mb * _MB:
                return f"RSS {rss / _MB:.0f} MB (max_rss={settings.max_rss_mb:g} MB)"
        return ""

    def forget(self, worker: Worker) -> None:
        self._request_limits.pop(worker.id, None)
