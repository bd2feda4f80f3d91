"""Which event loop runs a pool: the caller's, or its own in a thread.

The first use inside a running loop (``await pool.run``, ``async with``,
``loop.run_in_executor``) binds the pool to that loop, which then reads the
workers' channels itself. The first use from plain sync code starts a private loop
in a thread instead (`loop.LoopThread`)::

    first use ──► _bind ──┬─ in a running loop: that loop; every worker attached
                          └─ else: own loop; the first task may go at once to a
                             starting worker (`DirectLane._send_early`), then the
                             loop's thread starts
    any thread ──► _call(fn) ──► fn now (on the loop's thread) or call_soon_threadsafe

A Ctrl-C may cut `_bind` anywhere: the next call (`_ensure_loop`, `shutdown`)
finishes what it left, since every step can be taken again.
"""

from __future__ import annotations

import _thread
import asyncio
import contextlib
import threading
from collections.abc import Callable
from typing import Any

from allcores._system import new_event_loop
from allcores.pool.errors import PoolClosedError
from allcores.pool.loop import LoopThread
from allcores.pool.state import PoolState
from allcores.pool.task import PoolWorker, Task, WorkerState

__all__ = ["Binding"]


class Binding(PoolState):
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

    def _bind(self, first: Task | None = None) -> bool:
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
                and self._settings.initializer is None
            ):
                for worker in self._workers.values():
                    if (
                        worker.state == WorkerState.STARTING
                        and worker.handle
                        and worker.direct is None
                    ):
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
                if worker.state == WorkerState.STARTING and worker.direct is None and worker.handle:
                    worker.handle.resume_reading()
            if self._private_thread is None:
                self._private_thread = LoopThread(loop, self, self._gate)
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

    def _attach(self, worker: PoolWorker) -> None:
        assert worker.handle is not None and self._loop is not None
        worker.handle.attach(
            self._loop,
            lambda payload, fds: self._on_message(worker, payload, fds),
            lambda exit_: self._on_worker_exit(worker, exit_),
        )
        worker.attached = True

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

    def _post(self, fn: Callable[..., None], *args: Any) -> None:
        """Run fn(*args) on the loop; nothing when the loop has closed meanwhile."""
        with contextlib.suppress(PoolClosedError):
            self._call(fn, *args)
