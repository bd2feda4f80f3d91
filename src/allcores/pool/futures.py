"""The futures a pool hands out, and settling them safely from the pool's loop.

`PoolFuture` is what `Pool.submit` returns. When its task went straight to an idle
worker (`allcores.pool.direct`), ``result()`` reads the reply in the waiting
thread; anything else makes the pool's loop read it.

The helpers below exist for one rule: a Ctrl-C in a caller's thread never hangs
the pool's loop. A Ctrl-C can land inside CPython's ``Future`` code while that
thread holds the future's lock; the loop then neither asks ``done()`` nor sets the
result under that lock (`future_done`, `lock_free`, `settle_aside`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from allcores.pool.errors import PoolClosedError
from allcores.pool.task import Owner, Task

if TYPE_CHECKING:
    from allcores.pool.direct import DirectLane

__all__ = ["PoolFuture", "future_done", "lock_free", "settle_aside"]

R = TypeVar("R")

AnyFuture = concurrent.futures.Future[Any] | asyncio.Future[Any]

_DONE_STATES = frozenset(("CANCELLED", "CANCELLED_AND_NOTIFIED", "FINISHED"))


def future_done(future: AnyFuture) -> bool:
    """``future.done()`` without taking the future's lock.

    A Ctrl-C that lands in ``Condition.__exit__`` inside ``set_result`` (CPython's own
    code, run by a thread that settles its direct task) leaves that future's lock held
    by the interrupted thread; ``done()`` would then block the loop forever. Both
    future classes keep their state in ``_state``, with these names, since 3.2.
    """
    state = getattr(future, "_state", None)
    return future.done() if state is None else state in _DONE_STATES


def lock_free(future: AnyFuture) -> bool:
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


def settle_aside(
    future: AnyFuture,
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


class PoolFuture(concurrent.futures.Future[R]):
    """The future of `Pool.submit`. When its task went straight to an idle worker
    (`DirectLane._send_direct`), ``result()`` and ``exception()`` read the reply in the
    waiting thread; anything else makes the pool's loop read it."""

    def __init__(self, pool: DirectLane, task: Task) -> None:
        super().__init__()
        self._pool: DirectLane | None = pool
        self._task: Task | None = task

    def result(self, timeout: float | None = None) -> R:
        task = self._task
        if task is not None and task.owner == Owner.NONE and self._pool is not None:
            timeout = self._pool._wait_direct(task, timeout)
        return super().result(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        task = self._task
        if task is not None and task.owner == Owner.NONE and self._pool is not None:
            timeout = self._pool._wait_direct(task, timeout)
        return super().exception(timeout)

    def add_done_callback(self, fn: Callable[[concurrent.futures.Future[R]], object]) -> None:
        task = self._task
        if task is not None and task.owner == Owner.NONE and self._pool is not None:
            with contextlib.suppress(PoolClosedError):  # closed: it was settled already
                self._pool._call(self._pool._direct_takeover, task)
        super().add_done_callback(fn)
