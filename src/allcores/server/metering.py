"""What each HTTP worker counts in its scoreboard row, for the primary to read.

::

    request ─► metered(app) ─► the user's app
                 row "tasks" + 1 ............ in flight now
                 (the app answers)
                 row "tasks" - 1, "requests_total" + 1   (max_requests, status, metrics),
                 its duration into the latency histogram (the admin endpoint's metrics)

An ASGI middleware rather than a hook in the HTTP protocol: it sees every request
the same way under httptools and h11, for about a microsecond each. WebSockets and
lifespan pass through uncounted.
"""

from __future__ import annotations

import time
from typing import Any

from allcores.observe.scoreboard import LATENCY_BUCKETS_S, Row

__all__ = ["metered"]


def metered(app: Any, row: Row) -> Any:
    """*app*, counting its HTTP requests in *row*."""
    in_flight = row.slot("tasks")
    served = row.slot("requests_total")
    total_time = row.slot("latency_sum")
    buckets = [row.slot(f"latency_bucket_{i}") for i in range(len(LATENCY_BUCKETS_S) + 1)]
    bounds = list(enumerate(LATENCY_BUCKETS_S))

    def add(slot: Any, delta: float) -> None:
        buf, position, fmt = slot
        fmt.pack_into(buf, position, fmt.unpack_from(buf, position)[0] + delta)

    async def metered_app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        add(in_flight, 1)
        began = time.perf_counter()
        try:
            await app(scope, receive, send)
        finally:
            took = time.perf_counter() - began
            add(in_flight, -1)
            add(served, 1)
            add(total_time, took)
            add(buckets[next((i for i, bound in bounds if took <= bound), len(bounds))], 1)

    return metered_app
