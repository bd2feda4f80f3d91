"""The direct lane's safety net: the loop finishes what a caller's thread left.

A direct task (`direct.py`) is sent and read by the caller's thread. When that
thread does not read it (nobody calls ``result()``), or a Ctrl-C cuts it, the loop
takes over here::

    sweep (loop, every DIRECT_GRACE while direct tasks come) ─► _sweep_direct
        a task nobody reads for DIRECT_GRACE ──► _direct_interrupted(task, None)
        every CLAIM_CHECK ──► _check_claims: a claim whose thread left (its frame is
                              on no stack), an orphan, a worker neither idle nor busy
    a cut `_wait_direct` (posted from its finally) ──► _direct_interrupted(task, frame)
        frame in hand: settle from it
        else, stream in doubt or submit cut: ReplyLostError, and the worker is replaced
        else: the loop reads the worker; the reply settles the task
    add_done_callback on a direct future ──► _direct_takeover: the loop reads it now

The rule it keeps: a Ctrl-C never hangs the pool and never loses a result
silently; it may cost a worker restart.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from allcores.pool._serialize import read_head
from allcores.pool.direct import DirectLane, _is_reply
from allcores.pool.errors import ReplyLostError
from allcores.pool.futures import future_done
from allcores.pool.task import Owner, PoolWorker, Task, TaskState, WorkerState

__all__ = ["DIRECT_GRACE", "DirectRecovery"]

# A direct task whose caller does not wait on it by `result()` (a done callback,
# `as_completed`, or nobody) is taken over by the loop after this long.
DIRECT_GRACE = 0.002
# The loop looks for such tasks every DIRECT_GRACE while direct submits keep
# coming, and stops looking this long after the last one.
DIRECT_LINGER = 0.1

# While a thread holds a worker's socket to read its reply, the loop checks this
# often that the thread is still in `Pool._wait_direct`: an exception raised in it
# asynchronously (Ctrl-C) at the wrong bytecode can skip its release, and the
# worker would be read by nobody (`Pool._check_claims`).
CLAIM_CHECK = 0.05


def _running_frames() -> set[Any]:
    """Every frame on some thread's stack now (`Pool._check_claims`)."""
    running: set[Any] = set()
    for top in sys._current_frames().values():
        frame: Any = top
        while frame is not None:
            running.add(frame)
            frame = frame.f_back
    return running


class DirectRecovery(DirectLane):
    def _direct_interrupted(
        self,
        worker: PoolWorker,
        task: Task,
        frame: tuple[bytes | bytearray, list[int]] | None,
    ) -> None:
        """The thread reading a direct task's reply was interrupted: finish it here.

        With the reply in hand (*frame*), the task is settled from it. Without it, the
        reply is still in the worker's socket, unless the cut thread took it and lost
        it. The channel tells when that may be (`stream_in_doubt`: a frame was taken,
        or bytes were cut midway), and so does a submit cut before its frame surely
        went (``task.sender``). Then nothing says whether the reply will ever come:
        the task fails with ReplyLostError and the worker is replaced. Otherwise the
        loop reads the worker from now on, and the reply settles the task. A Ctrl-C
        may cost a worker; it never leaves a task waiting for ever.
        """
        if frame is not None:
            kind, _nbuf, _nuser, task_id, _seconds = read_head(frame[0])
            if not _is_reply(task, kind, task_id):
                # A frame read ahead of the reply (a READY, a late result), cut while
                # being passed on. The loop may have it already; both are harmless
                # twice (a READY counts once, a result nobody waits for is dropped).
                self._on_message(worker, frame[0], frame[1])
                frame = None
        with self._idle_lock:
            attached = worker.direct is task
            if attached:
                worker.direct = None
                task.owner = Owner.LOOP
            self._direct_live.discard(task)  # even detached: a cut may have kept it
        handle = worker.handle
        if frame is not None:
            if worker.inflight.get(task.id) is task:
                # `_check_claims` saw the task first and gave it to the loop.
                del worker.inflight[task.id]
                attached = True
            future = task.future
            if future is not None and not future_done(future):
                payload, fds = frame
                if fds:
                    # The cut unpickling may have taken (and closed) some of these
                    # fds: using them again could touch another file. Left open.
                    self._fail_lost(worker, task)
                else:
                    kind, _nbuf, _nuser, _task_id, seconds = read_head(payload)
                    outcome = self._settle_reply(task, kind, seconds, payload, fds)
                    if outcome is not None:
                        self._counts[outcome] += 1
        elif attached and task.state != TaskState.DONE:
            if handle is None or task.sender is not None or handle.stream_in_doubt():
                self._fail_lost(worker, task)
                self._kill(worker)
                return
            worker.inflight[task.id] = task
            self._wait_time.add(task.started - task.submitted)
            handle.resume_reading()
            return
        # Always: a cut in `_finish_direct` may have left the worker neither idle nor
        # busy, even when the task was no longer attached (`_after_direct` checks).
        self._after_direct(worker)

    def _fail_lost(self, worker: PoolWorker, task: Task) -> None:
        """Fail *task*, whose reply from *worker* a cut read lost (or may have)."""
        self._counts["failed"] += 1
        self._settle_error(task, ReplyLostError(task.describe(), worker.id))

    def _check_claims(self) -> None:
        """Give back claims whose thread left `_wait_direct` without releasing them.

        An exception raised asynchronously (Ctrl-C) can land in the reading thread's
        cleanup itself; nothing else would ever read that worker again. A claim is
        named by the claiming call's frame: once that frame is off every thread's
        stack, the claim is stale and its task is recovered as if interrupted.
        Also recovers a task left marked as being read by a thread that released
        the worker (an interrupt between the two).
        """
        claims: list[tuple[PoolWorker, object]] = []
        orphans: list[tuple[PoolWorker, Task]] = []
        adrift: set[PoolWorker] = set()
        with self._idle_lock:
            for worker in self._workers.values():
                handle = worker.handle
                token = None if handle is None else handle.claimed_by()
                task = worker.direct
                if token is not None:
                    claims.append((worker, token))
                elif task is not None and task.owner == Owner.CALLER:
                    orphans.append((worker, task))
                elif (
                    worker.state == WorkerState.READY
                    and task is None
                    and not worker.inflight
                    and worker not in self._idle
                ):
                    # Neither idle nor busy: a safety net for a Ctrl-C that cuts a
                    # step taking or giving back a worker. Such a state lasts µs when
                    # nothing is cut, so only one seen at two checks in a row is put back.
                    adrift.add(worker)
            self._claims = bool(claims)
        lost, self._adrift = adrift & self._adrift, adrift
        for worker in lost:
            self._after_direct(worker)
        # Likewise an orphan: a thread cut after it gave the socket back has posted
        # its own recovery (with the reply, if it held it), which runs before the
        # next check; only an orphan seen twice is recovered here.
        known, self._orphans = self._orphans, {task for _worker, task in orphans}
        for worker, task in orphans:
            if task in known:
                with self._idle_lock:
                    if worker.direct is not task or task.owner != Owner.CALLER:
                        continue
                    task.owner = Owner.LOOP
                self._direct_interrupted(worker, task, None)
        # Only a claim seen at the last check too is looked at: most last µs, and
        # walking every thread's stack is not free. By id, so that no frame is kept
        # alive here (an id reused meanwhile only costs one needless look).
        seen, self._claims_seen = self._claims_seen, {id(token) for _worker, token in claims}
        claims = [(worker, token) for worker, token in claims if id(token) in seen]
        if not claims:
            return
        running = _running_frames()
        for worker, token in claims:
            if token in running:
                continue
            handle = worker.handle
            assert handle is not None
            if not handle.release_reading(resume=False, token=token):
                continue  # released meanwhile
            with self._idle_lock:
                task = worker.direct
                ours = task is not None and task.owner == Owner.CALLER
                if ours:
                    assert task is not None
                    task.owner = Owner.LOOP
            if ours:
                assert task is not None
                self._direct_interrupted(worker, task, None)
            else:
                self._after_direct(worker)

    def _direct_takeover(self, task: Task) -> None:
        """The loop reads a direct task's reply (nobody waits on it with result())."""
        with self._idle_lock:
            worker = task.worker
            if worker is None or worker.direct is not task or task.owner == Owner.CALLER:
                return
            task.owner = Owner.LOOP
        if worker.handle is not None:
            worker.handle.resume_reading()

    def _kick_sweep(self) -> None:
        """Start the sweep unless it runs (loop thread; asked for from any thread)."""
        if self._sweep_handle is None and not self._closed.is_set():
            self._sweep_direct()

    def _sweep_direct(self) -> None:
        """Take over direct tasks nobody reads, every DIRECT_GRACE while direct tasks
        come; check claims (`_check_claims`) every CLAIM_CHECK while any is held."""
        self._sweep_handle = None
        now = self._swept_at = time.monotonic()
        if now - self._claims_checked >= CLAIM_CHECK:
            self._claims_checked = now
            self._check_claims()
        running: set[Any] | None = None
        with self._idle_lock:
            stale: list[Task] = []
            unread = False  # a task nobody reads yet: look again soon
            for task in self._direct_live:
                if task.owner == Owner.NONE:
                    unread = True
                    if now - task.started < DIRECT_GRACE:
                        continue
                    if task.sender is not None:
                        # Its submit has not sent it yet: still at it (a thread can
                        # stall), or cut by Ctrl-C. Only then is it the loop's.
                        if running is None:
                            running = _running_frames()
                        if task.sender in running:
                            continue
                    task.owner = Owner.LOOP
                    stale.append(task)
            busy = unread or now - self._last_direct < DIRECT_LINGER
            go_on = not self._closed.is_set() and (
                busy or self._claims or bool(self._adrift) or bool(self._orphans)
            )
            if not go_on:
                self._sweeping = False
        for task in stale:
            # As if its reader had been cut: the loop reads the reply; a task whose
            # submit was cut before its frame surely went fails, and its worker goes.
            worker = task.worker
            if worker is not None:
                self._direct_interrupted(worker, task, None)
        self._fold_direct_stats()
        if go_on:
            assert self._loop is not None
            self._sweep_handle = self._loop.call_later(
                DIRECT_GRACE if busy else CLAIM_CHECK, self._sweep_direct
            )

    def _fold_direct_stats(self) -> None:
        """Counts and histograms of direct tasks, recorded by waiting threads (loop)."""
        pending = self._direct_stats
        while pending:
            outcome, seconds, wait = pending.popleft()
            self._run_time.add(seconds)
            self._wait_time.add(wait)
            self._busy_seconds += seconds
            if outcome is not None:
                self._counts[outcome] += 1
