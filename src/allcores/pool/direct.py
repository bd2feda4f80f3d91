"""The direct lane: a thread that submits to an idle worker sends the task itself
and, when it waits on the future, reads the reply itself.

Through the loop a sync round trip costs four thread wake-ups (caller, loop,
worker, loop, caller); this way it costs two::

    submit (caller's thread) ──► _send_direct: takes an idle worker (_idle_lock),
                                 marks the task worker.direct, sends its frame
    future.result() ──► _wait_direct: claims the worker's socket, spins briefly,
                        reads the reply ──► _finish_direct: settles the future,
                        gives the worker back to _idle (or to the loop: _after_direct)
    nobody calls result(), or a Ctrl-C cuts any of it ──► the loop finishes the task
                              (recovery.py: _sweep_direct, _direct_interrupted)

Only plain cases come here: no timeout, a small frame, an idle worker and nothing
waiting in the queue. The rule for Ctrl-C: one that lands anywhere here never
hangs the pool and never loses a result silently; it may cost a worker restart.
What the loop does then is in `recovery.py`.
"""

from __future__ import annotations

import concurrent.futures
import os
import sys
import time

from allcores.errors import ChannelError
from allcores.pool import _protocol as proto
from allcores.pool._serialize import read_head
from allcores.pool.backends.base import BackendWorker
from allcores.pool.scheduler import Scheduler
from allcores.pool.task import Owner, PoolWorker, Task, TaskState, WorkerState

__all__ = ["DIRECT_MAX_PAYLOAD", "DirectLane"]

# A thread that submits to an idle worker sends the task itself and, when it then
# waits on the future, reads the reply itself (`Pool._send_direct`): two thread
# wake-ups per round trip instead of four. Frames up to this size qualify: an idle
# worker has read everything sent to it, so its socket buffer takes them whole.
DIRECT_MAX_PAYLOAD = 32 * 1024
# A thread waiting on a direct task polls for its reply this long before it sleeps,
# when the pool's tasks typically run under SPIN_TASK_TIME (`Pool._spin_for_reply`).
SPIN_SECONDS = 50e-6
SPIN_TASK_TIME = 50e-6
# A submit asks for the sweep again when it has not run for this long: a Ctrl-C can
# cut the request that started it.
SWEEP_STALE = 0.5


def _is_reply(task: Task, kind: int, task_id: int) -> bool:
    """Whether a frame of *kind* for *task_id* is a direct *task*'s reply."""
    return task_id == task.id and (kind == proto.RESULT or kind == proto.ERROR)


class DirectLane(Scheduler):
    def _send_early(self, task: Task, worker: PoolWorker) -> bool:
        """Send the pool's first task to *worker*, still starting (`_bind`).

        Only before the loop runs: nothing reads the worker's socket yet, so pausing
        it hands the socket to the caller, as for an idle worker. The worker reads
        the task after SETUP; its READY comes ahead of the reply, and the thread that
        reads the reply passes it on to the loop (`_wait_direct`).
        """
        assert worker.handle is not None
        worker.handle.pause_reading()  # `_bind` resumes it if the task does not go
        return self._send_direct(task, early=worker)

    def _send_direct(self, task: Task, early: PoolWorker | None = None) -> bool:
        """Send *task* from the submitting thread to an idle worker (or to *early*, a
        starting worker whose socket nobody reads: `_send_early`); False if not.

        Through the loop a sync round trip costs four thread wake-ups (caller, loop,
        worker, loop, caller). Sent from here, with the reply read by the thread that
        waits on the future (`_wait_direct`), it costs two. Only plain cases come
        here: no timeout (its timer is the loop's), a small frame, an idle worker,
        and no other task waiting, so that tasks still start in the order they came.
        A task whose future nobody waits on with ``result()`` is taken over by the
        loop after DIRECT_GRACE (`_sweep_direct`), or at once by `add_done_callback`.
        """
        packed = task.packed
        if task.timeout is not None or len(packed.payload) > DIRECT_MAX_PAYLOAD:
            return False
        future = task.future
        assert isinstance(future, concurrent.futures.Future)
        now = time.monotonic()
        with self._idle_lock:
            if self._closing or (not self._idle if early is None else early.direct is not None):
                return False
            # The sweep recovers a task whose submit a Ctrl-C cuts anywhere below
            # (`_direct_interrupted`): it runs, or is asked for, before anything is
            # taken. Asked again if it seems to have stopped (a cut kick).
            if not self._sweeping or now - self._swept_at > SWEEP_STALE:
                self._post_quietly(self._kick_sweep)
                self._sweeping = True
            with self._count_lock:
                if self._queued != 1:  # 1: this task's own reservation
                    return False
                task.reserved = False
                self._queued -= 1
                task.state = TaskState.SENT
                wake_waiters = bool(self._room_waiters or self._drain_waiters)
            # A cut from here to `worker.direct` either drops the task before a
            # worker is taken, or comes after it is published: between the two,
            # nothing calls out, and a signal handler runs only at calls and jumps.
            future.set_running_or_notify_cancel()  # new: nobody can have cancelled it
            task.running_set = True
            # Not kept in a local: the frame would then refer to itself, and every
            # round trip would leave a cycle for the garbage collector.
            task.sender = sys._getframe()
            task.started = self._last_direct = now
            task.owner = Owner.NONE
            if early is None:
                worker = self._idle[-1]
                del self._idle[-1]
            else:
                worker = early
            task.worker = worker
            worker.sent += 1
            worker.direct = task
            self._direct_live.add(task)
            self._direct_sent += 1
        handle = worker.handle
        if handle is not None and handle.send_from_thread(packed.payload, packed.fds):
            task.sender = None
            if wake_waiters:
                self._post_quietly(self._queue_shrank)
            return True
        # Nothing went (the worker died, or its channel is closing): unless the loop
        # has already settled the task (it saw the worker end), the loop sends it.
        # The sweep keeps running (an extra sweep is harmless; a missing one is not).
        with self._idle_lock:
            if worker.direct is not task:
                return True  # the loop adopted it and failed it with the worker
            worker.direct = None
            task.owner = Owner.LOOP
            task.sender = None
            self._direct_live.discard(task)
            self._direct_sent -= 1
            worker.sent -= 1
            if worker.id in self._workers and worker.state == WorkerState.READY:
                self._idle.append(worker)
            with self._count_lock:
                self._queued += 1
                task.reserved = True
                task.state = TaskState.QUEUED
            task.worker = None
        return False

    def _wait_direct(self, task: Task, timeout: float | None) -> float | None:
        """Wait for a direct task by reading its worker's reply in this thread.

        Returns what is left of *timeout*. When the reply cannot be read here (the
        loop took it over, the worker died, another thread reads it), it returns at
        once and the future completes through the loop.

        An exception raised here asynchronously (Ctrl-C) may land anywhere, even in
        the cleanup below; nothing is lost for it. The claim is named by this call's
        frame, so the loop can tell a claim whose thread left (`_check_claims`). A cut
        read is settled by `_direct_interrupted`.
        """
        if self._on_loop_thread():
            return timeout
        # The claim is named by this call's frame, fetched again where it is needed
        # rather than kept in a local (a frame referring to itself is a cycle for
        # the garbage collector, one per round trip).
        with self._idle_lock:
            worker = task.worker
            if task.owner != Owner.NONE or worker is None or worker.direct is not task:
                return timeout
            handle = worker.handle
            claimed = handle is not None and handle.claim_reading(sys._getframe())
            task.owner = Owner.CALLER if claimed else Owner.LOOP
            if claimed:
                self._claims = True
        if not claimed or handle is None:
            self._post(self._direct_takeover, task)
            return timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        # Tiny tasks' replies come back within tens of µs: look for them a moment
        # before sleeping (`_spin_for_reply`).
        spin = self._run_ema < SPIN_TASK_TIME and (timeout is None or timeout > SPIN_SECONDS)
        finished = False
        to_loop = False
        interrupted = False
        frame: tuple[bytes | bytearray, list[int]] | None = None
        try:
            while True:
                wait = None if deadline is None else max(0.0, deadline - time.monotonic())
                try:
                    frame = self._spin_for_reply(handle) if spin else None
                    spin = False
                    if frame is None:
                        frame = handle.read_now(wait)
                except ChannelError:
                    to_loop = True  # EOF or a corrupt stream: the loop ends the worker
                    break
                if frame is None:
                    break  # timed out: the task goes back to nobody (the sweep's)
                finished = self._finish_direct(worker, task, frame)
                if finished:
                    break
                if frame[0][0] == proto.READY:
                    # The worker got this task while it started (`_send_early`): its
                    # READY comes first, for the loop; the reply follows.
                    self._post_quietly(self._on_message, worker, frame[0], frame[1])
                    frame = None
                    continue
                # Not this task's reply (a cancelled task's late result): the loop
                # takes it, and reads this worker from now on.
                self._post(self._on_message, worker, frame[0], frame[1])
                frame = None
                to_loop = True
                break
        except BaseException:
            interrupted = True
            raise
        finally:
            try:
                if interrupted and not finished:
                    # Posted first: the loop recovers the task even if a second
                    # interrupt cuts what follows.
                    self._post(self._direct_interrupted, worker, task, frame)
                elif not finished:
                    with self._idle_lock:
                        if task.owner == Owner.CALLER:
                            task.owner = Owner.LOOP if to_loop else Owner.NONE
            finally:
                # Released once, after the task is detached (the loop, ending this
                # worker, must not adopt it too). A resume asked for meanwhile (the
                # sweep, or a dispatch to the worker once idle again) is kept by the
                # claim and honoured here.
                handle.release_reading(resume=to_loop and not interrupted, token=sys._getframe())
                if self._gate is not None:
                    self._open_gate()  # the first round trip is over
        return None if deadline is None else max(0.0, deadline - time.monotonic())

    @staticmethod
    def _spin_for_reply(handle: BackendWorker) -> tuple[bytes | bytearray, list[int]] | None:
        """Poll for a reply for up to SPIN_SECONDS, yielding the CPU between looks.

        Sleeping and being woken cost two cross-CPU wake-ups of ~10-20 µs each on the
        dev VM, as much CPU as this spin, and the caller has nothing else to do.
        Measured one by one: ~78 -> ~55 µs a round trip, same CPU time. sched_yield
        lets a worker that shares this CPU run first.
        """
        until = time.perf_counter() + SPIN_SECONDS
        while True:
            frame = handle.read_now(0)
            if frame is not None or time.perf_counter() >= until:
                return frame
            os.sched_yield()

    def _finish_direct(
        self, worker: PoolWorker, task: Task, frame: tuple[bytes | bytearray, list[int]]
    ) -> bool:
        """Settle a direct task from its reply, in the waiting thread (which still holds
        the claim on the worker's socket); False if the frame is not that reply."""
        payload, fds = frame
        kind, _nbuf, _nuser, task_id, seconds = read_head(payload)
        if not _is_reply(task, kind, task_id):
            return False
        # Settled before it is detached from the worker: an interrupt between the two
        # leaves a settled task still marked as this thread's, which the loop puts
        # right (`_direct_interrupted`, `_check_claims`); the other order could leave
        # a task nobody settles. While this thread's claim stands, the loop neither
        # reads this worker nor ends it, so nothing settles the task meanwhile.
        self._run_ema += (seconds - self._run_ema) * 0.1
        outcome = self._settle_reply(task, kind, seconds, payload, fds)
        limit = self._settings.max_tasks_per_child
        now = time.monotonic()
        with self._idle_lock:
            ours = worker.direct is task
            back = False
            if ours:
                back = (
                    worker.id in self._workers
                    and worker.state == WorkerState.READY
                    and not self._closing
                    and (limit is None or worker.sent < limit)
                )
                task.owner = Owner.LOOP
                # No call from the detach to the append: a cut cannot fall between.
                worker.direct = None
                if back:
                    worker.idle_since = now
                    self._idle.append(worker)
                self._direct_live.discard(task)
        if not ours:
            return True  # the loop ended the worker meanwhile (interpreter exit)
        # The loop folds these into the counts and histograms (`_fold_direct_stats`).
        self._direct_stats.append((outcome, seconds, task.started - task.submitted))
        settings = self._settings
        if (
            not back
            or self._queued
            or self._closing
            or (
                settings.idle_timeout is not None
                and settings.min_workers < settings.max_workers
                and self._idle_timer is None
            )
        ):
            self._post(self._after_direct, worker)
        return True

    def _after_direct(self, worker: PoolWorker) -> None:
        """Loop side of a direct task's end: retire, refill, shut down, or shrink."""
        with self._idle_lock:
            # Under the lock: another thread may take an idle worker at any moment.
            free = (
                worker.state == WorkerState.READY
                and worker.direct is None
                and not worker.inflight
                and worker not in self._idle
            )
        if free:
            self._release_worker(worker)
        if self._queue:
            self._pump()
        if self._closing:
            self._maybe_finish_shutdown()
        else:
            self._schedule_idle_check()

    def _adopt_direct(self, worker: PoolWorker, *, force: bool = False) -> None:
        """Make the loop own a direct task: it joins ``inflight`` (loop thread).

        A task whose caller is reading its reply stays the caller's unless *force*.
        """
        with self._idle_lock:
            task = worker.direct
            if task is None or (task.owner == Owner.CALLER and not force):
                return
            worker.direct = None
            task.owner = Owner.LOOP
            self._direct_live.discard(task)
        worker.inflight[task.id] = task
        self._wait_time.add(task.started - task.submitted)
