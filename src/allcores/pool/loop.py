"""The event loop a pool runs on: the caller's, or its own in a thread.

`allcores.pool.binding` decides which. This module holds the pool's own loop
thread (`LoopThread`) and the two small helpers the decision needs.
"""

from __future__ import annotations

import _thread
import asyncio
import os
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from allcores.pool.state import PoolState

__all__ = ["EARLY_GATE", "LoopThread", "forget_dummy", "in_event_loop"]

# While a pool's first task makes its round trip without the loop (`Pool._send_early`),
# the loop's new thread waits for it to end, at most this long, instead of taking a
# core and the GIL from it: ~0.3 ms of a ~6 ms start. Anything else that needs the
# loop meanwhile (another submit, shutdown) lets it go at once (`Pool._ensure_loop`).
EARLY_GATE = 0.005


def in_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def forget_dummy() -> None:
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


class LoopThread:
    """The thread that runs a pool's own event loop, started without waiting for it.

    `threading.Thread.start` returns only once the new thread has run; on the first
    submit, with freshly forked workers on every core, that wait is ~1 ms, and the
    first round trip needs no loop (`Pool._send_early`). `_thread` starts it and
    goes on; the loop runs what was queued for it once the thread is scheduled.
    """

    def __init__(
        self, loop: asyncio.AbstractEventLoop, pool: PoolState, gate: _thread.LockType | None
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
            # never removed before 3.13 (see forget_dummy).
            try:
                self._loop.run_forever()
            finally:
                self._loop.close()
        finally:
            forget_dummy()
            self._done.set()

    def is_alive(self) -> bool:
        return self._started and not self._done.is_set()

    def join(self) -> None:
        """Wait until the thread has ended, and the OS has removed it too.

        The thread's last step comes a moment before the kernel thread is gone; a
        pool created right after would fork its zygote from a process the OS still
        counts as threaded (Python 3.12+ then warns that the fork may deadlock). That
        wait is bounded (50 ms) and usually a few µs.
        """
        if not self._started:
            return
        self._done.wait()
        path = f"/proc/self/task/{self._native_id}"
        deadline = time.monotonic() + 0.05
        while self._native_id is not None and os.path.exists(path) and time.monotonic() < deadline:
            time.sleep(0.0002)
