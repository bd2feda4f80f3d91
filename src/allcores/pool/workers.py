"""The worker set: start, retire, kill and replace workers; shrink when idle.

::

    Pool() ──► _spawn x min_workers (fork from the zygote, before any thread)
    tasks wait, room left ──► _grow ──► _spawn
    a READY worker with nothing to do ──► _release_worker ──┬─ max_tasks_per_child
                                                            │  reached: _retire, _grow
                                                            └─ else _make_idle (the loop
                                                               stops reading it)
    idle past idle_timeout, above min_workers ──► _shrink_idle ──► _retire
    timeout, cancel of a running task, broken pool ──► _kill (what it held but had
                                                       not started is requeued)

A worker's end arrives in `Replies._on_worker_exit`, which calls back here.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from allcores.observe.scoreboard import RowState
from allcores.pool import _pull
from allcores.pool.binding import Binding
from allcores.pool.errors import InitializerError
from allcores.pool.task import PoolWorker, Task, TaskState, WorkerState

__all__ = ["MAX_FAILED_STARTS", "WorkerSet"]

# Workers that die before their first READY in a row before the pool gives up: a
# missing module or a failing initializer would otherwise respawn forever.
MAX_FAILED_STARTS = 3


class WorkerSet(Binding):
    def _spawn(self) -> None:
        if not self._free_rows:
            return
        row = self._free_rows.pop()
        worker = PoolWorker(next(self._worker_ids), row)
        self._workers[worker.id] = worker
        self._scoreboard.row(row).clear(0, RowState.STARTING)
        setup = {
            "worker_id": worker.id,
            "scoreboard": self._scoreboard.segment,
            "scoreboard_rows": self._scoreboard.rows,
            "row": row,
            "pull_probe": None
            if self._pull_never or self._pull_ok
            else (os.getpid(), _pull.address_of(self._pull_probe), self._pull_probe),
        }
        loop = self._loop
        if loop is not None and self._backend.start_is_slow():
            started = loop.run_in_executor(None, self._backend.start_worker, worker.id, setup)
            started.add_done_callback(lambda f: self._on_started(worker, f))
            return
        try:
            worker.handle = self._backend.start_worker(worker.id, setup)
        except BaseException:
            self._forget_worker(worker)
            raise
        if loop is not None:
            self._attach(worker)

    def _on_started(self, worker: PoolWorker, started: asyncio.Future[Any]) -> None:
        exc = started.exception()
        if exc is not None:
            self._forget_worker(worker)
            self._worker_failed_to_start(exc)
            return
        worker.handle = started.result()
        self._attach(worker)
        if worker.state == WorkerState.KILLED or (
            self._closing and not any(task.state == TaskState.QUEUED for task in self._queue)
        ):
            worker.handle.stop()  # else it starts for tasks queued during shutdown

    def _forget_worker(self, worker: PoolWorker) -> None:
        if self._workers.pop(worker.id, None) is not None:
            self._scoreboard.row(worker.row).clear()
            self._free_rows.append(worker.row)
            self._dead_worker_seconds += time.monotonic() - worker.started_at
        with self._idle_lock:
            if worker in self._idle:
                self._idle.remove(worker)

    def _live_workers(self) -> int:
        return sum(1 for w in self._workers.values() if w.state != WorkerState.KILLED)

    def _grow(self) -> None:
        """Start workers while tasks wait and there is room (called on the loop)."""
        if self._broken is not None:
            return
        if self._closing:
            # Tasks queued during shutdown still run: a submit that raced shutdown()
            # from another thread, or what a crashed worker held. Shutdown retires
            # idle workers, so start one for them when none is left to take them.
            if (
                any(task.state == TaskState.QUEUED for task in self._queue)
                and self._free_rows
                and not any(
                    w.state in (WorkerState.READY, WorkerState.STARTING)
                    for w in self._workers.values()
                )
            ):
                self._spawn()
            return
        while self._live_workers() < self._settings.min_workers and self._free_rows:
            self._spawn()
        starting = sum(1 for w in self._workers.values() if w.state == WorkerState.STARTING)
        while (
            self._queued > starting
            and self._live_workers() < self._settings.max_workers
            and self._free_rows
        ):
            self._spawn()
            starting += 1

    def _retire(self, worker: PoolWorker) -> None:
        with self._idle_lock:
            if worker.direct is not None:
                return  # A thread just gave it a task: it retires after that one.
            if worker in self._idle:
                self._idle.remove(worker)
            worker.state = WorkerState.RETIRING
        if worker.handle is not None:
            worker.handle.stop()

    def _kill(self, worker: PoolWorker) -> None:
        """Kill a worker; what it held but had not started goes back to the queue.

        A task sent to it directly (``worker.direct``) stays: it was running, so the
        worker's end fails it with WorkerCrashedError rather than running it twice.
        """
        with self._idle_lock:
            if worker in self._idle:
                self._idle.remove(worker)
            worker.state = WorkerState.KILLED
        self._requeue(list(worker.inflight.values()))
        worker.inflight.clear()
        worker.outbox.clear()
        if worker.handle is not None:
            worker.handle.kill()

    def _requeue(self, tasks: list[Task]) -> None:
        for task in reversed(tasks):
            if task.timer is not None:
                task.timer.cancel()
                task.timer = None
            task.state = TaskState.QUEUED
            task.worker = None
            self._queue.appendleft(task)
        if tasks:
            with self._count_lock:
                self._queued += len(tasks)
                for task in tasks:
                    task.reserved = True

    def _worker_failed_to_start(self, exc: BaseException) -> None:
        self._failed_starts += 1
        if not self._ever_ready or self._failed_starts >= MAX_FAILED_STARTS:
            error = InitializerError(f"pool workers cannot start ({exc}); no more will be started")
            error.__cause__ = exc
            self._break(error)

    def _release_worker(self, worker: PoolWorker) -> bool:
        """A READY worker with no task left: retire it at max_tasks_per_child (and start
        its replacement), else make it idle. True when it went idle."""
        limit = self._settings.max_tasks_per_child
        if limit is not None and worker.sent >= limit:
            self._retire(worker)
            self._grow()
            return False
        worker.idle_since = time.monotonic()
        self._make_idle(worker)
        return True

    def _make_idle(self, worker: PoolWorker) -> None:
        """Put a worker that holds no task in the idle list (loop thread).

        The loop stops reading an idle worker's socket, so that a thread that sends
        it a task directly may read the reply itself (`_send_direct`).
        """
        if worker.handle is not None:
            worker.handle.pause_reading()
        with self._idle_lock:
            self._idle.append(worker)

    def _schedule_idle_check(self) -> None:
        timeout = self._settings.idle_timeout
        if (
            timeout is None
            or self._idle_timer is not None
            or self._live_workers() <= self._settings.min_workers
        ):
            return
        assert self._loop is not None
        self._idle_timer = self._loop.call_later(timeout, self._shrink_idle)

    def _shrink_idle(self) -> None:
        self._idle_timer = None
        timeout = self._settings.idle_timeout
        assert timeout is not None
        now = time.monotonic()
        with self._idle_lock:
            idle = sorted(self._idle, key=lambda w: w.idle_since)
        for worker in idle:
            if self._live_workers() <= self._settings.min_workers:
                break
            if now - worker.idle_since >= timeout:
                self._retire(worker)
        self._schedule_idle_check()
