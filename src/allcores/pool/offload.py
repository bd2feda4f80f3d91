"""`offload`: run a function in the process's default pool, from async code.

The default pool is created on first use and shut down at exit. A server (or a
test) replaces it with `set_default_pool`. Under `allcores serve`, each HTTP worker
points `offload` at the pool that the whole server shares instead
(`set_offload_runner`); code written against `offload` does not change.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from allcores.pool.pool import Pool

__all__ = ["Runner", "get_default_pool", "offload", "set_default_pool", "set_offload_runner"]

R = TypeVar("R")


class Runner(Protocol):
    """What `offload` can send work to besides a `Pool`: anything with `Pool.run`."""

    async def run(
        self, fn: Callable[..., R], /, *args: Any, timeout: float | None = None, **kwargs: Any
    ) -> R: ...


_lock = threading.Lock()
_default: Pool | None = None
_runner: Runner | None = None


def _usable(pool: Pool) -> bool:
    loop = pool._engine._loop
    return not pool.closed and (loop is None or not loop.is_closed())


def get_default_pool() -> Pool:
    """The default pool, created (usable CPUs, default settings) when first needed.

    A default pool bound to an event loop that has since closed (one `asyncio.run`
    after another) is terminated and replaced.
    """
    global _default
    with _lock:
        pool = _default
        if pool is not None and _usable(pool):
            return pool
        if pool is not None:
            pool.shutdown(wait=False)
        _default = Pool()
        return _default


def set_default_pool(pool: Pool | None) -> Pool | None:
    """Make *pool* the one `offload` uses (None: create a fresh one on next use).

    Returns the previous default pool, which the caller now owns (it is not shut down).
    """
    global _default
    with _lock:
        previous, _default = _default, pool
        return previous


def set_offload_runner(runner: Runner | None) -> Runner | None:
    """Send every `offload` to *runner* (None: back to the default pool); returns the
    previous one. `allcores serve` sets the server's shared pool here in each worker."""
    global _runner
    previous, _runner = _runner, runner
    return previous


async def offload(fn: Callable[..., R], /, *args: Any, **kwargs: Any) -> R:
    """``await offload(fn, *args)``: fn(*args) in the default pool, off the event loop
    (under `allcores serve`: in the pool the whole server shares).

    Keyword arguments go to *fn*, except ``timeout`` which limits the run time as
    in `Pool.run`.
    """
    runner = _runner
    if runner is not None:
        return await runner.run(fn, *args, **kwargs)
    return await get_default_pool().run(fn, *args, **kwargs)
