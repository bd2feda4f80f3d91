"""`PoolSettings`: every option of a pool, checked once, in one frozen object.

`Pool(...)` takes them as keywords (the first four are ProcessPoolExecutor's) and
builds this; every part of the pool reads ``self._settings``. A bad value raises
here, before any process starts, with concurrent.futures' own words where ours
replace one of its errors.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Literal

from allcores._system import available_cpus

__all__ = ["DEFAULT_IDLE_TIMEOUT", "DEFAULT_NICE", "PoolSettings", "usable_cpus"]

# "auto" max_queue: room for a submit-everything-then-wait loop written for
# ProcessPoolExecutor (whose queue is unbounded) of 100k tasks, while a runaway
# producer still meets a clear QueueFullError before it holds gigabytes.
AUTO_MAX_QUEUE = 100_000
# Workers run at niceness +5 relative to the parent: CFS then weighs the parent 3x
# a worker (1024 vs 335), so a request-serving loop wins a contended core, while on
# an idle machine the workers still get every cycle.
DEFAULT_NICE = 5
# A worker above min_workers idle for this long exits; a minute absorbs bursty load
# without paying a fork on every burst.
DEFAULT_IDLE_TIMEOUT = 60.0


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask), not the machine's count."""
    return available_cpus()


@dataclasses.dataclass(frozen=True)
class PoolSettings:
    """Every option of a pool, validated when built (`Pool` takes them as keywords)."""

    max_workers: int
    min_workers: int
    idle_timeout: float | None
    max_queue: int | None
    max_tasks_per_child: int | None
    initializer: Callable[..., object] | None
    initargs: tuple[Any, ...]
    task_timeout: float | None
    nice: int
    start_method: str | None

    @classmethod
    def build(
        cls,
        max_workers: int | None = None,
        *,
        min_workers: int | None = None,
        idle_timeout: float | None = DEFAULT_IDLE_TIMEOUT,
        max_queue: int | Literal["auto"] | None = "auto",
        max_tasks_per_child: int | None = None,
        initializer: Callable[..., object] | None = None,
        initargs: tuple[Any, ...] = (),
        task_timeout: float | None = None,
        nice: int | None = DEFAULT_NICE,
        start_method: str | None = None,
    ) -> PoolSettings:
        if max_workers is None:
            max_workers = usable_cpus()
        if max_workers < 1:
            # concurrent.futures' own words: code and tests match on them.
            raise ValueError("max_workers must be greater than 0")
        if min_workers is None:
            # All workers start ahead: a pool exists to be used, and its first
            # tasks should not wait for forks.
            min_workers = max_workers
        if not 0 <= min_workers <= max_workers:
            raise ValueError(f"min_workers must be in 0..max_workers, got {min_workers}")
        if idle_timeout is not None and idle_timeout <= 0:
            raise ValueError(f"idle_timeout must be positive or None, got {idle_timeout}")
        if max_queue == "auto":
            max_queue = AUTO_MAX_QUEUE
        if max_queue is not None and (not isinstance(max_queue, int) or max_queue < 1):
            raise ValueError(f"max_queue must be 'auto', a positive int or None, got {max_queue!r}")
        if max_tasks_per_child is not None and max_tasks_per_child < 1:
            raise ValueError(f"max_tasks_per_child must be >= 1, got {max_tasks_per_child}")
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        if task_timeout is not None and task_timeout <= 0:
            raise ValueError(f"task_timeout must be positive or None, got {task_timeout}")
        return cls(
            max_workers=max_workers,
            min_workers=min_workers,
            idle_timeout=idle_timeout,
            max_queue=max_queue,
            max_tasks_per_child=max_tasks_per_child,
            initializer=initializer,
            initargs=tuple(initargs),
            task_timeout=task_timeout,
            nice=nice or 0,
            start_method=start_method,
        )
