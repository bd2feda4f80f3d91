"""What `Pool.stats()` reports: counts, utilisation, and run/wait-time percentiles."""

from __future__ import annotations

import collections
import dataclasses
import math

__all__ = ["Histogram", "Percentiles", "PoolStats"]

# Percentiles are computed over the most recent samples only: 4,096 keeps p99 backed
# by ~40 samples while bounding memory (32 KiB) and the sort stats() does (~0.3 ms).
_WINDOW = 4096


@dataclasses.dataclass(frozen=True)
class Percentiles:
    """Seconds; over the last 4,096 samples (``max`` over the pool's whole life)."""

    count: int
    p50: float
    p90: float
    p99: float
    max: float


class Histogram:
    __slots__ = ("_max", "_recent", "count")

    def __init__(self) -> None:
        self._recent: collections.deque[float] = collections.deque(maxlen=_WINDOW)
        self._max = 0.0
        self.count = 0

    def add(self, seconds: float) -> None:
        self._recent.append(seconds)
        self.count += 1
        if seconds > self._max:
            self._max = seconds

    def percentiles(self, extra: list[float] | None = None) -> Percentiles:
        """Over the recent samples plus *extra* (samples not added yet)."""
        extra = extra or []
        ordered = sorted([*self._recent, *extra][-_WINDOW:])
        if not ordered:
            return Percentiles(0, 0.0, 0.0, 0.0, 0.0)

        def at(q: float) -> float:
            return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]

        return Percentiles(
            self.count + len(extra), at(0.50), at(0.90), at(0.99), max([self._max, *extra])
        )


@dataclasses.dataclass(frozen=True)
class PoolStats:
    """A snapshot of a pool (see `Pool.stats`)."""

    backend: str
    workers: int
    busy: int
    idle: int
    starting: int
    queued: int
    max_queue: int | None
    utilisation: float
    submitted: int
    completed: int
    failed: int
    crashed: int
    timed_out: int
    cancelled: int
    run_time: Percentiles
    wait_time: Percentiles
