"""`offload`: run a function in the process's default pool, from async code.

The default pool is created on first use and shut down at exit. A server (or a
test) replaces it with `set_default_pool`; code written against `offload` does not
change when a later layer points it at a pool shared by a whole cluster.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar

from allcores.pool.pool import Pool

__all__ = ["get_default_pool", "offload", "set_default_pool"]

R = TypeVar("R")

_lock = threading.Lock()
_default: Pool | None = None


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


async def offload(fn: Callable[..., R], /, *args: Any, **kwargs: Any) -> R:
    """``await offload(fn, *args)``: fn(*args) in the default pool, off the event loop.

    Keyword arguments go to *fn*, except ``timeout`` which limits the run time as
    in `Pool.run`.
    """
    return await get_default_pool().run(fn, *args, **kwargs)
