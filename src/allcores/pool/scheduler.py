"""The scheduler: the queue, dispatch and prefetch, timeouts and cancel.

::

    submit / run / map chunk ──► _new_task (caller's thread: pickle; reserve a
                                 queue slot under _count_lock, or QueueFullError)
                             ──► _enqueue (loop) ──► _queue ──► _pump
    _pump: the oldest task to an idle worker, else (short tasks only) prefetched
           behind a busy one, at most PREFETCH (PREFETCH_TINY for tiny tasks) deep
       ──► _dispatch ──► worker.outbox ──► _flush at the end of the loop iteration:
           one frame per worker (a batch when several tasks go together)
    the worker's first task starts ──► _start_running (its timeout timer)
    timeout ──► _on_timeout: TaskTimeoutError, the worker is killed and replaced
    cancel  ──► _cancel_task: a queued task is dropped; a running one's worker is
                killed; a prefetched one is skipped (SKIP)

Tasks start in the order they came: a direct send (`direct.py`) only happens when
nothing waits in the queue.
"""

from __future__ import annotations

import concurrent.futures
import os
import time
from collections.abc import Callable
from typing import Any

from allcores.ipc.channel import MAX_FDS
from allcores.pool import _protocol as proto
from allcores.pool._serialize import dump_function, pack, pack_batch, pack_call
from allcores.pool.errors import PoolClosedError, QueueFullError, TaskTimeoutError
from allcores.pool.state import PREFETCH_MAX_RUN_TIME
from allcores.pool.task import PoolWorker, Task, TaskState, WorkerState
from allcores.pool.workers import WorkerSet

__all__ = ["PREFETCH", "PREFETCH_TINY", "Scheduler"]

# Tasks sent to a busy worker ahead of time. More keeps workers busier between
# round trips (the 64-in-flight rate needs ~2), but a task stuck behind a slow one
# waits longer while another worker may be idle, and a crash re-queues more tasks.
PREFETCH = 2
# Tasks under TINY_TASK_TIME get a deeper prefetch, sent to a worker in one frame:
# 16 x 50 µs is under 1 ms of work waiting behind a worker, and it turns 16 sends
# and wake-ups into one (the 64-in-flight rate depends on it).
PREFETCH_TINY = 16
TINY_TASK_TIME = 50e-6


class Scheduler(WorkerSet):
    def _new_task(
        self,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        timeout: float | None,
        *,
        chunk: list[tuple[Any, ...]] | None = None,
        pull: bool = False,
        reserve: bool = True,
    ) -> Task:
        """Pickle a task in the caller's thread; raises on a closed pool or a full queue.

        With *pull*, large `bytes` arguments may travel by address (`_pull`): only for
        a task that is never skipped once sent, so that they outlive the worker's read
        (the task holds them until its reply).
        """
        if self._broken is not None:
            raise self._broken
        if self._closing:
            raise PoolClosedError("cannot schedule new tasks after shutdown")
        if timeout is None:
            timeout = self._settings.task_timeout
        task_id = next(self._task_ids)
        blob = dump_function(fn)
        if chunk is None:
            pull_from = os.getpid() if pull and self._pull_ok else None
            packed = pack_call(proto.TASK, task_id, blob, args, kwargs, pull_from)
            task = Task(task_id, fn, (args, kwargs), packed, timeout, -1)
        else:
            packed = pack(proto.CHUNK, task_id, (blob, chunk))
            task = Task(task_id, fn, None, packed, timeout, len(chunk))
        if len(packed.fds) > MAX_FDS:
            count = len(packed.fds)
            packed.close()
            raise ValueError(
                f"a task can carry at most {MAX_FDS} shared-memory blocks and large "
                f"buffers, this one has {count}; pass fewer, or one larger SharedArray"
            )
        if not reserve:
            return task
        try:
            # A map bounds its own chunks in flight, so they never meet max_queue.
            self._reserve(task, enforce=chunk is None)
        except BaseException:
            self._spend(task)
            packed.close()
            raise
        return task

    def _reserve(self, task: Task, enforce: bool = True) -> None:
        limit = self._settings.max_queue
        with self._count_lock:
            if enforce and limit is not None and self._queued >= limit:
                raise QueueFullError(
                    f"the pool's queue holds {self._queued} tasks (max_queue={limit}); "
                    "await pool.wait_for_room() before submitting, or raise max_queue"
                )
            # No call between the count and the flag: a signal handler (Ctrl-C) runs
            # only at calls and jumps, so it cannot split them.
            self._queued += 1
            task.reserved = True
            self._counts["submitted"] += 1

    def _spend(self, task: Task) -> None:
        """Give back *task*'s queue slot, once (it left the queue, ran or was dropped)."""
        with self._count_lock:
            if task.reserved:
                task.reserved = False
                self._queued -= 1

    def _enqueue(self, task: Task) -> None:
        """Loop side of a submit (the task's queue slot is already reserved)."""
        task.enqueued = True
        if self._broken is not None or (self._closing and not self._workers):
            self._spend(task)
            self._settle_error(task, self._broken or PoolClosedError("the pool is shut down"))
            return
        self._queue.append(task)
        self._pump()

    def _enqueue_from_thread(self, task: Task) -> None:
        """`_enqueue` for a task handed over from another thread: sent at once.

        Sends wait for the end of the loop iteration so that tasks dispatched together
        share a frame; a task handed over from another thread has no company coming,
        and one more loop iteration would only add to its latency.
        """
        self._flush_inline = True
        try:
            self._enqueue(task)
        finally:
            self._flush_inline = False
        if self._to_flush:
            self._flush()

    def _submit_chunk(
        self, fn: Callable[..., Any], chunk: list[tuple[Any, ...]]
    ) -> concurrent.futures.Future[Any]:
        """Queue one map chunk (any thread); its future gives (results, error, seconds)."""
        task = self._new_task(fn, (), {}, None, chunk=chunk)
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        task.future = future
        self._call(self._enqueue, task)
        return future

    def _pump(self) -> None:
        queue = self._queue
        idle = self._idle
        dispatched = False
        while queue:
            task = queue[0]
            if task.state != TaskState.QUEUED:
                queue.popleft()
                continue
            with self._idle_lock:
                if idle:
                    worker = idle.pop()
                    was_idle = True
                else:
                    found = self._prefetch_target()
                    if found is None:
                        break
                    worker = found
                    was_idle = False
            queue.popleft()
            dispatched = True
            future = task.future
            if isinstance(future, concurrent.futures.Future) and not task.running_set:
                # Like ProcessPoolExecutor: cancel() works until a worker takes the task.
                task.running_set = True
                if (
                    future.cancelled()
                    if task.bridged
                    else not future.set_running_or_notify_cancel()
                ):
                    self._spend(task)
                    task.state = TaskState.CANCELLED
                    task.packed.close()
                    self._counts["cancelled"] += 1
                    if was_idle:
                        with self._idle_lock:
                            idle.append(worker)
                    continue
            self._dispatch(worker, task)
        if dispatched:
            self._queue_shrank()
        if queue and (len(self._workers) < self._settings.max_workers or self._closing):
            self._grow()

    def _prefetch_target(self) -> PoolWorker | None:
        if self._run_ema >= PREFETCH_MAX_RUN_TIME:
            return None
        depth = PREFETCH_TINY if self._run_ema < TINY_TASK_TIME else PREFETCH
        limit = self._settings.max_tasks_per_child
        best: PoolWorker | None = None
        for worker in self._workers.values():
            if (
                worker.state != WorkerState.READY
                or worker.direct is not None
                or len(worker.inflight) > depth
            ):
                continue
            if limit is not None and worker.sent >= limit:
                continue
            if best is None or len(worker.inflight) < len(best.inflight):
                best = worker
        return best

    def _dispatch(self, worker: PoolWorker, task: Task) -> None:
        with self._count_lock:
            if task.reserved:
                task.reserved = False
                self._queued -= 1
        task.state = TaskState.SENT
        task.worker = worker
        worker.inflight[task.id] = task
        worker.sent += 1
        if len(worker.inflight) == 1 and worker.handle is not None:
            worker.handle.resume_reading()  # it was idle: the loop reads its reply
        worker.outbox.append(task.packed)
        if len(worker.outbox) == 1:
            self._to_flush.append(worker)
            if len(self._to_flush) == 1 and not self._flush_inline:
                assert self._loop is not None
                self._loop.call_soon(self._flush)
        if len(worker.inflight) == 1:
            self._start_running(task)

    def _flush(self) -> None:
        """Send what this loop iteration dispatched: one frame per worker where it can."""
        workers, self._to_flush = self._to_flush, []
        for worker in workers:
            outbox, worker.outbox = worker.outbox, []
            handle = worker.handle
            if handle is None or worker.state == WorkerState.KILLED:
                continue
            if len(outbox) == 1 or any(packed.fds for packed in outbox):
                for packed in outbox:
                    handle.send(packed.payload, packed.fds)
            else:
                handle.send(pack_batch([packed.payload for packed in outbox]))

    def _start_running(self, task: Task) -> None:
        task.started = now = time.monotonic()
        self._wait_time.add(now - task.submitted)
        if task.timeout is not None:
            assert self._loop is not None
            task.timer = self._loop.call_later(task.timeout, self._on_timeout, task)

    def _queue_shrank(self) -> None:
        limit = self._settings.max_queue
        if self._room_waiters and (limit is None or self._queued < limit):
            self._wake(self._room_waiters, None)
        if self._drain_waiters and self._queued == 0:
            self._wake(self._drain_waiters, None)

    def _on_timeout(self, task: Task) -> None:
        task.timer = None
        worker = task.worker
        if task.state != TaskState.SENT or worker is None:
            return
        self._counts["timed_out"] += 1
        worker.inflight.pop(task.id, None)
        assert task.timeout is not None
        self._settle_error(task, TaskTimeoutError(task.timeout, task.describe(), worker.id))
        self._kill(worker)
        self._pump()

    def _cancel_task(self, task: Task) -> None:
        """The caller gave up on a task (loop side): drop it, or kill its worker if running."""
        if task.state == TaskState.QUEUED:
            task.state = TaskState.CANCELLED
            self._spend(task)
            self._counts["cancelled"] += 1
            task.packed.close()
            self._queue_shrank()
            return
        worker = task.worker
        if task.state != TaskState.SENT or worker is None:
            return
        if worker.direct is task:
            self._adopt_direct(worker, force=True)
        self._counts["cancelled"] += 1
        running = next(iter(worker.inflight)) == task.id
        worker.inflight.pop(task.id, None)
        task.state = TaskState.CANCELLED
        if task.timer is not None:
            task.timer.cancel()
            task.timer = None
        if running and self._backend.capabilities.cancel_running:
            task.packed.close()
            self._kill(worker)
            self._pump()
        elif task.packed in worker.outbox:
            worker.outbox.remove(task.packed)
            task.packed.close()
        elif not running and worker.handle is not None:
            skip = pack(proto.SKIP, task.id, None)
            worker.handle.send(skip.payload, skip.fds)
            task.packed.close()

    def _abandon(self, task: Task) -> None:
        """A submit raised after the task was made: give its slot back unless it went
        to a worker (`_send_direct`) or into the queue (it then runs, unseen)."""
        if task.enqueued or task.state != TaskState.QUEUED:
            return
        self._spend(task)
        task.packed.close()
