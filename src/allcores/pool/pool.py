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

The pool's machinery is `PoolEngine`, built in layers, one mechanism a module
(`allcores.pool.state` lists them). `Pool`, here, is the object a user holds: the
constructor, the Executor methods, the asyncio methods and the insight ones, each
working on its engine. The engine's loop, futures and maps refer to the engine,
never to the `Pool`: a `Pool` dropped without ``shutdown()`` is collected, as a
ProcessPoolExecutor is, and its engine then shuts down once the work already given
is done (`PoolEngine.dropped`), while futures and maps still get their results.
What is process-specific (start method, kill, exit codes, nice) lives in
`allcores.pool.backends.process`; the pool sees only the `Backend` interface.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import multiprocessing.context
import time
import weakref
from collections.abc import Callable, Iterable
from typing import Any, Literal, TypeVar

from allcores.observe.scoreboard import Scoreboard
from allcores.pool.backends.base import Backend
from allcores.pool.backends.process import ProcessBackend
from allcores.pool.errors import InitializerError, PoolClosedError
from allcores.pool.futures import PoolFuture
from allcores.pool.map import MapIterator
from allcores.pool.settings import DEFAULT_IDLE_TIMEOUT, DEFAULT_NICE, PoolSettings, usable_cpus
from allcores.pool.shutdown import PoolEngine
from allcores.pool.stats import PoolStats
from allcores.pool.task import WorkerState

__all__ = ["MapIterator", "Pool", "PoolSettings", "usable_cpus"]

R = TypeVar("R")


class Pool(concurrent.futures.Executor):
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
        if scoreboard is not None:
            rows = (
                list(scoreboard_rows)
                if scoreboard_rows is not None
                else list(range(min(settings.max_workers, scoreboard.rows)))
            )
            if len(rows) < settings.max_workers:
                raise ValueError(
                    f"the scoreboard gives {len(rows)} rows for {settings.max_workers} workers"
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
            engine = PoolEngine(
                settings,
                backend,
                Scoreboard.create(settings.max_workers),
                True,
                list(range(settings.max_workers)),
            )
        else:
            engine = PoolEngine(settings, backend, scoreboard, False, rows)
        self._engine = engine
        # Before the workers start: if their start fails, the Pool that raised is
        # dropped and ends what did start. Not at interpreter exit: the engine's own
        # exit handler sees to it then.
        weakref.finalize(self, engine.dropped).atexit = False
        engine.begin()

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
        engine = self._engine
        # Pulled arguments are safe here: a submitted task is RUNNING once sent, so it
        # is never skipped (SKIP) while the worker may be reading them.
        task = engine._new_task(fn, args, kwargs or {}, timeout, pull=True, reserve=False)
        handed = False
        try:
            # Reserved here, inside the try: a Ctrl-C right after a reservation made
            # in `_new_task` would lose the task, and its queue slot with it.
            engine._reserve(task)
            future: concurrent.futures.Future[R] = PoolFuture(engine, task)
            task.future = future
            if engine._on_loop_thread():
                engine._enqueue(task)
            elif engine._bound or not engine._bind(first=task):
                engine._ensure_loop()
                if not engine._send_direct(task):
                    handed = True
                    engine._call(engine._enqueue_from_thread, task)
        except BaseException as exc:
            # An error, or a Ctrl-C that may land anywhere above. A task handed to the
            # loop may be on its way: the loop, which sees it first if it went, tells.
            if handed and not isinstance(exc, PoolClosedError):
                engine._post(engine._abandon, task)
            else:
                engine._abandon(task)
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
        return MapIterator(
            self._engine, fn, iterables, chunksize=chunksize, ordered=True, timeout=timeout
        )

    def imap(
        self, fn: Callable[..., R], *iterables: Iterable[Any], chunksize: int | None = None
    ) -> MapIterator[R]:
        """Like `map` (ordered, lazy, auto-chunked), without an overall timeout."""
        return MapIterator(
            self._engine, fn, iterables, chunksize=chunksize, ordered=True, timeout=None
        )

    def imap_unordered(
        self, fn: Callable[..., R], *iterables: Iterable[Any], chunksize: int | None = None
    ) -> MapIterator[R]:
        """Like `imap`, yielding results as chunks complete."""
        return MapIterator(
            self._engine, fn, iterables, chunksize=chunksize, ordered=False, timeout=None
        )

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc_info: object) -> None:
        engine = self._engine
        if exc_type is not None:
            # The block failed (or Ctrl-C): nobody reads its maps any more, so they
            # stop here rather than send the rest of their inputs.
            for iterator in list(engine._maps):
                iterator.close()
        engine.shutdown(wait=True)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop taking tasks; finish (or, with *cancel_futures*, drop) the queued ones.

        With *wait*, return once every worker has exited. On the pool's own event
        loop thread it only starts the shutdown; ``await pool.aclose()`` waits.
        """
        self._engine.shutdown(wait, cancel_futures=cancel_futures)

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
        engine = self._engine
        running = asyncio.get_running_loop()
        loop = engine._ensure_loop()
        task = engine._new_task(fn, args, kwargs, timeout)
        if loop is running:
            future: asyncio.Future[R] = running.create_future()
            task.future = future
            engine._enqueue(task)
            try:
                return await future
            except asyncio.CancelledError:
                if future.cancelled():
                    engine._cancel_task(task)
                raise
        bridge: concurrent.futures.Future[R] = concurrent.futures.Future()
        task.future = bridge
        task.bridged = True
        engine._call(engine._enqueue, task)
        try:
            return await asyncio.wrap_future(bridge)
        except asyncio.CancelledError:
            engine._call(engine._cancel_task, task)
            raise

    def submit_async(
        self, fn: Callable[..., R], /, *args: Any, timeout: float | None = None, **kwargs: Any
    ) -> asyncio.Future[R]:
        """Like `run`, as an `asyncio.Future`: ``future.cancel()`` cancels the task
        (a running one's worker is killed and replaced). Call it in a running loop."""
        engine = self._engine
        running = asyncio.get_running_loop()
        loop = engine._ensure_loop()
        task = engine._new_task(fn, args, kwargs, timeout)
        if loop is running:
            future: asyncio.Future[R] = running.create_future()
            task.future = future
            future.add_done_callback(lambda f: engine._cancel_task(task) if f.cancelled() else None)
            engine._enqueue(task)
            return future
        bridge: concurrent.futures.Future[R] = concurrent.futures.Future()
        task.future = bridge
        task.bridged = True
        engine._call(engine._enqueue, task)
        wrapped = asyncio.wrap_future(bridge)
        wrapped.add_done_callback(
            lambda f: engine._call(engine._cancel_task, task) if f.cancelled() else None
        )
        return wrapped

    async def start(self) -> None:
        """Wait until the workers started ahead are ready; raises `InitializerError`."""
        engine = self._engine
        engine._ensure_loop()
        waiter: concurrent.futures.Future[None] = concurrent.futures.Future()

        def check() -> None:
            if engine._broken is not None:
                waiter.set_exception(engine._broken)
            elif not any(w.state == WorkerState.STARTING for w in engine._workers.values()):
                waiter.set_result(None)
            else:
                engine._ready_waiters.append(waiter)

        engine._call(check)
        try:
            await asyncio.wrap_future(waiter)
        except InitializerError:
            # Reap the workers now: this loop may end right after the error, and a
            # worker never reaped would leave its socket's fd number registered.
            await engine.aclose()
            raise

    async def __aenter__(self) -> Pool:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self, *, cancel_futures: bool = False) -> None:
        """Shut down and wait for every worker to exit, without blocking the loop."""
        await self._engine.aclose(cancel_futures=cancel_futures)

    async def wait_for_room(self) -> None:
        """Wait until the queue has room for one more task (back-pressure)."""
        engine = self._engine
        waiter: concurrent.futures.Future[None] = concurrent.futures.Future()

        def check() -> None:
            limit = engine._settings.max_queue
            if engine._broken is not None:
                waiter.set_exception(engine._broken)
                return
            # Under _count_lock: a direct submit lowers _queued from another thread.
            with engine._count_lock:
                room = limit is None or engine._queued < limit
                if not room:
                    engine._room_waiters.append(waiter)
            if room:
                waiter.set_result(None)

        engine._call(check)
        await asyncio.wrap_future(waiter)

    async def drain(self) -> None:
        """Wait until the queue is empty (every task handed to a worker)."""
        await asyncio.wrap_future(self._drain_waiter())

    def wait_drained(self, timeout: float | None = None) -> bool:
        """Block until the queue is empty; False if *timeout* passed first."""
        engine = self._engine
        if engine._on_loop_thread():
            raise RuntimeError(
                "wait_drained() would block the pool's own loop; use await pool.drain()"
            )
        try:
            self._drain_waiter().result(timeout)
        except TimeoutError:
            return False
        return True

    def _drain_waiter(self) -> concurrent.futures.Future[None]:
        engine = self._engine
        waiter: concurrent.futures.Future[None] = concurrent.futures.Future()

        def check() -> None:
            # Under _count_lock: a direct submit lowers _queued from another thread.
            with engine._count_lock:
                done = engine._queued == 0 or engine._broken is not None
                if not done:
                    engine._drain_waiters.append(waiter)
            if done:
                waiter.set_result(None)

        engine._call(check)
        return waiter

    # ── insight ────────────────────────────────────────────────────────────────

    @property
    def settings(self) -> PoolSettings:
        return self._engine._settings

    @property
    def scoreboard(self) -> Scoreboard:
        return self._engine._scoreboard

    @property
    def closed(self) -> bool:
        engine = self._engine
        return engine._closing or engine._closed.is_set()

    def worker_pids(self) -> list[int]:
        """PIDs of the live workers (for tests and tooling)."""
        engine = self._engine
        return [
            w.handle.pid
            for w in list(engine._workers.values())
            if w.handle is not None and w.handle.pid is not None
        ]

    def stats(self) -> PoolStats:
        """Workers, queue, utilisation, counts, and run/wait-time percentiles."""
        engine = self._engine
        if engine._on_loop_thread():
            engine._fold_direct_stats()
        pending = list(engine._direct_stats)  # not folded yet: counted here, read-only
        workers = list(engine._workers.values())
        now = time.monotonic()
        alive = engine._dead_worker_seconds + sum(now - w.started_at for w in workers)
        counts = engine._counts
        return PoolStats(
            backend=engine._backend.name,
            workers=sum(1 for w in workers if w.state != WorkerState.KILLED),
            busy=sum(1 for w in workers if w.inflight or w.direct is not None),
            idle=sum(
                1
                for w in workers
                if w.state == WorkerState.READY and not w.inflight and w.direct is None
            ),
            starting=sum(1 for w in workers if w.state == WorkerState.STARTING),
            queued=engine._queued,
            max_queue=engine._settings.max_queue,
            utilisation=min(1.0, engine._busy_seconds / alive) if alive > 0 else 0.0,
            submitted=counts["submitted"],
            completed=counts["completed"] + sum(1 for p in pending if p[0] == "completed"),
            failed=counts["failed"] + sum(1 for p in pending if p[0] == "failed"),
            crashed=counts["crashed"],
            timed_out=counts["timed_out"],
            cancelled=counts["cancelled"],
            run_time=engine._run_time.percentiles([p[1] for p in pending]),
            wait_time=engine._wait_time.percentiles([p[2] for p in pending]),
        )

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        name, workers = self._engine._backend.name, self.settings.max_workers
        return f"<allcores.Pool {name} max_workers={workers} {state}>"
