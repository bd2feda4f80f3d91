"""`Pool`: a crash-proof, asyncio-first `concurrent.futures.Executor`.

How a task flows (the pool's loop owns the queue and the workers; the direct lane
is the one path that runs in the caller's thread)::

    caller (any thread)                   the pool's loop (bound or own thread)            worker
    ───────────────────                   ─────────────────────────────────────            ──────
    submit / run / map
      pickle fn (cached) + args ──┐
      (large buffers -> memfd)    │  same thread: direct call
      queue-full check (lock)     ├────────────────────────────► _enqueue ─► _queue (deque)
                                  │  other thread: call_soon_threadsafe        │ _pump
                                  ┘                                            ▼
      an idle worker, nothing queued: the      idle worker, or prefetch ──────────────► frame
      caller sends and reads itself (direct)   timeout timer when the task starts running
                                               _on_message ◄── result frame ◄────────────┘
      future resolved ◄───────────────────── (cf.Future from any thread, asyncio.Future here)
                                               _on_worker_exit ◄── its end: crash/kill/stop
                                                  running task fails (WorkerCrashedError),
                                                  prefetched ones go back to the queue front,
                                                  a replacement starts

The class is built in layers, one mechanism a module; `allcores.pool.state` lists
them. This module is the public API only: the constructor, the Executor methods,
the asyncio methods and the insight ones. What is process-specific (start method,
kill, exit codes, nice) lives in `allcores.pool.backends.process`; the pool sees
only the `Backend` interface.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import multiprocessing.context
import time
from collections.abc import Callable, Iterable
from typing import Any, Literal, TypeVar

from allcores._system import new_event_loop
from allcores.observe.scoreboard import Scoreboard
from allcores.pool.backends.base import Backend
from allcores.pool.backends.process import ProcessBackend
from allcores.pool.errors import InitializerError, PoolClosedError
from allcores.pool.futures import PoolFuture
from allcores.pool.loop import in_event_loop
from allcores.pool.map import MapIterator
from allcores.pool.settings import DEFAULT_IDLE_TIMEOUT, DEFAULT_NICE, PoolSettings, usable_cpus
from allcores.pool.shutdown import _LIVE_POOLS, Shutdown
from allcores.pool.stats import PoolStats
from allcores.pool.task import WorkerState

__all__ = ["MapIterator", "Pool", "PoolSettings", "usable_cpus"]

R = TypeVar("R")


class Pool(Shutdown, concurrent.futures.Executor):
    """A pool of worker processes; a drop-in `ProcessPoolExecutor`, asyncio first.

    The first four parameters are ProcessPoolExecutor's. Beyond them: *min_workers*
    (started ahead; default all), *idle_timeout* (seconds before a worker above
    min_workers exits), *max_queue* (``"auto"``, an int, or None for unbounded),
    *task_timeout* (default per-task limit), *nice* (added to workers' niceness;
    0 keeps the parent's), *start_method* (force fork/forkserver/spawn),
    *scoreboard* and *scoreboard_rows* (write worker rows into a given scoreboard),
    *backend* (where workers run: processes unless given a `Backend`; the tests of
    the scheduler give a fake one).
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
        backend: Backend | None = None,
    ) -> None:
        if mp_context is not None and start_method is None:
            start_method = mp_context.get_start_method()
        settings = PoolSettings.build(
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
        if backend is None:
            backend = ProcessBackend(
                start_method=settings.start_method,
                nice=settings.nice,
                initializer=None
                if settings.initializer is None
                else (settings.initializer, settings.initargs),
            )
        elif settings.initializer is not None:
            raise ValueError("a Pool given a backend= takes no initializer; give it to the backend")
        if scoreboard is None:
            rows = list(range(settings.max_workers))
            super().__init__(settings, backend, Scoreboard.create(settings.max_workers), True, rows)
        else:
            rows = (
                list(scoreboard_rows)
                if scoreboard_rows is not None
                else list(range(min(settings.max_workers, scoreboard.rows)))
            )
            if len(rows) < settings.max_workers:
                raise ValueError(
                    f"the scoreboard gives {len(rows)} rows for {settings.max_workers} workers"
                )
            super().__init__(settings, backend, scoreboard, False, rows)
        # The loop a pool made outside any event loop will run: built now, before the
        # first fork, it costs a third of what it does after (~0.2 vs ~0.6 ms, as every
        # page the parent writes after a fork is copied), on the way to the first
        # result (`_bind`).
        if settings.min_workers and not backend.start_is_slow() and not in_event_loop():
            self._spare_loop = new_event_loop()
        _LIVE_POOLS.add(self)
        for _ in range(settings.min_workers):
            self._spawn()

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
            future: concurrent.futures.Future[R] = PoolFuture(self, task)
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

    def __exit__(self, exc_type: type[BaseException] | None, *exc_info: object) -> None:
        if exc_type is not None:
            # The block failed (or Ctrl-C): nobody reads its maps any more, so they
            # stop here rather than send the rest of their inputs.
            for iterator in list(self._maps):
                iterator.close()
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
            elif not any(w.state == WorkerState.STARTING for w in self._workers.values()):
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
            workers=sum(1 for w in workers if w.state != WorkerState.KILLED),
            busy=sum(1 for w in workers if w.inflight or w.direct is not None),
            idle=sum(
                1
                for w in workers
                if w.state == WorkerState.READY and not w.inflight and w.direct is None
            ),
            starting=sum(1 for w in workers if w.state == WorkerState.STARTING),
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
