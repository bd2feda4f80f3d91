"""Rolling replacement: a new worker for each old one, one at a time, and an old
worker drains only once its successor listens.

::

    SIGHUP / cluster.reload() ──► Rolling.reload(): one more pass queued (a reload
                                  that arrives during a pass runs after it, whole)
    health.py finds a worker due ─► Rolling.recycle(worker): a pass over that one
    (max_requests, max_rss, max_lifetime)
    passes run one at a time, in the order asked; in each,
      for each worker that was serving when the pass began, oldest first:
        fork a successor, marked `candidate` (its failure stops the pass; it is not
        a crash, so it is neither respawned nor counted towards a crash loop)
          ├─ it listens within `ready_timeout` ─► old.disconnect(): the old worker
          │                                       drains (hands its idle keep-alive
          │                                       connections on), then exits
          └─ it exits, or the time runs out ───► kill it, log why, end the pass:
                                                  the old workers keep serving

A worker listens only once it is ready to serve (`allcores serve` runs the app's
lifespan startup first), so at no point is there less capacity than before.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import signal
import time
from typing import TYPE_CHECKING, Any

from allcores.cluster.handle import Worker

if TYPE_CHECKING:
    from allcores.cluster.primary import Primary

__all__ = ["Rolling"]

log = logging.getLogger("allcores.cluster")


class Rolling:
    """The primary's reloads and recycles: queued passes, run one at a time."""

    def __init__(self, primary: Primary) -> None:
        self._primary = primary
        # Each pass: None for a reload of every worker, or (worker, why) to recycle.
        self._queued: collections.deque[tuple[Worker, str] | None] = collections.deque()
        self._reloads = 0
        self._task: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        return self._task is not None

    def reload(self) -> None:
        """Queue one pass over the workers serving when it starts."""
        self._queue(None)

    def recycle(self, worker: Worker, why: str) -> None:
        """Queue the replacement of *worker* alone, successor first."""
        self._queue((worker, why))

    def _queue(self, job: tuple[Worker, str] | None) -> None:
        self._queued.append(job)
        if self._task is None:
            self._task = self._primary.loop.create_task(self._run())

    def cancel(self) -> None:
        """The cluster is stopping: drop the queued passes; the running one ends at
        its next step (a candidate that is booting is stopped with the others)."""
        self._queued.clear()

    async def _run(self) -> None:
        try:
            while self._queued and not self._primary.stopping:
                job = self._queued.popleft()
                if job is None:
                    self._reloads += 1
                    await self._reload(self._reloads)
                else:
                    await self._recycle(*job)
        except Exception:
            log.exception("allcores: reload failed")
        finally:
            self._task = None

    async def _recycle(self, worker: Worker, why: str) -> None:
        if not worker.serving():
            return
        log.info("allcores: recycling worker %d (pid %d): %s", worker.id, worker.pid, why)
        if not await self._replace("recycle", worker) and not self._primary.stopping:
            worker.recycling = False  # asked for again at the next check

    async def _reload(self, number: int) -> None:
        primary = self._primary
        old = primary.serving()
        began = time.monotonic()
        log.info("allcores: reload %d: replacing %d worker(s), one at a time", number, len(old))
        replaced = 0
        for worker in old:
            if primary.stopping:
                return
            if not worker.serving():
                continue  # it died or was told to go since the pass began
            if not await self._replace(f"reload {number}", worker):
                if primary.stopping:
                    return
                log.error(
                    "allcores: reload %d stopped after %d of %d worker(s); "
                    "the others keep serving the code they started with",
                    number,
                    replaced,
                    len(old),
                )
                return
            replaced += 1
        log.info(
            "allcores: reload %d done: %d worker(s) replaced in %.2f s",
            number,
            replaced,
            time.monotonic() - began,
        )

    async def _replace(self, what: str, old: Worker) -> bool:
        primary = self._primary
        new = primary._fork(None, None)
        new.candidate = True
        outcome: asyncio.Future[str] = primary.loop.create_future()

        def settle(result: str, *_args: Any) -> None:
            if not outcome.done():
                outcome.set_result(result)

        new.once("listening", lambda *args: settle("listening"))
        new.once("exit", lambda *args: settle("exit"))
        timeout = primary.settings.ready_timeout
        try:
            result = await asyncio.wait_for(asyncio.shield(outcome), timeout)
        except TimeoutError:
            result = "timeout"
        if result == "listening":
            new.candidate = False
            log.info(
                "allcores: %s: worker %d (pid %d) listens; worker %d (pid %d) drains",
                what,
                new.id,
                new.pid,
                old.id,
                old.pid,
            )
            old.disconnect()
            primary.restarts[what.split()[0]] += 1
            return True
        if primary.stopping:
            return False
        if result == "timeout":
            reason = f"was not listening {timeout:g} s after it started (ready_timeout)"
            with contextlib.suppress(Exception):
                new.kill(signal.SIGKILL)
        elif new.signal_code:
            reason = f"was killed by {new.signal_code} before it listened"
        else:
            reason = f"exited with code {new.exit_code} before it listened"
        log.error(
            "allcores: %s: the new worker %d (pid %d) %s; its output is above",
            what,
            new.id,
            new.pid,
            reason,
        )
        return False
