"""`PoolState`: everything a pool knows, in one place, and how a task is settled.

The pool's engine is built in layers, one module each, every layer a subclass of
the one below; each adds the methods of one mechanism and writes only its own part
of the state declared here. The `Pool` a user holds is not a layer: it holds the
engine, and nothing in the engine refers back to it (so a dropped Pool is collected)::

    pool.Pool            the public API: Executor and asyncio, on an engine   pool.py
    shutdown.PoolEngine  start, shutdown, terminate, interpreter exit   shutdown.py
    replies.Replies      frames from workers; a worker's end            replies.py
    recovery.DirectRecovery  the loop finishes what a direct read left  recovery.py
    direct.DirectLane    a caller's thread sends and reads itself       direct.py
    scheduler.Scheduler  queue, dispatch, prefetch, timeouts, cancel    scheduler.py
    workers.WorkerSet    spawn, retire, kill, respawn, idle shrink      workers.py
    binding.Binding      which loop runs the pool: the caller's or own  binding.py
    state.PoolState      the state below, settling futures              state.py

Calls go down. The few that must go up (a worker set that meets a broken
initializer, a direct read that comes across another task's reply) are the hooks
at the end of this class, each named with the layer that provides it.

All of it runs on the pool's loop, but for the direct lane (`direct.py`), whose
shared fields are guarded by ``_idle_lock``, and the queue count, by ``_count_lock``.
"""

from __future__ import annotations

import _thread
import asyncio
import collections
import concurrent.futures
import contextlib
import itertools
import os
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any

from allcores.observe.scoreboard import Scoreboard
from allcores.pool import _protocol as proto
from allcores.pool import _pull
from allcores.pool._serialize import Packed, SameAsArgument, unpack
from allcores.pool.backends.base import Backend, WorkerExit
from allcores.pool.errors import RemoteTraceback
from allcores.pool.futures import PoolFuture, future_done, lock_free, settle_aside
from allcores.pool.loop import LoopThread
from allcores.pool.settings import PoolSettings
from allcores.pool.stats import Histogram
from allcores.pool.task import PoolWorker, Task, TaskState

if TYPE_CHECKING:
    from allcores.pool.map import MapIterator

__all__ = ["PREFETCH_MAX_RUN_TIME", "PoolState"]

# Prefetch only while tasks are short: a round trip (~50 µs) matters beside a 1 ms
# task, not beside a longer one, where fairness matters more. A new pool assumes
# this long, so it prefetches nothing until short tasks have been seen.
PREFETCH_MAX_RUN_TIME = 0.001


class PoolState:
    def __init__(
        self,
        settings: PoolSettings,
        backend: Backend,
        scoreboard: Scoreboard,
        owns_scoreboard: bool,
        rows: list[int],
    ) -> None:
        self._settings = settings
        self._backend = backend
        self._scoreboard = scoreboard
        self._owns_scoreboard = owns_scoreboard

        # ── binding (binding.py) ──
        self._loop: asyncio.AbstractEventLoop | None = None
        self._bound = False  # `_bind` has run to its end
        self._loop_thread_id: int | None = None
        self._private_thread: LoopThread | None = None
        # See loop.EARLY_GATE: held while the first round trip runs, released to open.
        # A bare lock, not an Event: a Ctrl-C in Event.set can leave the Event's own
        # lock taken, and its waiter (the loop's thread) blocked for good.
        self._gate: _thread.LockType | None = None
        self._bind_lock = threading.RLock()
        # The loop a pool made outside any event loop will run (see Pool.__init__).
        self._spare_loop: asyncio.AbstractEventLoop | None = None

        # ── workers (workers.py) ──
        self._worker_ids = itertools.count(1)
        self._free_rows = rows[::-1]
        self._workers: dict[int, PoolWorker] = {}
        self._idle: list[PoolWorker] = []
        # Guards `_idle`, `PoolWorker.direct`, `Task.owner` and `_direct_live`: threads
        # that submit take idle workers themselves (`_send_direct`). An idle worker's
        # socket is never read by the loop (it pauses reading), so such a thread may.
        self._idle_lock = threading.Lock()
        self._idle_timer: asyncio.TimerHandle | None = None
        self._ever_ready = False
        self._failed_starts = 0
        # Large bytes arguments by address (`_pull`): on once a worker could read
        # this probe from here (in any pool of this process: then the workers of
        # later pools are spared the probe, ~0.1 ms of their start), off for good
        # in this pool once one could not.
        # Not with an initializer: the probe runs after it, which may take the right
        # away (setuid, a seccomp filter).
        self._pull_never = not (_pull.AVAILABLE and _pull.kernel_allows())
        self._pull_ok = _pull.verified and not self._pull_never and settings.initializer is None
        self._pull_probe = os.urandom(64)

        # ── queue (scheduler.py) ──
        self._task_ids = itertools.count(1)
        self._queue: collections.deque[Task] = collections.deque()
        self._queued = 0  # live tasks in _queue, counted under _count_lock
        self._count_lock = threading.Lock()
        self._to_flush: list[PoolWorker] = []
        # True while `_enqueue_from_thread` runs: it flushes itself, at once.
        self._flush_inline = False
        # Open maps, which send the rest of their inputs when the pool shuts down.
        self._maps: weakref.WeakSet[MapIterator[Any]] = weakref.WeakSet()
        self._room_waiters: list[concurrent.futures.Future[None]] = []
        self._drain_waiters: list[concurrent.futures.Future[None]] = []
        # Mean run time of recent tasks: it sets prefetch depth and spinning.
        self._run_ema = PREFETCH_MAX_RUN_TIME

        # ── direct lane (direct.py) ──
        self._direct_live: set[Task] = set()
        # (count to add to or None, run seconds, wait seconds) of direct tasks, recorded
        # by the threads that read their replies, folded in by the loop.
        self._direct_stats: collections.deque[tuple[str | None, float, float]] = collections.deque()
        self._last_direct = 0.0
        self._sweeping = False
        self._sweep_handle: asyncio.TimerHandle | None = None
        self._swept_at = 0.0
        self._claims = False  # a thread may hold a worker's socket (`_check_claims`)
        self._claims_checked = 0.0
        self._adrift: set[PoolWorker] = set()
        self._orphans: set[Task] = set()  # seen at the last check (`_check_claims`)
        self._claims_seen: set[int] = set()
        self._direct_sent = 0  # tasks that went by `_send_direct` (for tests and tuning)

        # ── lifetime (replies.py, shutdown.py) ──
        self._ready_waiters: list[concurrent.futures.Future[None]] = []
        self._closed_waiters: list[concurrent.futures.Future[None]] = []
        self._closing = False
        self._closed = threading.Event()
        self._broken: BaseException | None = None

        # ── stats (Pool.stats) ──
        self._run_time = Histogram()
        self._wait_time = Histogram()
        self._busy_seconds = 0.0
        self._dead_worker_seconds = 0.0
        self._counts = collections.Counter[str]()
        self._created = time.monotonic()

    def _on_loop_thread(self) -> bool:
        return self._loop_thread_id == threading.get_ident()

    @staticmethod
    def _wake(waiters: list[concurrent.futures.Future[None]], exc: BaseException | None) -> None:
        for waiter in waiters:
            if not waiter.done():
                if exc is None:
                    waiter.set_result(None)
                else:
                    waiter.set_exception(exc)
        waiters.clear()

    # ── settling a task's future (any thread) ──────────────────────────────────

    def _settle_reply(
        self, task: Task, kind: int, seconds: float, payload: bytes | bytearray, fds: list[int]
    ) -> str | None:
        """Unpickle a worker's reply and settle its task (any thread).

        Returns the count it adds to: "completed", "failed", or None when the reply
        would not unpickle (the task fails with that error).
        """
        try:
            value = unpack(payload, fds)
        except BaseException as unpickling_error:
            if not isinstance(unpickling_error, Exception) and not self._on_loop_thread():
                raise  # Ctrl-C in a thread that reads its own reply: not the task's
            unpickling_error.add_note(f"(while the pool unpickled the result of {task.describe()})")
            self._settle_error(task, unpickling_error)
            return None
        if kind == proto.RESULT:
            if type(value) is SameAsArgument:
                value = task.args[0][value.index]
            self._settle(task, value)
            return "completed"
        if kind == proto.ERROR:
            remote, tb = value
            remote.__cause__ = RemoteTraceback(tb)
            self._settle_error(task, remote)
            return "failed"
        results, error = value  # CHUNK_RESULT
        if error is not None:
            error[0].__cause__ = RemoteTraceback(error[1])
            error = error[0]
        self._settle(task, (results, error, seconds))
        return "completed" if error is None else "failed"

    def _settle(self, task: Task, value: Any) -> None:
        task.state = TaskState.DONE
        task.release()
        future = task.future
        if type(future) is PoolFuture:
            future._task = future._pool = None
        if future is not None:
            if not lock_free(future) and self._on_loop_thread():
                settle_aside(future, value, None)
            else:
                try:  # noqa: SIM105 - per task; contextlib.suppress builds an object
                    future.set_result(value)
                except (concurrent.futures.InvalidStateError, asyncio.InvalidStateError):
                    pass  # Cancelled (or timed out) meanwhile.
        self._release_packed(task.packed)

    def _release_packed(self, packed: Packed) -> None:
        """Close a settled task's message. Freeing a large argument's shared memory
        takes ~10 ms per 100 MiB, which a caller that reads its own reply (a direct
        task) should not wait for: the loop does it then."""
        if packed.segment is None or self._on_loop_thread():
            packed.close()
            return
        loop = self._loop
        try:
            if loop is None:
                raise RuntimeError("no loop")
            loop.call_soon_threadsafe(packed.close)
        except RuntimeError:  # the loop is closed: close it here
            packed.close()

    def _settle_error(self, task: Task, exc: BaseException) -> None:
        if task.timer is not None:
            task.timer.cancel()
            task.timer = None
        task.state = TaskState.DONE
        task.release()
        task.packed.close()
        future = task.future
        if type(future) is PoolFuture:
            future._task = future._pool = None
        if future is None or future_done(future):
            return
        if not lock_free(future) and self._on_loop_thread():
            settle_aside(future, None, exc)
            return
        with contextlib.suppress(concurrent.futures.InvalidStateError, asyncio.InvalidStateError):
            future.set_exception(exc)

    # ── hooks: provided by the layers above ────────────────────────────────────

    def _on_message(self, worker: PoolWorker, payload: bytes | bytearray, fds: list[int]) -> None:
        """A frame from *worker* (replies.py)."""
        raise NotImplementedError

    def _on_worker_exit(self, worker: PoolWorker, exit_: WorkerExit) -> None:
        """*worker* ended (replies.py)."""
        raise NotImplementedError

    def _break(self, error: BaseException) -> None:
        """The pool cannot work: fail everything (replies.py)."""
        raise NotImplementedError

    def _after_reply(self, worker: PoolWorker) -> None:
        """A task of *worker* ended through the loop (replies.py)."""
        raise NotImplementedError

    def _adopt_direct(self, worker: PoolWorker, *, force: bool = False) -> None:
        """Make the loop own *worker*'s direct task (direct.py)."""
        raise NotImplementedError

    def _send_early(self, task: Task, worker: PoolWorker) -> bool:
        """Send the pool's first task to a starting worker (direct.py)."""
        raise NotImplementedError

    def _direct_interrupted(
        self,
        worker: PoolWorker,
        task: Task,
        frame: tuple[bytes | bytearray, list[int]] | None,
    ) -> None:
        """Finish a direct task whose reading thread was cut (recovery.py)."""
        raise NotImplementedError

    def _direct_takeover(self, task: Task) -> None:
        """The loop reads a direct task's reply from now on (recovery.py)."""
        raise NotImplementedError

    def _kick_sweep(self) -> None:
        """Start the sweep for direct tasks nobody reads (recovery.py)."""
        raise NotImplementedError

    def _maybe_finish_shutdown(self) -> None:
        """End the pool once shutting down and nothing is left (shutdown.py)."""
        raise NotImplementedError

    def _terminate(self, error: BaseException | None = None) -> None:
        """Kill every worker without the loop (shutdown.py)."""
        raise NotImplementedError
