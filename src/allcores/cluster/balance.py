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
    best_stale: C | None = None
    for offset in range(n):
        candidate = candidates[(start + offset) % n]
        if candidate.heartbeat_age <= stale_after:
            if best is None or candidate.open_connections < best.open_connections:
                best = candidate
        elif best_stale is None or candidate.open_connections < best_stale.open_connections:
            best_stale = candidate
    return best if best is not None else best_stale


def round_robin(candidates: Sequence[T], start: int) -> T | None:
    return candidates[start % len(candidates)] if candidates else None
