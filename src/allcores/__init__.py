"""allcores: use every core from Python.

- `allcores.serve`: `allcores serve` from Python: an ASGI or WSGI app on every core.
- `allcores.cluster`: Node's cluster module: a primary forks workers that serve on
  one shared port, and supervises them.
- `allcores.Pool` / `allcores.offload`: Node's worker_threads and Piscina: CPU-bound
  work leaves the event loop for a pool of worker processes.
- `allcores.Worker`: Node's `Worker`, one long-lived process to converse with.
- `allcores.SharedArray`: Node's SharedArrayBuffer.

Everything else may change without notice. The names are imported on first use, so
a pool user does not pay for the cluster's imports, nor a cluster worker for the
pool's (it matters for start-up: see docs/PERFORMANCE.md).
"""

from __future__ import annotations

import importlib

from allcores.errors import AllcoresError

# Not `from typing import TYPE_CHECKING`: typing (and the re it imports) would be most
# of what `import allcores` costs. Type checkers read any name TYPE_CHECKING as True.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from allcores import cluster
    from allcores._system import available_cpus
    from allcores.pool import (
        InitializerError,
        Pool,
        PoolClosedError,
        PoolError,
        QueueFullError,
        ReplyLostError,
        TaskTimeoutError,
        WorkerCrashedError,
        offload,
    )
    from allcores.server import serve
    from allcores.shm import SharedArray
    from allcores.worker import Worker, WorkerProcessError

__all__ = [
    "AllcoresError",
    "InitializerError",
    "Pool",
    "PoolClosedError",
    "PoolError",
    "QueueFullError",
    "ReplyLostError",
    "SharedArray",
    "TaskTimeoutError",
    "Worker",
    "WorkerCrashedError",
    "WorkerProcessError",
    "available_cpus",
    "cluster",
    "offload",
    "serve",
]
__version__ = "0.1.0"

_LAZY = {
    "available_cpus": ("allcores._system", "available_cpus"),
    "cluster": ("allcores.cluster", None),
    "InitializerError": ("allcores.pool", "InitializerError"),
    "Pool": ("allcores.pool", "Pool"),
    "PoolClosedError": ("allcores.pool", "PoolClosedError"),
    "PoolError": ("allcores.pool", "PoolError"),
    "QueueFullError": ("allcores.pool", "QueueFullError"),
    "ReplyLostError": ("allcores.pool", "ReplyLostError"),
    "TaskTimeoutError": ("allcores.pool", "TaskTimeoutError"),
    "WorkerCrashedError": ("allcores.pool", "WorkerCrashedError"),
    "offload": ("allcores.pool", "offload"),
    "Worker": ("allcores.worker", "Worker"),
    "WorkerProcessError": ("allcores.worker", "WorkerProcessError"),
    "SharedArray": ("allcores.shm", "SharedArray"),
    "serve": ("allcores.server", "serve"),
}


def __getattr__(name: str) -> Any:
    try:
        module_name, attribute = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'allcores' has no attribute {name!r}") from None
    module = importlib.import_module(module_name)
    value = module if attribute is None else getattr(module, attribute)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
