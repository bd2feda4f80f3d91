"""Which worker gets the next connection (policies `balanced` and `rr`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, TypeVar

__all__ = ["Candidate", "least_busy_worker", "round_robin"]


class Candidate(Protocol):
    @property
    def open_connections(self) -> int: ...

    @property
    def heartbeat_age(self) -> float: ...


C = TypeVar("C", bound=Candidate)
T = TypeVar("T")


def least_busy_worker(candidates: Sequence[C], start: int, stale_after: float) -> C | None:
    """The candidate with the fewest open connections whose loop beat recently.

    Ties go to the first one at or after *start* (the caller advances it: round-robin
    among equals). When every loop is stale the least busy of all is still chosen: a
    slow answer beats a refused connection.
    """
    if not candidates:
        return None
    n = len(candidates)
    best: C | None = None
    best_open = 0
    best_stale: C | None = None
    best_stale_open = 0
    for offset in range(n):
        candidate = candidates[(start + offset) % n]
        open_now = candidate.open_connections  # each read once: they come from shared memory
        if candidate.heartbeat_age <= stale_after:
            if best is None or open_now < best_open:
                best, best_open = candidate, open_now
        elif best_stale is None or open_now < best_stale_open:
            best_stale, best_stale_open = candidate, open_now
    return best if best is not None else best_stale


def round_robin(candidates: Sequence[T], start: int) -> T | None:
    return candidates[start % len(candidates)] if candidates else None
