"""What an HTTP worker counts for the primary to read: requests in flight, answered,
and how long each took, kept here and written into its scoreboard row by `flush`.

::

    protocol.py (httptools) or `metered` (an ASGI middleware, under h11)
      ─► Meter: plain integers, a few nanoseconds a request
    the worker's ticker, every 0.1 s ─► Meter.flush ─► its scoreboard row:
      "tasks" (in flight), "requests_total", "latency_sum", "latency_bucket_*"
      ─► the primary: max_requests, `allcores status`, /metrics

Counting in the row itself cost about 2 µs a request (five struct packs); the
primary reads at most once a second, so a tenth of a second late costs nothing.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from typing import Any

from allcores.observe.scoreboard import LATENCY_BUCKETS_S, Row

__all__ = ["Meter", "metered"]


class Meter:
    """One HTTP worker's counts; the only writer of its row's request fields."""

    def __init__(self, row: Row) -> None:
        self._row = row
        self.in_flight = 0
        self.requests = 0
        self.latency_sum = 0.0
        self.buckets = [0] * (len(LATENCY_BUCKETS_S) + 1)

    def answered(self, took: float) -> None:
        self.in_flight -= 1
        self.requests += 1
        self.latency_sum += took
        self.buckets[bisect_left(LATENCY_BUCKETS_S, took)] += 1

    def flush(self) -> None:
        row = self._row
        row.set("tasks", self.in_flight)
        row.set("requests_total", self.requests)
        row.set("latency_sum", self.latency_sum)
        for i, count in enumerate(self.buckets):
            row.set(f"latency_bucket_{i}", count)


def metered(app: Any, meter: Meter) -> Any:
    """*app*, counting its HTTP requests in *meter*."""

    async def metered_app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        meter.in_flight += 1
        began = time.perf_counter()
        try:
            await app(scope, receive, send)
        finally:
            meter.answered(time.perf_counter() - began)

    return metered_app
