"""A bare ASGI app for the serve tests, with a lifespan, configured by environment.

``/`` -> "<pid> <pids whose lifespan started in this process>", ``/sleep?s=S`` -> a
slow answer, ``/block?s=S`` -> blocks the event loop for S seconds, ``/echo`` -> the
response's head at once, then the request's body back once it has all come;
APP_LIFESPAN_FAIL=1 -> the lifespan startup fails with a message.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any
from urllib.parse import parse_qs

started: list[int] = []


def block_the_loop(seconds: float) -> None:
    time.sleep(seconds)  # what a CPU-bound handler does to its loop


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                if os.environ.get("APP_LIFESPAN_FAIL") == "1":
                    failure = "database unreachable at db:5432"
                    await send({"type": "lifespan.startup.failed", "message": failure})
                    return
                started.append(os.getpid())
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["path"] == "/echo":
        await send({"type": "http.response.start", "status": 200, "headers": []})
        body, message = b"", {"more_body": True}
        while message.get("more_body"):
            message = await receive()
            body += message.get("body", b"")
        await send({"type": "http.response.body", "body": body})
        return
    query = parse_qs(scope["query_string"].decode())
    if scope["path"] == "/sleep":
        await asyncio.sleep(float(query["s"][0]))
    elif scope["path"] == "/block":
        block_the_loop(float(query["s"][0]))
    body = f"{os.getpid()} {' '.join(map(str, started))}".encode()
    headers = [(b"content-type", b"text/plain")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})
