"""Replies: what the loop does with each frame from a worker, and with its end.

::

    worker ──frame──► backend channel (read by the loop) ──► _on_message
        READY        ──► _on_ready: idle (or its first task runs), waiters woken
        RESULT/ERROR ──► _on_result: future settled, stats ──► _after_reply: the
        CHUNK_RESULT     worker's next task starts, or it goes idle; queue pumped
        INIT_FAILED  ──► _break: the pool cannot start; everything fails
    worker ends ──► _on_worker_exit: its running task fails (WorkerCrashedError),
                    what it held but had not started goes back to the queue, a
                    replacement starts
"""

from __future__ import annotations

import os

from allcores.pool import _protocol as proto
from allcores.pool import _pull
from allcores.pool._serialize import read_head, unpack
from allcores.pool.backends.base import WorkerExit
from allcores.pool.errors import InitializerError, RemoteTraceback, WorkerCrashedError
from allcores.pool.recovery import DirectRecovery
from allcores.pool.task import PoolWorker, Task, TaskState, WorkerState

__all__ = ["Replies"]


class Replies(DirectRecovery):
    def _on_message(self, worker: PoolWorker, payload: bytes | bytearray, fds: list[int]) -> None:
        kind, _nbuf, _nuser, task_id, seconds = read_head(payload)
        if (
            worker.state == WorkerState.STARTING
            and kind != proto.READY
            and kind != proto.INIT_FAILED
        ):
            # Its READY went before, to a thread that read it and was cut before
            # passing it on (`_send_early`): only its pull answer is lost (pulls stay off).
            self._on_ready(worker)
        if kind == proto.RESULT or kind == proto.ERROR or kind == proto.CHUNK_RESULT:
            direct = worker.direct
            if direct is not None and direct.id == task_id:
                self._adopt_direct(worker, force=True)
            task = worker.inflight.pop(task_id, None)
            if task is None:
                # A result for a task cancelled or timed out meanwhile: drop it.
                for fd in fds:
                    os.close(fd)
                return
            self._on_result(worker, task, kind, seconds, payload, fds)
        elif kind == proto.READY:
            pull = unpack(payload, fds).get("pull")  # None: not probed
            if pull is False:
                self._pull_never = True
                self._pull_ok = False
            elif pull and not self._pull_never:
                self._pull_ok = _pull.verified = True
            self._on_ready(worker)
        elif kind == proto.INIT_FAILED:
            exc, tb = unpack(payload, fds)
            exc.__cause__ = RemoteTraceback(tb)
            error = InitializerError(
                f"the pool's initializer {self._settings.initializer!r} raised "
                f"{type(exc).__name__}: {exc}; the pool will not start"
            )
            error.__cause__ = exc
            self._break(error)
        else:
            for fd in fds:
                os.close(fd)

    def _on_ready(self, worker: PoolWorker) -> None:
        if worker.state != WorkerState.STARTING:
            return
        self._ever_ready = True
        self._failed_starts = 0
        with self._idle_lock:
            # Under the lock: the thread that reads a task sent before READY
            # (`_send_early`) re-lists the worker itself if it is READY by then.
            worker.state = WorkerState.READY
            busy = worker.direct is not None or bool(worker.inflight)
        if not busy:
            # Idle, unless a task sent before READY took its last one (max_tasks_per_child).
            self._release_worker(worker)
        if self._ready_waiters and not any(
            w.state == WorkerState.STARTING for w in self._workers.values()
        ):
            self._wake(self._ready_waiters, None)
        self._pump()
        if self._closing:
            self._maybe_finish_shutdown()
        else:
            self._schedule_idle_check()

    def _on_result(
        self,
        worker: PoolWorker,
        task: Task,
        kind: int,
        seconds: float,
        payload: bytes | bytearray,
        fds: list[int],
    ) -> None:
        if task.timer is not None:
            task.timer.cancel()
            task.timer = None
        self._run_time.add(seconds)
        self._busy_seconds += seconds
        self._run_ema += (seconds - self._run_ema) * 0.1
        outcome = self._settle_reply(task, kind, seconds, payload, fds)
        if outcome is not None:
            self._counts[outcome] += 1
        self._after_reply(worker)

    def _after_reply(self, worker: PoolWorker) -> None:
        """A worker's task ended through the loop: its next, or idle; then the queue."""
        if worker.inflight:
            self._start_running(next(iter(worker.inflight.values())))
        elif worker.state == WorkerState.READY and self._release_worker(worker):
            self._schedule_idle_check()
        if self._queue:
            self._pump()
        if self._closing:
            self._maybe_finish_shutdown()

    def _on_worker_exit(self, worker: PoolWorker, exit_: WorkerExit) -> None:
        was = worker.state
        self._forget_worker(worker)
        self._adopt_direct(worker, force=True)
        inflight = list(worker.inflight.values())
        worker.inflight.clear()
        worker.state = WorkerState.KILLED
        if inflight and self._broken is not None:
            for task in inflight:
                self._settle_error(task, self._broken)
        elif inflight and was != WorkerState.STARTING:
            head, rest = inflight[0], inflight[1:]
            self._counts["crashed"] += 1
            pid = worker.handle.pid if worker.handle is not None else None
            self._settle_error(
                head, WorkerCrashedError(worker.id, pid, exit_.exitcode, head.describe())
            )
            self._requeue(rest)
        else:
            # A worker that dies before READY never ran the task it was sent early
            # (`_send_early`): that task waits for the next worker.
            self._requeue(inflight)
        if was == WorkerState.STARTING and not self._closing and self._broken is None:
            self._worker_failed_to_start(
                RuntimeError(
                    f"pool worker {worker.id} exited with code {exit_.exitcode} during start"
                )
            )
        if self._closing:
            self._grow()
            self._maybe_finish_shutdown()
            return
        self._grow()
        self._pump()

    def _break(self, error: BaseException) -> None:
        """The pool cannot work (an initializer fails): fail everything, stop workers."""
        if self._broken is not None:
            return
        self._broken = error
        for task in self._queue:
            self._spend(task)
            if task.state == TaskState.QUEUED:
                self._settle_error(task, error)
        self._queue.clear()
        for worker in list(self._workers.values()):
            self._adopt_direct(worker)
            for task in worker.inflight.values():
                self._settle_error(task, error)
            worker.inflight.clear()
            self._kill(worker)
        self._wake(self._ready_waiters, error)
        self._wake(self._room_waiters, error)
        self._wake(self._drain_waiters, None)
        self._closing = True
        self._maybe_finish_shutdown()
