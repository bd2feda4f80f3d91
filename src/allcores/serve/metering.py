"""What each HTTP worker counts in its scoreboard row, for the primary to read.

::

    request ─► metered(app) ─► the user's app
                 row "tasks" + 1 ............ in flight now
                 (the app answers)
                 row "tasks" - 1, "requests_total" + 1   (max_requests, status, metrics)

An ASGI middleware rather than a hook in the HTTP protocol: it sees every request
the same way under httptools and h11, for about a microsecond each. WebSockets and
lifespan pass through uncounted.
"""

from __future__ import annotations

from typing import Any

from allcores.observe.scoreboard import Row

__all__ = ["metered"]


def metered(app: Any, row: Row) -> Any:
    """*app*, counting its HTTP requests in *row*."""
    in_flight = row.slot("tasks")
    served = row.slot("requests_total")

    def add(slot: Any, delta: int) -> None:
        buf, position, fmt = slot
        fmt.pack_into(buf, position, fmt.unpack_from(buf, position)[0] + delta)

    async def metered_app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        add(in_flight, 1)
        try:
            await app(scope, receive, send)
        finally:
            add(in_flight, -1)
            add(served, 1)

    return metered_app
