"""The task pool: `Pool`, `offload`, and their errors (see ``docs/pool.md``)."""

from allcores.pool.errors import (
    InitializerError,
    PoolClosedError,
    PoolError,
    QueueFullError,
    RemoteTraceback,
    ReplyLostError,
    TaskTimeoutError,
    WorkerCrashedError,
)
from allcores.pool.offload import get_default_pool, offload, set_default_pool
from allcores.pool.pool import MapIterator, Pool, PoolSettings, usable_cpus
from allcores.pool.stats import Percentiles, PoolStats

__all__ = [
    "InitializerError",
    "MapIterator",
    "Percentiles",
    "Pool",
    "PoolClosedError",
    "PoolError",
    "PoolSettings",
    "PoolStats",
    "QueueFullError",
    "RemoteTraceback",
    "ReplyLostError",
    "TaskTimeoutError",
    "WorkerCrashedError",
    "get_default_pool",
    "offload",
    "set_default_pool",
    "usable_cpus",
]
