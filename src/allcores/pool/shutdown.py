"""`PoolEngine`, the top layer: start, shutdown, and the engine a `Pool` holds.

Shutdown finishes (or drops) what is queued, stops every worker, releases it all::

    shutdown() / aclose() / `with` exit ──► open maps send the rest of their inputs
        (as ProcessPoolExecutor's map has sent them all) ──► _begin_shutdown (loop):
        no new tasks; cancel_futures drops the queued ones
    each worker with nothing left ──► retired (STOP frame; killed after a grace
        period by the backend) ──► its exit ──► _maybe_finish_shutdown
    no worker left ──► _release: backend, scoreboard, the loop's thread stops
    interpreter exit ──► _at_exit: like ProcessPoolExecutor, queued work completes
    the user's Pool collected ──► dropped: a shutdown that does not wait
    a closed loop, or no loop ──► _terminate: kill without the loop, fail the rest

Every pool alive is in `_LIVE_POOLS`, which the exit handler walks.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import weakref

from allcores._system import new_event_loop
from allcores.pool.errors import PoolClosedError
from allcores.pool.loop import in_event_loop
from allcores.pool.replies import Replies
from allcores.pool.task import TaskState, WorkerState

__all__ = ["PoolEngine"]

_LIVE_POOLS: weakref.WeakSet[PoolEngine] = weakref.WeakSet()


def _shutdown_pools_at_exit() -> None:
    for pool in list(_LIVE_POOLS):
        pool._at_exit()


# Registered after multiprocessing's own handler, so it runs first (atexit is LIFO)
# and multiprocessing never waits on a worker of ours.
atexit.register(_shutdown_pools_at_exit)


class PoolEngine(Replies):
    def begin(self) -> None:
        """Start the workers wanted ahead (``min_workers``), from `Pool()`."""
        settings = self._settings
        # The loop a pool made outside any event loop will run: built now, before the
        # first fork, it costs a third of what it does after (~0.2 vs ~0.6 ms, as every
        # page the parent writes after a fork is copied), on the way to the first
        # result (`_bind`).
        if settings.min_workers and not self._backend.start_is_slow() and not in_event_loop():
            self._spare_loop = new_event_loop()
        _LIVE_POOLS.add(self)
        for _ in range(settings.min_workers):
            self._spawn()

    def dropped(self) -> None:
        """The user's `Pool` was collected without ``shutdown()``: shut down without
        waiting, as a collected ProcessPoolExecutor does. The work already given runs
        to its end and its futures and maps get their results; then the workers stop.

        It may run in any thread, at any point where the collector runs: it only
        asks the loop, or, for a pool never used, stops the idle workers."""
        if self._closing or self._closed.is_set():
            return
        loop = self._loop
        if loop is None or loop.is_closed() or not self._bound:
            self._terminate()  # never used, or its loop is gone: nothing can run
            return
        try:
            loop.call_soon_threadsafe(self._shutdown_dropped)
        except RuntimeError:  # the loop closed meanwhile
            self._terminate()

    def _shutdown_dropped(self) -> None:
        if not self._closing and not self._closed.is_set():
            self._send_maps_rest()
            self._begin_shutdown(False)

    def _send_maps_rest(self) -> None:
        """Open maps send every input left, so that their results can be read after
        the pool has shut down (`MapIterator.submit_rest`)."""
        for iterator in list(self._maps):
            iterator.submit_rest()

    def _begin_shutdown(self, cancel_futures: bool) -> None:
        self._closing = True
        if self._direct_sent:
            self._kick_sweep()  # it recovers a direct task a Ctrl-C left unsent
        if cancel_futures:
            for task in self._queue:
                self._spend(task)
                if task.state == TaskState.QUEUED:
                    task.state = TaskState.CANCELLED
                    task.packed.close()
                    if task.future is not None:
                        task.future.cancel()
            self._queue.clear()
            self._queue_shrank()
        self._maybe_finish_shutdown()

    def _maybe_finish_shutdown(self) -> None:
        if any(task.state == TaskState.QUEUED for task in self._queue):
            return
        for worker in list(self._workers.values()):
            if worker.state == WorkerState.READY and not worker.inflight and worker.direct is None:
                self._retire(worker)
            elif (
                worker.state == WorkerState.STARTING
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
            if task.state == TaskState.QUEUED:
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
        if not cancel_futures and not self._closing:
            self._send_maps_rest()
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
        if not cancel_futures and not self._closing:
            self._send_maps_rest()
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
