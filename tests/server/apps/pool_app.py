"""An ASGI app whose handlers `offload` to the server's shared pool, for the tests.

``/`` -> "<pid>"; ``/offload?fn=F&...`` -> what F returned in a pool process, or
"<ErrorType>: <message>" with status 500:
  whoami              -> "<pid> <parent pid> <niceness> <process title>"
  sleep&s=S           -> sleeps S seconds (``&timeout=T`` gives offload a limit)
  crash               -> the pool process exits with code 7
  raise               -> ValueError, whose remote traceback is in the body
``/cancel?s=S&after=A`` -> "cancelled" once asyncio.wait_for gives up a running task;
``/flood?n=N&s=S`` -> one sleep, then (once it runs) N - 1 more at once:
"<ok> <queue full>".
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any
from urllib.parse import parse_qs

from allcores import offload
from allcores.pool import QueueFullError


def whoami() -> str:
    with open(f"/proc/{os.getpid()}/cmdline", "rb") as file:
        title = file.read().split(b"\0")[0].decode()
    return f"{os.getpid()} {os.getppid()} {os.nice(0)} {title}"


def sleep(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def crash() -> None:
    os._exit(7)


def fail_here() -> None:
    raise ValueError("raised in the pool process")


async def _handle(path: str, query: dict[str, list[str]]) -> str:
    if path == "/offload":
        fn = query["fn"][0]
        timeout = float(query["timeout"][0]) if "timeout" in query else None
        if fn == "whoami":
            return await offload(whoami)
        if fn == "sleep":
            return str(await offload(sleep, float(query["s"][0]), timeout=timeout))
        if fn == "crash":
            return str(await offload(crash))
        return str(await offload(fail_here))
    if path == "/cancel":
        try:
            await asyncio.wait_for(offload(sleep, float(query["s"][0])), float(query["after"][0]))
        except TimeoutError:
            return "cancelled"
        return "not cancelled"
    if path == "/flood":
        seconds = float(query["s"][0])
        first = asyncio.ensure_future(offload(sleep, seconds))
        await asyncio.sleep(seconds / 4)  # a pool process has taken it by now
        calls = [offload(sleep, seconds) for _ in range(int(query["n"][0]) - 1)]
        results = await asyncio.gather(first, *calls, return_exceptions=True)
        full = sum(isinstance(result, QueueFullError) for result in results)
        ok = sum(result == seconds for result in results)
        return f"{ok} {full}"
    return str(os.getpid())


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    status = 200
    try:
        body = await _handle(scope["path"], parse_qs(scope["query_string"].decode()))
    except Exception as exc:
        status = 500
        body = f"{type(exc).__name__}: {exc}\n{exc.__cause__ or ''}"
    headers = [(b"content-type", b"text/plain")]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body.encode()})
