"""Hello world as a raw ASGI app: the smallest thing an HTTP server can serve.

Served by every server of the HTTP benchmark, so the comparison measures the server.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

_HEADERS = [(b"content-type", b"text/plain"), (b"content-length", b"5")]


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": _HEADERS})
    await send({"type": "http.response.body", "body": b"hello"})
