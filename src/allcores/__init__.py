"""allcores: use every core from Python.

- `allcores.cluster`: Node's cluster module: a primary forks workers that serve on
  one shared port, and supervises them.
- `allcores.Pool` / `allcores.offload`: Node's worker_threads and Piscina: CPU-bound
  work leaves the event loop for a pool of worker processes.
- `allcores.Worker`: Node's `Worker`, one long-lived process to converse with.
- `allcores.SharedArray`: Node's SharedArrayBuffer.

Everything else may change without notice.
"""

from __future__ import annotations

from allcores import cluster
from allcores._system import available_cpus
from allcores.errors import AllcoresError
from allcores.pool import (
    Pool,
    QueueFullError,
    TaskTimeoutError,
    WorkerCrashedError,
    offload,
)
from allcores.pool.messaging_worker import Worker
from allcores.shm import SharedArray

__all__ = [
    "AllcoresError",
    "Pool",
    "QueueFullError",
    "SharedArray",
    "TaskTimeoutError",
    "Worker",
    "WorkerCrashedError",
    "available_cpus",
    "cluster",
    "offload",
]
__version__ = "0.1.0"
