"""`Pool`: a crash-proof, asyncio-first `concurrent.futures.Executor`.

How a task flows (one event loop owns all of the pool's state)::

    caller (any thread)                   the pool's loop (bound or private thread)       worker
    ───────────────────                   ─────────────────────────────────────────       ──────
    submit / run / map
      pickle fn (cached) + args ──┐
      (large buffers -> memfd)    │  same thread: direct call
      queue-full check (lock)     ├────────────────────────────► _enqueue ─► _queue (deque)
                                  │  other thread: call_soon_threadsafe        │ _pump
                                  ┘                                            ▼
                                          idle worker, or prefetch (≤ PREFETCH ahead) ──► frame
                                          timeout timer when the task starts running
                                          _on_message ◄── result frame (loop reads socket) ◄─┘
      future resolved ◄───────────────── (cf.Future from any thread, asyncio.Future here)
                                          _on_worker_exit ◄── sentinel: crash/kill/stop
                                             running task fails (WorkerCrashedError),
                                             prefetched ones go back to the queue front,
                                             a replacement starts

Binding: the first use inside a running loop (``await pool.run``, ``async with``,
``loop.run_in_executor``) binds the pool to that loop, which then reads the workers'
channels itself. The first use from plain sync code starts a private loop in a
daemon thread instead. `min_workers` are started in ``__init__``, before any such
thread exists, so they fork. Nothing here blocks the bound loop: ``shutdown(wait=True)``
called on it only starts the shutdown (``await pool.aclose()`` waits).

What is process-specific (start method, kill, exit codes, nice) lives in
`allcores.pool.backends.process`; this module only sees the `Backend` interface.
"""

from __future__ import annotations

import _thread
import asyncio
import atexit
import collections
import concurrent.futures
import contextlib
import dataclasses
import itertools
import multiprocessing.context
import operator
import os
import reprlib
import sys
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable, Generator, Iterable, Iterator
from typing import Any, Literal, TypeVar

from allcores._system import available_cpus, new_event_loop
from allcores.errors import ChannelError
from allcores.ipc.channel import MAX_FDS
from allcores.observe.scoreboard import RowState, Scoreboard
from allcores.pool import _protocol as proto
from allcores.pool import _pull
from allcores.pool._serialize import (
    Packed,
    SameAsArgument,
    dump_function,
    pack,
    pack_batch,
    pack_call,
    read_head,
    unpack,
)
from allcores.pool.backends.base import Backend, BackendWorker, WorkerExit
from allcores.pool.backends.process import ProcessBackend
from allcores.pool.errors import (
    InitializerError,
    PoolClosedError,
    QueueFullError,
    RemoteTraceback,
    ReplyLostError,
    TaskTimeoutError,
    WorkerCrashedError,
)
from allcores.pool.stats import Histogram, PoolStats

__all__ = ["MapIterator", "Pool", "PoolSettings", "usable_cpus"]

R = TypeVar("R")

# "auto" max_queue: room for a submit-everything-then-wait loop written for
# ProcessPoolExecutor (whose queue is unbounded) of 100k tasks, while a runaway
# producer still meets a clear QueueFullError before it holds gigabytes.
AUTO_MAX_QUEUE = 100_000
# Tasks sent to a busy worker ahead of time. More keeps workers busier between
# round trips (the 64-in-flight rate needs ~2), but a task stuck behind a slow one
# waits longer while another worker may be idle, and a crash re-queues more tasks.
PREFETCH = 2
# Tasks under TINY_TASK_TIME get a deeper prefetch, sent to a worker in one frame:
# 16 x 50 µs is under 1 ms of work waiting behind a worker, and it turns 16 sends
# and wake-ups into one (the 64-in-flight rate depends on it).
PREFETCH_TINY = 16
TINY_TASK_TIME = 50e-6
# Prefetch only while tasks are short: a round trip (~50 µs) matters beside a 1 ms
# task, not beside a longer one, where fairness matters more.
PREFETCH_MAX_RUN_TIME = 0.001
# Workers run at niceness +5 relative to the parent: CFS then weighs the parent 3x
# a worker (1024 vs 335), so a request-serving loop wins a contended core, while on
# an idle machine the workers still get every cycle.
DEFAULT_NICE = 5
# A worker above min_workers idle for this long exits; a minute absorbs bursty load
# without paying a fork (or a ~60 ms forkserver start) on every burst.
DEFAULT_IDLE_TIMEOUT = 60.0
# Auto-chunking aims at chunks that run this long: per-chunk overhead (~50 µs round
# trip, pickling) stays ~1 %, and the last chunks end within ~5 ms of each other.
TARGET_CHUNK_SECONDS = 0.005
# Auto chunks never exceed this many items, which bounds the memory an endless
# input holds in flight (MAP_INFLIGHT_PER_WORKER x workers x this).
MAX_CHUNKSIZE = 16_384
# A chunk grows at most this much per measurement, so one noisy (fast) first chunk
# cannot make the next one huge.
CHUNK_GROWTH = 8
# Map chunks in flight per worker: one running, two waiting, as with PREFETCH.
MAP_INFLIGHT_PER_WORKER = 3
# A thread that submits to an idle worker sends the task itself and, when it then
# waits on the future, reads the reply itself (`Pool._send_direct`): two thread
# wake-ups per round trip instead of four. Frames up to this size qualify: an idle
# worker has read everything sent to it, so its socket buffer takes them whole.
DIRECT_MAX_PAYLOAD = 32 * 1024
# A thread waiting on a direct task polls for its reply this long before it sleeps,
# when the pool's tasks typically run under SPIN_TASK_TIME (`Pool._spin_for_reply`).
SPIN_SECONDS = 50e-6
SPIN_TASK_TIME = 50e-6
# While a pool's first task makes its round trip without the loop (`Pool._send_early`),
# the loop's new thread waits for it to end, at most this long, instead of taking a
# core and the GIL from it: ~0.3 ms of a ~6 ms start. Anything else that needs the
# loop meanwhile (another submit, shutdown) lets it go at once (`Pool._ensure_loop`).
EARLY_GATE = 0.005
# A direct task whose caller does not wait on it by `result()` (a done callback,
# `as_completed`, or nobody) is taken over by the loop after this long.
DIRECT_GRACE = 0.002
# The loop looks for such tasks every DIRECT_GRACE while direct submits keep
# coming, and stops looking this long after the last one.
DIRECT_LINGER = 0.1
# A submit asks for the sweep again when it has not run for this long: a Ctrl-C can
# cut the request that started it.
SWEEP_STALE = 0.5
# While a thread holds a worker's socket to read its reply, the loop checks this
# often that the thread is still in `Pool._wait_direct`: an exception raised in it
# asynchronously (Ctrl-C) at the wrong bytecode can skip its release, and the
# worker would be read by nobody (`Pool._check_claims`).
CLAIM_CHECK = 0.05
# Workers that die before their first READY in a row before the pool gives up: a
# missing module or a failing initializer would otherwise respawn forever.
MAX_FAILED_STARTS = 3

_QUEUED, _SENT, _DONE, _CANCELLED = range(4)
# Who reads the reply of a task sent directly: nobody yet, the waiting caller, the loop.
_OWNER_NONE, _OWNER_CALLER, _OWNER_LOOP = range(3)
_STARTING, _READY, _RETIRING, _KILLED = range(4)


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask), not the machine's count."""
    return available_cpus()


@dataclasses.dataclass(frozen=True)
class PoolSettings:
    """Every option of a pool, validated when built (`Pool` takes them as keywords)."""

    max_workers: int
    min_workers: int
    idle_timeout: float | None
    max_queue: int | None
    max_tasks_per_child: int | None
    initializer: Callable[..., object] | None
    initargs: tuple[Any, ...]
    task_timeout: float | None
    nice: int
    start_method: str | None

    @classmethod
    def build(
        cls,
        max_workers: int | None = None,
        *,
        min_workers: int | None = None,
        idle_timeout: float | None = DEFAULT_IDLE_TIMEOUT,
        max_queue: int | Literal["auto"] | None = "auto",
        max_tasks_per_child: int | None = None,
        initializer: Callable[..., object] | None = None,
        initargs: tuple[Any, ...] = (),
        task_timeout: float | None = None,
        nice: int | None = DEFAULT_NICE,
        start_method: str | None = None,
    ) -> PoolSettings:
        if max_workers is None:
            max_workers = usable_cpus()
        if max_workers < 1:
            # concurrent.futures' own words: code and tests match on them.
            raise ValueError("max_workers must be greater than 0")
        if min_workers is None:
            # All workers start ahead: a pool exists to be used, and workers started
            # later from a threaded parent cost a forkserver start (~60 ms) each.
            min_workers = max_workers
        if not 0 <= min_workers <= max_workers:
            raise ValueError(f"min_workers must be in 0..max_workers, got {min_workers}")
        if idle_timeout is not None and idle_timeout <= 0:
            raise ValueError(f"idle_timeout must be positive or None, got {idle_timeout}")
        if max_queue == "auto":
            max_queue = AUTO_MAX_QUEUE
        if max_queue is not None and (not isinstance(max_queue, int) or max_queue < 1):
            raise ValueError(f"max_queue must be 'auto', a positive int or None, got {max_queue!r}")
        if max_tasks_per_child is not None and max_tasks_per_child < 1:
            raise ValueError(f"max_tasks_per_child must be >= 1, got {max_tasks_per_child}")
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        if task_timeout is not None and task_timeout <= 0:
            raise ValueError(f"task_timeout must be positive or None, got {task_timeout}")
        return cls(
            max_workers=max_workers,
            min_workers=min_workers,
            idle_timeout=idle_timeout,
            max_queue=max_queue,
            max_tasks_per_child=max_tasks_per_child,
            initializer=initializer,
            initargs=tuple(initargs),
            task_timeout=task_timeout,
            nice=nice or 0,
            start_method=start_method,
        )


def _released(*_args: Any, **_kwargs: Any) -> None:
    """What a settled task's ``fn`` becomes (`_Task.release`)."""


class _Task:
    __slots__ = (
        "args",
        "bridged",
        "chunk_len",
        "enqueued",
        "fn",
        "future",
        "id",
        "owner",
        "packed",
        "reserved",
        "running_set",
        "sender",
        "started",
        "state",
        "submitted",
        "timeout",
        "timer",
        "worker",
    )

    def __init__(
        self,
        task_id: int,
        fn: Callable[..., Any],
        args: Any,
        packed: Packed,
        timeout: float | None,
        chunk_len: int,
    ) -> None:
        self.id = task_id
        self.fn = fn
        self.args = args
        self.packed = packed
        self.timeout = timeout
        self.chunk_len = chunk_len
        self.future: concurrent.futures.Future[Any] | asyncio.Future[Any] | None = None
        self.bridged = False
        self.running_set = False
        self.state = _QUEUED
        self.submitted = time.monotonic()
        self.started = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.worker: _Worker | None = None
        self.owner = _OWNER_LOOP
        # Holds one count of Pool._queued (its queue slot), given back exactly once
        # (`Pool._spend`); set and cleared with the count, under _count_lock.
        self.reserved = False
        self.enqueued = False  # the loop has seen it (`Pool._enqueue`)
        # The frame of the `_send_direct` call sending it, until its frame went.
        self.sender: Any = None

    def release(self) -> None:
        """Drop the callable and its arguments once the task has settled: a caller
        that dropped the future expects them freed now, not when the pool next
        looks at this task (CPython's test_no_stale_references)."""
        self.fn = _released
        self.args = ((), {})

    def describe(self) -> str:
        if self.fn is _released:
            return f"task {self.id}"
        name = getattr(self.fn, "__qualname__", None) or repr(self.fn)
        if self.chunk_len >= 0:
            return f"task {self.id} (map chunk of {self.chunk_len} items of {name})"
        args, kwargs = self.args
        parts = [reprlib.repr(a) for a in args] + [
            f"{k}={reprlib.repr(v)}" for k, v in kwargs.items()
        ]
        text = ", ".join(parts)
        if len(text) > 120:
            text = text[:117] + "..."
        return f"task {self.id} ({name}({text}))"


class _Worker:
    __slots__ = (
        "attached",
        "direct",
        "handle",
        "id",
        "idle_since",
        "inflight",
        "outbox",
        "passed",
        "row",
        "sent",
        "started_at",
        "state",
        "suspects",
    )

    def __init__(self, worker_id: int, row: int) -> None:
        self.id = worker_id
        self.row = row
        self.handle: BackendWorker | None = None
        self.attached = False  # the loop has its channel (`Pool._attach`)
        # A task another thread sent to this worker (`Pool._send_direct`), until the
        # caller reads its reply or the loop adopts it into `inflight`.
        self.direct: _Task | None = None
        self.state = _STARTING
        self.inflight: dict[int, _Task] = {}
        self.outbox: list[Packed] = []
        self.sent = 0
        self.started_at = time.monotonic()
        self.idle_since = 0.0
        # Tasks whose reply a cut read may have lost, by the SYNC token that settles
        # their fate (`Pool._direct_interrupted`).
        self.suspects: dict[int, _Task] = {}
        # The last frame a reading thread passed on to the loop (`Pool._pass_on`): by
        # identity, it tells whether a cut thread's frame reached the loop already.
        self.passed: bytes | bytearray | None = None


def _in_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


_DONE_STATES = frozenset(("CANCELLED", "CANCELLED_AND_NOTIFIED", "FINISHED"))


def _future_done(future: concurrent.futures.Future[Any] | asyncio.Future[Any]) -> bool:
    """``future.done()`` without taking the future's lock.

    A Ctrl-C that lands in ``Condition.__exit__`` inside ``set_result`` (CPython's own
    code, run by a thread that settles its direct task) leaves that future's lock held
    by the interrupted thread; ``done()`` would then block the loop forever. Both
    future classes keep their state in ``_state``, with these names, since 3.2.
    """
    state = getattr(future, "_state", None)
    return future.done() if state is None else state in _DONE_STATES


def _is_reply(task: _Task, kind: int, task_id: int) -> bool:
    """Whether a frame of *kind* for *task_id* is a direct *task*'s reply."""
    return task_id == task.id and (kind == proto.RESULT or kind == proto.ERROR)


def _lock_free(future: concurrent.futures.Future[Any] | asyncio.Future[Any]) -> bool:
    """False when another thread holds *future*'s lock right now.

    A Ctrl-C can land in CPython's ``Condition.__enter__`` just after it took the
    lock (in ``result()`` or ``set_result``), and then the interrupted thread keeps
    it until it waits on that future again. The loop must not block on it.
    """
    condition = getattr(future, "_condition", None)  # concurrent futures only
    if condition is None or condition.acquire(False):
        if condition is not None:
            condition.release()
        return True
    return False


def _settle_aside(
    future: concurrent.futures.Future[Any] | asyncio.Future[Any],
    value: Any,
    exc: BaseException | None,
) -> None:
    """Settle *future* from a short-lived thread, which may wait for its lock: held
    by the thread using it (briefly), or by a thread a Ctrl-C cut while it held it
    (until that thread waits on the future again, which releases it)."""

    def settle() -> None:
        with contextlib.suppress(concurrent.futures.InvalidStateError, asyncio.InvalidStateError):
            if exc is None:
                future.set_result(value)
            else:
                future.set_exception(exc)

    threading.Thread(target=settle, name="allcores-settle", daemon=True).start()


def _running_frames() -> set[Any]:
    """Every frame on some thread's stack now (`Pool._check_claims`)."""
    running: set[Any] = set()
    for top in sys._current_frames().values():
        frame: Any = top
        while frame is not None:
            running.add(frame)
            frame = frame.f_back
    return running


def _forget_dummy() -> None:
    """Drop the _DummyThread that ``threading`` made for this thread, if any.

    A ``threading.Thread`` created on the loop's thread (``run_in_executor``, to
    start a forkserver worker) calls ``current_thread()``, which registers a thread
    `threading` did not start as a _DummyThread; before 3.13 that entry stays in
    ``threading.enumerate()`` after the thread has ended. 3.13 drops it itself.
    """
    registry: Any = threading
    ident = threading.get_ident()
    # Without threading's _active_limbo_lock: a Ctrl-C may have left it taken (in
    # another thread's Thread.start), and the GIL keeps these dict calls whole.
    if isinstance(registry._active.get(ident), registry._DummyThread):
        registry._active.pop(ident, None)


class _LoopThread:
    """The thread that runs a pool's own event loop, started without waiting for it.

    `threading.Thread.start` returns only once the new thread has run; on the first
    submit, with freshly forked workers on every core, that wait is ~1 ms, and the
    first round trip needs no loop (`Pool._send_early`). `_thread` starts it and
    goes on; the loop runs what was queued for it once the thread is scheduled.
    """

    def __init__(
        self, loop: asyncio.AbstractEventLoop, pool: Pool, gate: _thread.LockType | None
    ) -> None:
        self._loop = loop
        self._pool = weakref.ref(pool)
        self._gate = gate
        self._started = False
        self._done = threading.Event()
        self._native_id: int | None = None

    def start(self) -> None:
        """Start the thread, once (`Pool._bind` may call again after a Ctrl-C)."""
        if self._started:
            return
        # Set first: a Ctrl-C cannot fall between it and the C call (a signal handler
        # runs only at calls and jumps), nor inside it.
        self._started = True
        try:
            _thread.start_new_thread(self._run, ())
        except Exception:  # it did not start; not a Ctrl-C after it did
            self._started = False
            raise

    def _run(self) -> None:
        try:
            if self._gate is not None:
                self._gate.acquire(timeout=EARLY_GATE)
                self._gate = None
            self._native_id = threading.get_native_id()
            pool = self._pool()
            if pool is not None:
                pool._loop_thread_id = threading.get_ident()
            del pool
            # No asyncio.set_event_loop: code the loop runs finds it as the running
            # loop, and the policy's set_event_loop may call threading.current_thread(),
            # which in a thread `threading` did not start makes a _DummyThread that is
            # never removed before 3.13 (see _forget_dummy).
            try:
                self._loop.run_forever()
            finally:
                self._loop.close()
        finally:
            _forget_dummy()
            self._done.set()

    def is_alive(self) -> bool:
        return self._started and not self._done.is_set()

    def join(self) -> None:
        """Wait until the thread has ended, and the OS has removed it too.

        The thread's last step comes a moment before the kernel thread is gone; a
        pool created right after would still count two threads and start its workers
        by forkserver (60 ms) instead of fork. That wait is bounded (50 ms) and
        usually a few µs.
        """
        if not self._started:
            return
        self._done.wait()
        path = f"/proc/self/task/{self._native_id}"
        deadline = time.monotonic() + 0.05
        while self._native_id is not None and os.path.exists(path) and time.monotonic() < deadline:
            time.sleep(0.0002)


_LIVE_POOLS: weakref.WeakSet[Pool] = weakref.WeakSet()


def _shutdown_pools_at_exit() -> None:
    for pool in list(_LIVE_POOLS):
        pool._at_exit()


# Registered after multiprocessing's own handler, so it runs first (atexit is LIFO)
# and multiprocessing never waits on a worker of ours.
atexit.register(_shutdown_pools_at_exit)


class Pool(concurrent.futures.Executor):
    """A pool of worker processes; a drop-in `ProcessPoolExecutor`, asyncio first.

    The first four parameters are ProcessPoolExecutor's. Beyond them: *min_workers*
    (started ahead; default all), *idle_timeout* (seconds before a worker above
    min_workers exits), *max_queue* (``"auto"``, an int, or None for unbounded),
    *task_timeout* (default per-task limit), *nice* (added to workers' niceness;
    0 keeps the parent's), *start_method* (force fork/forkserver/spawn),
    *scoreboard* and *scoreboard_rows* (write worker rows into a given scoreboard).
    """

    def __init__(
        self,
        max_workers: int | None = None,
        mp_context: multiprocessing.context.BaseContext | None = None,
        initializer: Callable[..., object] | None = None,
        initargs: tuple[Any, ...] = (),
        *,
        max_tasks_per_child: int | None = None,
        min_workers: int | None = None,
        idle_timeout: float | None = DEFAULT_IDLE_TIMEOUT,
        max_queue: int | Literal["auto"] | None = "auto",
        task_timeout: float | None = None,
        nice: int | None = DEFAULT_NICE,
        start_method: str | None = None,
        scoreboard: Scoreboard | None = None,
        scoreboard_rows: Iterable[int] | None = None,
    ) -> None:
        if mp_context is not None and start_method is None:
            start_method = mp_context.get_start_method()
        self._settings = settings = PoolSettings.build(
            max_workers,
            min_workers=min_workers,
            idle_timeout=idle_timeout,
            max_queue=max_queue,
            max_tasks_per_child=max_tasks_per_child,
            initializer=initializer,
            initargs=initargs,
            task_timeout=task_timeout,
            nice=nice,
            start_method=start_method,
        )
        self._backend: Backend = ProcessBackend(
            start_method=settings.start_method, nice=settings.nice
        )
        self._initializer_blob: bytes | None = None
        if settings.initializer is not None:
            import cloudpickle

            self._initializer_blob = cloudpickle.dumps(
                (settings.initializer, settings.initargs), protocol=5
            )
        if scoreboard is None:
            self._scoreboard = Scoreboard.create(settings.max_workers)
            self._owns_scoreboard = True
            rows = list(range(settings.max_workers))
        else:
            self._scoreboard = scoreboard
            self._owns_scoreboard = False
            rows = (
                list(scoreboard_rows)
                if scoreboard_rows is not None
                else list(range(min(settings.max_workers, scoreboard.rows)))
            )
            if len(rows) < settings.max_workers:
                raise ValueError(
                    f"the scoreboard gives {len(rows)} rows for {settings.max_workers} workers"
                )
        self._free_rows = rows[::-1]

        self._loop: asyncio.AbstractEventLoop | None = None
        self._bound = False  # `_bind` has run to its end
        self._loop_thread_id: int | None = None
        self._private_thread: _LoopThread | None = None
        # See EARLY_GATE: held while the first round trip runs, released to open. A
        # bare lock, not an Event: a Ctrl-C in Event.set can leave the Event's own
        # lock taken, and its waiter (the loop's thread) blocked for good.
        self._gate: _thread.LockType | None = None
        self._bind_lock = threading.RLock()
        self._count_lock = threading.Lock()
        self._task_ids = itertools.count(1)
        self._worker_ids = itertools.count(1)

        self._queue: collections.deque[_Task] = collections.deque()
        self._to_flush: list[_Worker] = []
        # True while `_enqueue_from_thread` runs: it flushes itself, at once.
        self._flush_inline = False
        self._queued = 0  # live tasks in _queue, counted under _count_lock
        self._workers: dict[int, _Worker] = {}
        self._idle: list[_Worker] = []
        # Guards `_idle`, `_Worker.direct`, `_Task.owner` and `_direct_live`: threads
        # that submit take idle workers themselves (`_send_direct`). An idle worker's
        # socket is never read by the loop (it pauses reading), so such a thread may.
        self._idle_lock = threading.Lock()
        self._direct_live: set[_Task] = set()
        # (count to add to or None, run seconds, wait seconds) of direct tasks, recorded
        # by the threads that read their replies, folded in by the loop.
        self._direct_stats: collections.deque[tuple[str | None, float, float]] = collections.deque()
        self._last_direct = 0.0
        self._sweeping = False
        self._sweep_handle: asyncio.TimerHandle | None = None
        self._swept_at = 0.0
        self._claims = False  # a thread may hold a worker's socket (`_check_claims`)
        self._claims_checked = 0.0
        self._adrift: set[_Worker] = set()
        self._claims_seen: set[int] = set()
        # Large bytes arguments by address (`_pull`): on once a worker could read
        # this probe from here (in any pool of this process: then the workers of
        # later pools are spared the probe, ~0.1 ms of their start), off for good
        # in this pool once one could not.
        # Not with an initializer: the probe runs after it, which may take the right
        # away (setuid, a seccomp filter).
        self._pull_never = not (_pull.AVAILABLE and _pull.kernel_allows())
        self._pull_ok = _pull.verified and not self._pull_never and initializer is None
        self._pull_probe = os.urandom(64)
        self._sync_tokens = itertools.count(1)
        self._direct_sent = 0  # tasks that went by `_send_direct` (for tests and tuning)
        self._room_waiters: list[concurrent.futures.Future[None]] = []
        self._drain_waiters: list[concurrent.futures.Future[None]] = []
        self._ready_waiters: list[concurrent.futures.Future[None]] = []
        self._closed_waiters: list[concurrent.futures.Future[None]] = []
        self._idle_timer: asyncio.TimerHandle | None = None
        self._closing = False
        self._closed = threading.Event()
        self._broken: BaseException | None = None
        self._ever_ready = False
        self._failed_starts = 0

        # No prefetch until short tasks have been seen.
        self._run_ema = PREFETCH_MAX_RUN_TIME
        self._run_time = Histogram()
        self._wait_time = Histogram()
        self._busy_seconds = 0.0
        self._dead_worker_seconds = 0.0
        self._counts = collections.Counter[str]()
        self._created = time.monotonic()

        # The loop a pool made outside any event loop will run: built now, before the
        # first fork, it costs a third of what it does after (~0.2 vs ~0.6 ms, as every
        # page the parent writes after a fork is copied), on the way to the first
        # result (`_bind`).
        self._spare_loop: asyncio.AbstractEventLoop | None = None
        if settings.min_workers and not self._backend.start_is_slow() and not _in_event_loop():
            self._spare_loop = new_event_loop()
        _LIVE_POOLS.add(self)
        for _ in range(settings.min_workers):
            self._spawn()

    # ── binding ────────────────────────────────────────────────────────────────

    def _ensure_loop(self) -> asyncio.AbstractEventLoop:
        if not self._bound:
            self._bind()
        loop = self._loop
        assert loop is not None
        if self._gate is not None:
            self._open_gate()
        if loop.is_closed():
            self._terminate(
                PoolClosedError(
                    "the event loop this pool was bound to is closed; create the pool in the "
                    "loop that uses it (async with Pool() ...), or shut it down before the "
                    "loop ends"
                )
            )
            raise self._broken or PoolClosedError("pool is closed")
        return loop

    def _bind(self, first: _Task | None = None) -> bool:
        """Bind the pool to the running event loop, else start its own in a thread.

        With its own loop, *first* (the first task submitted) is sent on the way to a
        worker still starting, right behind its SETUP, and the caller reads READY and
        the reply itself (`_wait_direct`): the first result then waits neither for the
        loop's thread to be scheduled (~1-2 ms while freshly forked workers hold both
        cores) nor for a READY round trip through it. True when *first* went so.

        A Ctrl-C may cut this anywhere: the next call (`_ensure_loop`, `shutdown`)
        finishes what it left, since every step can be taken again.
        """
        if self._bound:
            return False
        # Reentrant, and taken without `with`: a Ctrl-C right after the acquire (or,
        # with 3.13's tracing, inside a `with` block) may leave it held, by the thread
        # that then calls again to finish the binding (`_ensure_loop`).
        self._bind_lock.acquire()
        try:
            if self._bound:
                return False
            loop = self._loop
            if loop is None:
                try:
                    running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
                except RuntimeError:
                    running = None
                spare, self._spare_loop = self._spare_loop, None
                if running is not None:
                    if spare is not None:
                        spare.close()
                    self._loop_thread_id = threading.get_ident()
                    self._loop = running
                    self._attach_all()
                    self._bound = True
                    return False
                loop = spare or new_event_loop()
                self._loop = loop
            # The loop is given the workers' channels before its thread runs it:
            # callbacks queued meanwhile (call_soon_threadsafe) wait in it, and nothing
            # reads a worker that `_send_early` takes. That worker first, so that its
            # task goes as soon as it can.
            sent = False
            # Not with an initializer: it may take long, and the first task would
            # wait for this worker's even if another's ends first.
            if (
                first is not None
                and self._private_thread is None
                and self._initializer_blob is None
            ):
                for worker in self._workers.values():
                    if worker.state == _STARTING and worker.handle and worker.direct is None:
                        self._attach(worker)
                        if self._send_early(first, worker):
                            sent = True
                            gate = _thread.allocate_lock()
                            gate.acquire()
                            self._gate = gate
                        break
            self._attach_all()
            for worker in self._workers.values():
                # A starting worker is read by the loop, but the one the first task
                # went to (a cut `_send_early` may have paused one for nothing).
                if worker.state == _STARTING and worker.direct is None and worker.handle:
                    worker.handle.resume_reading()
            if self._private_thread is None:
                self._private_thread = _LoopThread(loop, self, self._gate)
            self._private_thread.start()
            self._bound = True
            return sent
        finally:
            self._bind_lock.release()

    def _open_gate(self) -> None:
        """Let the loop's thread run now (see EARLY_GATE)."""
        gate, self._gate = self._gate, None
        if gate is not None:
            gate.release()

    def _post_quietly(self, fn: Callable[..., None], *args: Any) -> None:
        """`_post` from the first round trip, which leaves the loop's thread waiting,
        and from `_bind` itself (under its lock: `_post` would bind again)."""
        loop = self._loop
        if loop is None or (self._gate is None and self._bound):
            self._post(fn, *args)
            return
        with contextlib.suppress(RuntimeError):  # closed meanwhile: nothing to do
            loop.call_soon_threadsafe(fn, *args)

    def _attach_all(self) -> None:
        for worker in list(self._workers.values()):
            if worker.handle is not None and not worker.attached:
                self._attach(worker)

    def _attach(self, worker: _Worker) -> None:
        assert worker.handle is not None and self._loop is not None
        worker.handle.attach(
            self._loop,
            lambda payload, fds: self._on_message(worker, payload, fds),
            lambda exit_: self._on_worker_exit(worker, exit_),
        )
        worker.attached = True

    def _on_loop_thread(self) -> bool:
        return self._loop_thread_id == threading.get_ident()

    def _call(self, fn: Callable[..., None], *args: Any) -> None:
        """Run fn(*args) in the pool's loop: now if we are on it, else soon."""
        loop = self._ensure_loop()
        if self._on_loop_thread():
            fn(*args)
        else:
            try:
                loop.call_soon_threadsafe(fn, *args)
            except RuntimeError as exc:
                raise PoolClosedError("the pool's event loop is closed") from exc

    # ── workers ────────────────────────────────────────────────────────────────

    def _spawn(self) -> None:
        if not self._free_rows:
            return
        row = self._free_rows.pop()
        worker = _Worker(next(self._worker_ids), row)
        self._workers[worker.id] = worker
        self._scoreboard.row(row).clear(0, RowState.STARTING)
        setup = {
            "worker_id": worker.id,
            "initializer": self._initializer_blob,
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

    def _on_started(self, worker: _Worker, started: asyncio.Future[Any]) -> None:
        exc = started.exception()
        if exc is not None:
            self._forget_worker(worker)
            self._worker_failed_to_start(exc)
            return
        worker.handle = started.result()
        self._attach(worker)
        if worker.state == _KILLED or (
            self._closing and not any(task.state == _QUEUED for task in self._queue)
        ):
            worker.handle.stop()  # else it starts for tasks queued during shutdown

    def _forget_worker(self, worker: _Worker) -> None:
        if self._workers.pop(worker.id, None) is not None:
            self._scoreboard.row(worker.row).clear()
            self._free_rows.append(worker.row)
            self._dead_worker_seconds += time.monotonic() - worker.started_at
        with self._idle_lock:
            if worker in self._idle:
                self._idle.remove(worker)

    def _live_workers(self) -> int:
        return sum(1 for w in self._workers.values() if w.state != _KILLED)

    def _grow(self) -> None:
        """Start workers while tasks wait and there is room (called on the loop)."""
        if self._broken is not None:
            return
        if self._closing:
            # Tasks queued during shutdown still run: a submit that raced shutdown()
            # from another thread, or what a crashed worker held. Shutdown retires
            # idle workers, so start one for them when none is left to take them.
            if (
                any(task.state == _QUEUED for task in self._queue)
                and self._free_rows
                and not any(w.state in (_READY, _STARTING) for w in self._workers.values())
            ):
                self._spawn()
            return
        while self._live_workers() < self._settings.min_workers and self._free_rows:
            self._spawn()
        starting = sum(1 for w in self._workers.values() if w.state == _STARTING)
        while (
            self._queued > starting
            and self._live_workers() < self._settings.max_workers
            and self._free_rows
        ):
            self._spawn()
            starting += 1

    def _retire(self, worker: _Worker) -> None:
        with self._idle_lock:
            if worker.direct is not None:
                return  # A thread just gave it a task: it retires after that one.
            if worker in self._idle:
                self._idle.remove(worker)
            worker.state = _RETIRING
        if worker.handle is not None:
            worker.handle.stop()

    def _kill(self, worker: _Worker) -> None:
        """Kill a worker; what it held but had not started goes back to the queue.

        A task sent to it directly (``worker.direct``) stays: it was running, so the
        worker's end fails it with WorkerCrashedError rather than running it twice.
        """
        with self._idle_lock:
            if worker in self._idle:
                self._idle.remove(worker)
            worker.state = _KILLED
        self._requeue(list(worker.inflight.values()))
        worker.inflight.clear()
        worker.outbox.clear()
        if worker.handle is not None:
            worker.handle.kill()

    def _requeue(self, tasks: list[_Task]) -> None:
        for task in reversed(tasks):
            if task.timer is not None:
                task.timer.cancel()
                task.timer = None
            task.state = _QUEUED
            task.worker = None
            self._queue.appendleft(task)
        if tasks:
            with self._count_lock:
                self._queued += len(tasks)
                for task in tasks:
                    task.reserved = True

    def _on_worker_exit(self, worker: _Worker, exit_: WorkerExit) -> None:
        was = worker.state
        self._forget_worker(worker)
        self._adopt_direct(worker, force=True)
        inflight = list(worker.inflight.values())
        worker.inflight.clear()
        worker.state = _KILLED
        if inflight and self._broken is not None:
            for task in inflight:
                self._settle_error(task, self._broken)
        elif inflight and was != _STARTING:
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
        if was == _STARTING and not self._closing and self._broken is None:
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

    def _worker_failed_to_start(self, exc: BaseException) -> None:
        self._failed_starts += 1
        if not self._ever_ready or self._failed_starts >= MAX_FAILED_STARTS:
            error = InitializerError(f"pool workers cannot start ({exc}); no more will be started")
            error.__cause__ = exc
            self._break(error)

    def _break(self, error: BaseException) -> None:
        """The pool cannot work (an initializer fails): fail everything, stop workers."""
        if self._broken is not None:
            return
        self._broken = error
        for task in self._queue:
            self._spend(task)
            if task.state == _QUEUED:
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

    # ── messages from workers ──────────────────────────────────────────────────

    def _on_message(self, worker: _Worker, payload: bytes | bytearray, fds: list[int]) -> None:
        kind, _nbuf, _nuser, task_id, seconds = read_head(payload)
        if worker.state == _STARTING and kind != proto.READY and kind != proto.INIT_FAILED:
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
        elif kind == proto.SYNCED:
            self._on_synced(worker, task_id)
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

    def _pass_on(self, worker: _Worker, payload: bytes | bytearray, fds: list[int]) -> None:
        """`_on_message` for a frame a thread reading its own reply came across."""
        worker.passed = payload
        self._on_message(worker, payload, fds)

    def _on_ready(self, worker: _Worker) -> None:
        if worker.state != _STARTING:
            return
        self._ever_ready = True
        self._failed_starts = 0
        with self._idle_lock:
            # Under the lock: the thread that reads a task sent before READY
            # (`_send_early`) re-lists the worker itself if it is READY by then.
            worker.state = _READY
            busy = worker.direct is not None or bool(worker.inflight)
        if not busy:
            # Idle, unless a task sent before READY took its last one (max_tasks_per_child).
            self._release_worker(worker)
        if self._ready_waiters and not any(w.state == _STARTING for w in self._workers.values()):
            self._wake(self._ready_waiters, None)
        self._pump()
        if self._closing:
            self._maybe_finish_shutdown()
        else:
            self._schedule_idle_check()

    def _on_result(
        self,
        worker: _Worker,
        task: _Task,
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

    def _after_reply(self, worker: _Worker) -> None:
        """A worker's task ended through the loop: its next, or idle; then the queue."""
        if worker.inflight:
            self._start_running(next(iter(worker.inflight.values())))
        elif worker.state == _READY and self._release_worker(worker):
            self._schedule_idle_check()
        if self._queue:
            self._pump()
        if self._closing:
            self._maybe_finish_shutdown()

    def _settle_reply(
        self, task: _Task, kind: int, seconds: float, payload: bytes | bytearray, fds: list[int]
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

    # ── futures ────────────────────────────────────────────────────────────────

    def _settle(self, task: _Task, value: Any) -> None:
        task.state = _DONE
        task.release()
        future = task.future
        if type(future) is _PoolFuture:
            future._task = future._pool = None
        if future is not None:
            if not _lock_free(future) and self._on_loop_thread():
                _settle_aside(future, value, None)
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

    def _settle_error(self, task: _Task, exc: BaseException) -> None:
        if task.timer is not None:
            task.timer.cancel()
            task.timer = None
        task.state = _DONE
        task.release()
        task.packed.close()
        future = task.future
        if type(future) is _PoolFuture:
            future._task = future._pool = None
        if future is None or _future_done(future):
            return
        if not _lock_free(future) and self._on_loop_thread():
            _settle_aside(future, None, exc)
            return
        with contextlib.suppress(concurrent.futures.InvalidStateError, asyncio.InvalidStateError):
            future.set_exception(exc)

    @staticmethod
    def _wake(waiters: list[concurrent.futures.Future[None]], exc: BaseException | None) -> None:
        for waiter in waiters:
            if not waiter.done():
                if exc is None:
                    waiter.set_result(None)
                else:
                    waiter.set_exception(exc)
        waiters.clear()

    # ── queue and dispatch ─────────────────────────────────────────────────────

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
    ) -> _Task:
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
            task = _Task(task_id, fn, (args, kwargs), packed, timeout, -1)
        else:
            packed = pack(proto.CHUNK, task_id, (blob, chunk))
            task = _Task(task_id, fn, None, packed, timeout, len(chunk))
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

    def _reserve(self, task: _Task, enforce: bool = True) -> None:
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

    def _spend(self, task: _Task) -> None:
        """Give back *task*'s queue slot, once (it left the queue, ran or was dropped)."""
        with self._count_lock:
            if task.reserved:
                task.reserved = False
                self._queued -= 1

    def _enqueue(self, task: _Task) -> None:
        """Loop side of a submit (the task's queue slot is already reserved)."""
        task.enqueued = True
        if self._broken is not None or (self._closing and not self._workers):
            self._spend(task)
            self._settle_error(task, self._broken or PoolClosedError("the pool is shut down"))
            return
        self._queue.append(task)
        self._pump()

    def _enqueue_from_thread(self, task: _Task) -> None:
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

    def _pump(self) -> None:
        queue = self._queue
        idle = self._idle
        dispatched = False
        while queue:
            task = queue[0]
            if task.state != _QUEUED:
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
                    task.state = _CANCELLED
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

    def _prefetch_target(self) -> _Worker | None:
        if self._run_ema >= PREFETCH_MAX_RUN_TIME:
            return None
        depth = PREFETCH_TINY if self._run_ema < TINY_TASK_TIME else PREFETCH
        limit = self._settings.max_tasks_per_child
        best: _Worker | None = None
        for worker in self._workers.values():
            if worker.state != _READY or worker.direct is not None or len(worker.inflight) > depth:
                continue
            if limit is not None and worker.sent >= limit:
                continue
            if best is None or len(worker.inflight) < len(best.inflight):
                best = worker
        return best

    def _dispatch(self, worker: _Worker, task: _Task) -> None:
        with self._count_lock:
            if task.reserved:
                task.reserved = False
                self._queued -= 1
        task.state = _SENT
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
            if handle is None or worker.state == _KILLED:
                continue
            if len(outbox) == 1 or any(packed.fds for packed in outbox):
                for packed in outbox:
                    handle.send(packed.payload, packed.fds)
            else:
                handle.send(pack_batch([packed.payload for packed in outbox]))

    def _make_idle(self, worker: _Worker) -> None:
        """Put a worker that holds no task in the idle list (loop thread).

        The loop stops reading an idle worker's socket, so that a thread that sends
        it a task directly may read the reply itself (`_send_direct`).
        """
        if worker.handle is not None:
            worker.handle.pause_reading()
        with self._idle_lock:
            self._idle.append(worker)

    # ── direct round trips (a thread other than the loop's submits and waits) ──

    def _send_early(self, task: _Task, worker: _Worker) -> bool:
        """Send the pool's first task to *worker*, still starting (`_bind`).

        Only before the loop runs: nothing reads the worker's socket yet, so pausing
        it hands the socket to the caller, as for an idle worker. The worker reads
        the task after SETUP; its READY comes ahead of the reply, and the thread that
        reads the reply passes it on to the loop (`_wait_direct`).
        """
        assert worker.handle is not None
        worker.handle.pause_reading()  # `_bind` resumes it if the task does not go
        return self._send_direct(task, early=worker)

    def _send_direct(self, task: _Task, early: _Worker | None = None) -> bool:
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
                task.state = _SENT
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
            task.owner = _OWNER_NONE
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
            task.owner = _OWNER_LOOP
            task.sender = None
            self._direct_live.discard(task)
            self._direct_sent -= 1
            worker.sent -= 1
            if worker.id in self._workers and worker.state == _READY:
                self._idle.append(worker)
            with self._count_lock:
                self._queued += 1
                task.reserved = True
                task.state = _QUEUED
            task.worker = None
        return False

    def _post(self, fn: Callable[..., None], *args: Any) -> None:
        """Run fn(*args) on the loop; nothing when the loop has closed meanwhile."""
        with contextlib.suppress(PoolClosedError):
            self._call(fn, *args)

    def _wait_direct(self, task: _Task, timeout: float | None) -> float | None:
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
            if task.owner != _OWNER_NONE or worker is None or worker.direct is not task:
                return timeout
            handle = worker.handle
            claimed = handle is not None and handle.claim_reading(sys._getframe())
            task.owner = _OWNER_CALLER if claimed else _OWNER_LOOP
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
                    self._post_quietly(self._pass_on, worker, frame[0], frame[1])
                    frame = None
                    continue
                # Not this task's reply (a cancelled task's late result, a SYNCED): the
                # loop takes it, and reads this worker from now on.
                self._post(self._pass_on, worker, frame[0], frame[1])
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
                        if task.owner == _OWNER_CALLER:
                            task.owner = _OWNER_LOOP if to_loop else _OWNER_NONE
            finally:
                # Released once, after the task is detached (the loop, ending this
                # worker, must not adopt it too). A resume asked for meanwhile (the
                # sweep, or a dispatch to the worker once idle again) is kept by the
                # claim and honoured here.
                handle.release_reading(resume=to_loop and not interrupted, token=sys._getframe())
                if self._gate is not None:
                    self._open_gate()  # the first round trip is over
        return None if deadline is None else max(0.0, deadline - time.monotonic())

    def _direct_interrupted(
        self,
        worker: _Worker,
        task: _Task,
        frame: tuple[bytes | bytearray, list[int]] | None,
    ) -> None:
        """The thread reading a direct task's reply was interrupted: finish it here.

        With the reply in hand (*frame*), the task is settled from it. Without it, the
        reply is still in the worker's socket, or the cut read lost it:

        - a read cut between the socket and its buffer leaves a stream whose frames
          can no longer be found: the task fails with ReplyLostError and the worker
          is replaced;
        - otherwise the loop reads the worker from now on, and sends it SYNC: every
          reply the worker owes comes before SYNCED, so a task still unsettled then
          lost its reply (`_on_synced`).
        """
        if frame is not None:
            kind, _nbuf, _nuser, task_id, _seconds = read_head(frame[0])
            if not _is_reply(task, kind, task_id):
                # A frame read ahead of the reply (a READY, a SYNCED, a late result),
                # cut while being passed on: the loop may have it already (`_pass_on`,
                # posted before this, has run by now).
                if frame[0] is not worker.passed:
                    self._pass_on(worker, frame[0], frame[1])
                worker.passed = None
                frame = None
        with self._idle_lock:
            attached = worker.direct is task
            if attached:
                worker.direct = None
                task.owner = _OWNER_LOOP
            self._direct_live.discard(task)  # even detached: a cut may have kept it
        handle = worker.handle
        if frame is not None:
            if worker.inflight.get(task.id) is task:
                # `_check_claims` saw the task first and gave it to the loop.
                del worker.inflight[task.id]
                attached = True
            future = task.future
            if future is not None and not _future_done(future):
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
        elif attached and task.state != _DONE:
            if handle is not None and handle.stream_in_doubt():
                self._fail_lost(worker, task)
                self._kill(worker)
                return
            worker.inflight[task.id] = task
            self._wait_time.add(task.started - task.submitted)
            if handle is not None:
                handle.resume_reading()
                token = next(self._sync_tokens)
                worker.suspects[token] = task
                handle.send(pack(proto.SYNC, token, None).payload)
            return
        # Always: a cut in `_finish_direct` may have left the worker neither idle nor
        # busy, even when the task was no longer attached (`_after_direct` checks).
        self._after_direct(worker)

    def _on_synced(self, worker: _Worker, token: int) -> None:
        """Every reply the worker owed at SYNC has come: a suspect still unsettled
        lost its reply to a cut read (`_direct_interrupted`)."""
        task = worker.suspects.pop(token, None)
        if task is None or worker.inflight.get(task.id) is not task:
            return
        del worker.inflight[task.id]
        self._fail_lost(worker, task)
        self._after_reply(worker)

    def _fail_lost(self, worker: _Worker, task: _Task) -> None:
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
        claims: list[tuple[_Worker, object]] = []
        orphans: list[tuple[_Worker, _Task]] = []
        adrift: set[_Worker] = set()
        with self._idle_lock:
            for worker in self._workers.values():
                handle = worker.handle
                token = None if handle is None else handle.claimed_by()
                task = worker.direct
                if token is not None:
                    claims.append((worker, token))
                elif task is not None and task.owner == _OWNER_CALLER:
                    task.owner = _OWNER_LOOP
                    orphans.append((worker, task))
                elif (
                    worker.state == _READY
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
        for worker, task in orphans:
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
                ours = task is not None and task.owner == _OWNER_CALLER
                if ours:
                    assert task is not None
                    task.owner = _OWNER_LOOP
            if ours:
                assert task is not None
                self._direct_interrupted(worker, task, None)
            else:
                self._after_direct(worker)

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
        self, worker: _Worker, task: _Task, frame: tuple[bytes | bytearray, list[int]]
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
                    and worker.state == _READY
                    and not self._closing
                    and (limit is None or worker.sent < limit)
                )
                task.owner = _OWNER_LOOP
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

    def _release_worker(self, worker: _Worker) -> bool:
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

    def _after_direct(self, worker: _Worker) -> None:
        """Loop side of a direct task's end: retire, refill, shut down, or shrink."""
        with self._idle_lock:
            # Under the lock: another thread may take an idle worker at any moment.
            free = (
                worker.state == _READY
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

    def _adopt_direct(self, worker: _Worker, *, force: bool = False) -> None:
        """Make the loop own a direct task: it joins ``inflight`` (loop thread).

        A task whose caller is reading its reply stays the caller's unless *force*.
        """
        with self._idle_lock:
            task = worker.direct
            if task is None or (task.owner == _OWNER_CALLER and not force):
                return
            worker.direct = None
            task.owner = _OWNER_LOOP
            self._direct_live.discard(task)
        worker.inflight[task.id] = task
        self._wait_time.add(task.started - task.submitted)

    def _direct_takeover(self, task: _Task) -> None:
        """The loop reads a direct task's reply (nobody waits on it with result())."""
        with self._idle_lock:
            worker = task.worker
            if worker is None or worker.direct is not task or task.owner == _OWNER_CALLER:
                return
            task.owner = _OWNER_LOOP
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
            stale: list[_Task] = []
            unread = False  # a task nobody reads yet: look again soon
            for task in self._direct_live:
                if task.owner == _OWNER_NONE:
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
                    task.owner = _OWNER_LOOP
                    stale.append(task)
            busy = unread or now - self._last_direct < DIRECT_LINGER
            go_on = not self._closed.is_set() and (busy or self._claims or bool(self._adrift))
            if not go_on:
                self._sweeping = False
        for task in stale:
            # As if its reader had been cut: the loop reads the reply, and a SYNC
            # settles a task whose submit was cut before its frame went.
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

    def _start_running(self, task: _Task) -> None:
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

    def _on_timeout(self, task: _Task) -> None:
        task.timer = None
        worker = task.worker
        if task.state != _SENT or worker is None:
            return
        self._counts["timed_out"] += 1
        worker.inflight.pop(task.id, None)
        assert task.timeout is not None
        self._settle_error(task, TaskTimeoutError(task.timeout, task.describe(), worker.id))
        self._kill(worker)
        self._pump()

    def _cancel_task(self, task: _Task) -> None:
        """The caller gave up on a task (loop side): drop it, or kill its worker if running."""
        if task.state == _QUEUED:
            task.state = _CANCELLED
            self._spend(task)
            self._counts["cancelled"] += 1
            task.packed.close()
            self._queue_shrank()
            return
        worker = task.worker
        if task.state != _SENT or worker is None:
            return
        if worker.direct is task:
            self._adopt_direct(worker, force=True)
        self._counts["cancelled"] += 1
        running = next(iter(worker.inflight)) == task.id
        worker.inflight.pop(task.id, None)
        task.state = _CANCELLED
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

    # ── idle shrinking ─────────────────────────────────────────────────────────

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

    # ── shutdown ───────────────────────────────────────────────────────────────

    def _begin_shutdown(self, cancel_futures: bool) -> None:
        self._closing = True
        if self._direct_sent:
            self._kick_sweep()  # it recovers a direct task a Ctrl-C left unsent
        if cancel_futures:
            for task in self._queue:
                self._spend(task)
                if task.state == _QUEUED:
                    task.state = _CANCELLED
                    task.packed.close()
                    if task.future is not None:
                        task.future.cancel()
            self._queue.clear()
            self._queue_shrank()
        self._maybe_finish_shutdown()

    def _maybe_finish_shutdown(self) -> None:
        if any(task.state == _QUEUED for task in self._queue):
            return
        for worker in list(self._workers.values()):
            if worker.state == _READY and not worker.inflight and worker.direct is None:
                self._retire(worker)
            elif (
                worker.state == _STARTING
                and worker.handle is not None
                and not worker.inflight
                and worker.direct is None
            ):
                worker.handle.stop()
        if self._workers:
            return
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        self._wake(self._ready_waiters, self._broken or PoolClosedError("the pool is shut down"))
        self._wake(self._room_waiters, self._broken or PoolClosedError("the pool is shut down"))
        self._wake(self._drain_waiters, None)
        self._release()
        if self._private_thread is not None and self._loop is not None:
            self._loop.stop()

    def _release(self) -> None:
        if self._closed.is_set():
            return
        self._backend.close()
        if self._owns_scoreboard:
            self._scoreboard.close()
        spare, self._spare_loop = self._spare_loop, None
        if spare is not None:
            spare.close()  # never used: the pool ended before its first task
        _LIVE_POOLS.discard(self)
        self._closed.set()
        self._wake(self._closed_waiters, None)

    def _terminate(self, error: BaseException | None = None) -> None:
        """Kill every worker without the loop (exit, a closed loop); fail what is left."""
        self._closing = True
        if error is not None and self._broken is None:
            self._broken = error
        error = error or PoolClosedError("the pool was terminated")
        for worker in list(self._workers.values()):
            if worker.handle is not None:
                worker.handle.terminate_now()
            self._adopt_direct(worker, force=True)
            for task in worker.inflight.values():
                self._settle_error(task, error)
            worker.inflight.clear()
            self._forget_worker(worker)
        for task in self._queue:
            if task.state == _QUEUED:
                self._settle_error(task, error)
        self._queue.clear()
        self._release()

    def _at_exit(self) -> None:
        loop = self._loop
        if (
            self._private_thread is not None
            and self._private_thread.is_alive()
            and loop is not None
            and not self._closed.is_set()
        ):
            # Like ProcessPoolExecutor: queued work completes before the program ends.
            self.shutdown(wait=True)
            return
        if loop is not None and loop.is_running() and not self._on_loop_thread():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._terminate, None)
            self._closed.wait(5)
        if not self._closed.is_set():
            self._terminate()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop taking tasks; finish (or, with *cancel_futures*, drop) the queued ones.

        With *wait*, return once every worker has exited. Called on the pool's own
        event loop thread it cannot wait (the loop must run to finish the work): it
        starts the shutdown and returns; ``await pool.aclose()`` waits.
        """
        loop = self._loop
        if self._closed.is_set():
            return
        if loop is None:
            # Never used: the workers hold no task.
            self._terminate()
            return
        if not self._bound:
            self._bind()  # a Ctrl-C cut it short: its loop must run to shut down
        if loop.is_closed():
            self._terminate()
            return
        if self._on_loop_thread():
            self._begin_shutdown(cancel_futures)
            return
        try:
            loop.call_soon_threadsafe(self._begin_shutdown, cancel_futures)
        except RuntimeError:
            self._terminate()
            return
        self._open_gate()
        if wait:
            self._closed.wait()
            if self._private_thread is not None:
                self._private_thread.join()

    async def aclose(self, *, cancel_futures: bool = False) -> None:
        """Shut down and wait for every worker to exit, without blocking the loop."""
        if self._closed.is_set():
            return
        loop = self._loop
        if loop is None or loop.is_closed():
            self._terminate()
            return
        done: concurrent.futures.Future[None] = concurrent.futures.Future()

        def start() -> None:
            self._closed_waiters.append(done)
            self._begin_shutdown(cancel_futures)

        self._call(start)
        await asyncio.wrap_future(done)
        if self._private_thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._private_thread.join)

    # ── public API: Executor ───────────────────────────────────────────────────

    def submit(
        self, fn: Callable[..., R], /, *args: Any, **kwargs: Any
    ) -> concurrent.futures.Future[R]:
        """Schedule fn(*args, **kwargs); a `concurrent.futures.Future` of its result.

        Unpicklable arguments raise here, in the caller, without reaching a worker.
        A full queue raises `QueueFullError`.
        """
        return self.schedule(fn, args, kwargs)

    def schedule(
        self,
        fn: Callable[..., R],
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
        *,
        timeout: float | None = None,
    ) -> concurrent.futures.Future[R]:
        """`submit` with a per-task *timeout* (seconds of running, not of waiting)."""
        # Pulled arguments are safe here: a submitted task is RUNNING once sent, so it
        # is never skipped (SKIP) while the worker may be reading them.
        task = self._new_task(fn, args, kwargs or {}, timeout, pull=True, reserve=False)
        handed = False
        try:
            # Reserved here, inside the try: a Ctrl-C right after a reservation made
            # in `_new_task` would lose the task, and its queue slot with it.
            self._reserve(task)
            future: concurrent.futures.Future[R] = _PoolFuture(self, task)
            task.future = future
            if self._on_loop_thread():
                self._enqueue(task)
            elif self._bound or not self._bind(first=task):
                self._ensure_loop()
                if not self._send_direct(task):
                    handed = True
                    self._call(self._enqueue_from_thread, task)
        except BaseException as exc:
            # An error, or a Ctrl-C that may land anywhere above. A task handed to the
            # loop may be on its way: the loop, which sees it first if it went, tells.
            if handed and not isinstance(exc, PoolClosedError):
                self._post(self._abandon, task)
            else:
                self._abandon(task)
            raise
        return future

    def _abandon(self, task: _Task) -> None:
        """A submit raised after the task was made: give its slot back unless it went
        to a worker (`_send_direct`) or into the queue (it then runs, unseen)."""
        if task.enqueued or task.state != _QUEUED:
            return
        self._spend(task)
        task.packed.close()

    def map(  # type: ignore[override]
        self,
        fn: Callable[..., R],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int | None = None,
    ) -> MapIterator[R]:
        """Results of fn over the inputs, in order; inputs are read lazily.

        With no *chunksize* the pool sizes chunks itself from measured run times.
        The result is both an iterator and an async iterator (``async for``), and
        can be awaited for a list.
        """
        return MapIterator(self, fn, iterables, chunksize=chunksize, ordered=True, timeout=timeout)

    def imap(
        self, fn: Callable[..., R], *iterables: Iterable[Any], chunksize: int | None = None
    ) -> MapIterator[R]:
        """Like `map` (ordered, lazy, auto-chunked), without an overall timeout."""
        return MapIterator(self, fn, iterables, chunksize=chunksize, ordered=True, timeout=None)

    def imap_unordered(
        self, fn: Callable[..., R], *iterables: Iterable[Any], chunksize: int | None = None
    ) -> MapIterator[R]:
        """Like `imap`, yielding results as chunks complete."""
        return MapIterator(self, fn, iterables, chunksize=chunksize, ordered=False, timeout=None)

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown(wait=True)

    # ── public API: asyncio ────────────────────────────────────────────────────

    async def run(
        self, fn: Callable[..., R], /, *args: Any, timeout: float | None = None, **kwargs: Any
    ) -> R:
        """Run fn(*args, **kwargs) in a worker and return its result.

        *timeout* limits the run time (not the wait in the queue): past it the task
        fails with `TaskTimeoutError` and its worker is replaced. Cancelling the
        awaiting task cancels the pool task: a queued one is dropped, a running one
        has its worker killed and replaced.
        """
        running = asyncio.get_running_loop()
        loop = self._ensure_loop()
        task = self._new_task(fn, args, kwargs, timeout)
        if loop is running:
            future: asyncio.Future[R] = running.create_future()
            task.future = future
            self._enqueue(task)
            try:
                return await future
            except asyncio.CancelledError:
                if future.cancelled():
                    self._cancel_task(task)
                raise
        bridge: concurrent.futures.Future[R] = concurrent.futures.Future()
        task.future = bridge
        task.bridged = True
        self._call(self._enqueue, task)
        try:
            return await asyncio.wrap_future(bridge)
        except asyncio.CancelledError:
            self._call(self._cancel_task, task)
            raise

    def submit_async(
        self, fn: Callable[..., R], /, *args: Any, timeout: float | None = None, **kwargs: Any
    ) -> asyncio.Future[R]:
        """Like `run`, as an `asyncio.Future`: ``future.cancel()`` cancels the task
        (a running one's worker is killed and replaced). Call it in a running loop."""
        running = asyncio.get_running_loop()
        loop = self._ensure_loop()
        task = self._new_task(fn, args, kwargs, timeout)
        if loop is running:
            future: asyncio.Future[R] = running.create_future()
            task.future = future
            future.add_done_callback(lambda f: self._cancel_task(task) if f.cancelled() else None)
            self._enqueue(task)
            return future
        bridge: concurrent.futures.Future[R] = concurrent.futures.Future()
        task.future = bridge
        task.bridged = True
        self._call(self._enqueue, task)
        wrapped = asyncio.wrap_future(bridge)
        wrapped.add_done_callback(
            lambda f: self._call(self._cancel_task, task) if f.cancelled() else None
        )
        return wrapped

    async def start(self) -> None:
        """Wait until the workers started ahead are ready; raises `InitializerError`."""
        self._ensure_loop()
        waiter: concurrent.futures.Future[None] = concurrent.futures.Future()

        def check() -> None:
            if self._broken is not None:
                waiter.set_exception(self._broken)
            elif not any(w.state == _STARTING for w in self._workers.values()):
                waiter.set_result(None)
            else:
                self._ready_waiters.append(waiter)

        self._call(check)
        try:
            await asyncio.wrap_future(waiter)
        except InitializerError:
            # Reap the workers now: this loop may end right after the error, and a
            # worker never reaped would leave its socket's fd number registered.
            await self.aclose()
            raise

    async def __aenter__(self) -> Pool:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def wait_for_room(self) -> None:
        """Wait until the queue has room for one more task (back-pressure)."""
        waiter: concurrent.futures.Future[None] = concurrent.futures.Future()

        def check() -> None:
            limit = self._settings.max_queue
            if self._broken is not None:
                waiter.set_exception(self._broken)
                return
            # Under _count_lock: a direct submit lowers _queued from another thread.
            with self._count_lock:
                room = limit is None or self._queued < limit
                if not room:
                    self._room_waiters.append(waiter)
            if room:
                waiter.set_result(None)

        self._call(check)
        await asyncio.wrap_future(waiter)

    async def drain(self) -> None:
        """Wait until the queue is empty (every task handed to a worker)."""
        await asyncio.wrap_future(self._drain_waiter())

    def wait_drained(self, timeout: float | None = None) -> bool:
        """Block until the queue is empty; False if *timeout* passed first."""
        if self._on_loop_thread():
            raise RuntimeError(
                "wait_drained() would block the pool's own loop; use await pool.drain()"
            )
        try:
            self._drain_waiter().result(timeout)
        except TimeoutError:
            return False
        return True

    def _drain_waiter(self) -> concurrent.futures.Future[None]:
        waiter: concurrent.futures.Future[None] = concurrent.futures.Future()

        def check() -> None:
            # Under _count_lock: a direct submit lowers _queued from another thread.
            with self._count_lock:
                done = self._queued == 0 or self._broken is not None
                if not done:
                    self._drain_waiters.append(waiter)
            if done:
                waiter.set_result(None)

        self._call(check)
        return waiter

    # ── insight ────────────────────────────────────────────────────────────────

    @property
    def settings(self) -> PoolSettings:
        return self._settings

    @property
    def scoreboard(self) -> Scoreboard:
        return self._scoreboard

    @property
    def closed(self) -> bool:
        return self._closing or self._closed.is_set()

    def worker_pids(self) -> list[int]:
        """PIDs of the live workers (for tests and tooling)."""
        return [
            w.handle.pid
            for w in list(self._workers.values())
            if w.handle is not None and w.handle.pid is not None
        ]

    def stats(self) -> PoolStats:
        """Workers, queue, utilisation, counts, and run/wait-time percentiles."""
        if self._on_loop_thread():
            self._fold_direct_stats()
        pending = list(self._direct_stats)  # not folded yet: counted here, read-only
        workers = list(self._workers.values())
        now = time.monotonic()
        alive = self._dead_worker_seconds + sum(now - w.started_at for w in workers)
        counts = self._counts
        return PoolStats(
            backend=self._backend.name,
            workers=sum(1 for w in workers if w.state != _KILLED),
            busy=sum(1 for w in workers if w.inflight or w.direct is not None),
            idle=sum(
                1 for w in workers if w.state == _READY and not w.inflight and w.direct is None
            ),
            starting=sum(1 for w in workers if w.state == _STARTING),
            queued=self._queued,
            max_queue=self._settings.max_queue,
            utilisation=min(1.0, self._busy_seconds / alive) if alive > 0 else 0.0,
            submitted=counts["submitted"],
            completed=counts["completed"] + sum(1 for p in pending if p[0] == "completed"),
            failed=counts["failed"] + sum(1 for p in pending if p[0] == "failed"),
            crashed=counts["crashed"],
            timed_out=counts["timed_out"],
            cancelled=counts["cancelled"],
            run_time=self._run_time.percentiles([p[1] for p in pending]),
            wait_time=self._wait_time.percentiles([p[2] for p in pending]),
        )

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return (
            f"<allcores.Pool {self._backend.name} max_workers={self._settings.max_workers} {state}>"
        )


class _PoolFuture(concurrent.futures.Future[R]):
    """The future of `Pool.submit`. When its task went straight to an idle worker
    (`Pool._send_direct`), ``result()`` and ``exception()`` read the reply in the
    waiting thread; anything else makes the pool's loop read it."""

    def __init__(self, pool: Pool, task: _Task) -> None:
        super().__init__()
        self._pool: Pool | None = pool
        self._task: _Task | None = task

    def result(self, timeout: float | None = None) -> R:
        task = self._task
        if task is not None and task.owner == _OWNER_NONE and self._pool is not None:
            timeout = self._pool._wait_direct(task, timeout)
        return super().result(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        task = self._task
        if task is not None and task.owner == _OWNER_NONE and self._pool is not None:
            timeout = self._pool._wait_direct(task, timeout)
        return super().exception(timeout)

    def add_done_callback(self, fn: Callable[[concurrent.futures.Future[R]], object]) -> None:
        task = self._task
        if task is not None and task.owner == _OWNER_NONE and self._pool is not None:
            with contextlib.suppress(PoolClosedError):  # closed: it was settled already
                self._pool._call(self._pool._direct_takeover, task)
        super().add_done_callback(fn)


class MapIterator(Iterator[R], AsyncIterator[R]):
    """The results of `Pool.map` / `imap` / `imap_unordered`: iterate, async-iterate, or await.

    Inputs are pulled lazily, at most ``MAP_INFLIGHT_PER_WORKER x max_workers``
    chunks ahead, so an endless generator runs in bounded memory. With no
    chunksize, each chunk's measured run time sizes the next (`TARGET_CHUNK_SECONDS`).
    """

    def __init__(
        self,
        pool: Pool,
        fn: Callable[..., R],
        iterables: tuple[Iterable[Any], ...],
        *,
        chunksize: int | None,
        ordered: bool,
        timeout: float | None,
    ) -> None:
        self._closed = True  # until set up: __del__ then has nothing to close
        if chunksize is not None and chunksize < 1:
            raise ValueError("chunksize must be >= 1")
        if not iterables:
            raise TypeError("map() needs at least one iterable")
        self._pool = pool
        self._fn = fn
        self._hint = operator.length_hint(iterables[0]) if len(iterables) == 1 else 0
        self._items: Iterator[tuple[Any, ...]] = zip(*iterables, strict=False)
        self._auto = chunksize is None
        self._chunksize = chunksize or 1
        self._ordered = ordered
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self._max_inflight = MAP_INFLIGHT_PER_WORKER * pool.settings.max_workers
        self._inflight: collections.deque[concurrent.futures.Future[Any]] = collections.deque()
        self._ready: collections.deque[R] = collections.deque()
        self._error: BaseException | None = None
        self._exhausted = False
        self._closed = False
        self._per_item: float | None = None
        self._fill()

    def _next_chunksize(self) -> int:
        if not self._auto or self._per_item is None:
            return self._chunksize
        target = TARGET_CHUNK_SECONDS / max(self._per_item, 1e-8)
        size = int(min(target, self._chunksize * CHUNK_GROWTH, MAX_CHUNKSIZE))
        if self._hint:
            # Leave enough chunks that every worker gets a share of what is left.
            size = min(size, -(-self._hint // (4 * self._pool.settings.max_workers)))
        self._chunksize = max(1, size)
        return self._chunksize

    def _learn(self, items: int, seconds: float) -> None:
        if not self._auto or items <= 0:
            return
        per_item = seconds / items
        if self._per_item is None:
            self._per_item = per_item
        else:
            self._per_item += (per_item - self._per_item) * 0.5

    def _fill(self) -> None:
        while not self._exhausted and not self._closed and len(self._inflight) < self._max_inflight:
            size = self._next_chunksize()
            chunk = list(itertools.islice(self._items, size))
            if not chunk:
                self._exhausted = True
                return
            if self._hint:
                self._hint = max(0, self._hint - len(chunk))
            task = self._pool._new_task(self._fn, (), {}, None, chunk=chunk)
            future: concurrent.futures.Future[Any] = concurrent.futures.Future()
            task.future = future
            self._pool._call(self._pool._enqueue, task)
            self._inflight.append(future)
            if len(chunk) < size:
                self._exhausted = True

    def _take(self, future: concurrent.futures.Future[Any]) -> None:
        self._inflight.remove(future)
        results, error, seconds = future.result()
        self._learn(len(results) + (error is not None), seconds)
        self._ready.extend(results)
        if error is not None:
            self._error = error

    def _remaining(self) -> float | None:
        if self._deadline is None:
            return None
        return max(0.0, self._deadline - time.monotonic())

    def __iter__(self) -> MapIterator[R]:
        return self

    def _advance(self) -> bool | None:
        """True: a result is ready; False: one must be waited for; None: the map is done.

        Raises the map's error (after the results before it). Shared by the sync and
        async iterators, which differ only in how they wait.
        """
        if self._ready:
            return True
        if self._error is not None:
            self.close()
            error, self._error = self._error, None
            raise error
        self._fill()
        if not self._inflight:
            self.close()
            return None
        return False

    def __next__(self) -> R:
        while True:
            state = self._advance()
            if state:
                return self._ready.popleft()
            if state is None:
                raise StopIteration
            if self._pool._on_loop_thread():
                self.close()
                raise RuntimeError(
                    "iterating a pool's map synchronously on the pool's own event loop would "
                    "deadlock; use `async for` (or `await pool.map(...)`)"
                )
            try:
                if self._ordered:
                    head = self._inflight[0]
                    head.result(self._remaining())
                    self._take(head)
                else:
                    done, _ = concurrent.futures.wait(
                        list(self._inflight),
                        timeout=self._remaining(),
                        return_when=concurrent.futures.FIRST_COMPLETED,
                    )
                    if not done:
                        raise TimeoutError
                    for future in done:
                        self._take(future)
            except BaseException:
                self.close()
                raise

    def __aiter__(self) -> MapIterator[R]:
        return self

    async def __anext__(self) -> R:
        while True:
            state = self._advance()
            if state:
                return self._ready.popleft()
            if state is None:
                raise StopAsyncIteration
            try:
                if self._ordered:
                    head = self._inflight[0]
                    await asyncio.wait_for(
                        asyncio.shield(asyncio.wrap_future(head)), self._remaining()
                    )
                    self._take(head)
                else:
                    waiting = {asyncio.wrap_future(f): f for f in self._inflight}
                    done, _ = await asyncio.wait(
                        waiting, timeout=self._remaining(), return_when=asyncio.FIRST_COMPLETED
                    )
                    if not done:
                        raise TimeoutError
                    for wrapped in done:
                        self._take(waiting[wrapped])
            except BaseException:
                self.close()
                raise

    def __await__(self) -> Generator[Any, None, list[R]]:
        return self._collect().__await__()

    async def _collect(self) -> list[R]:
        return [item async for item in self]

    def close(self) -> None:
        """Stop: queued chunks are dropped (chunks already running finish unseen)."""
        if self._closed:
            return
        self._closed = True
        for future in self._inflight:
            future.cancel()
        self._inflight.clear()

    def __del__(self) -> None:
        self.close()
