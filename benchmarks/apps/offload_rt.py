"""The app behind benchmarks/bench_offload.py: `/rt?n=N&c=C` times N offloads of a
tiny function from inside a handler, C at a time, and answers the mean microseconds
per call (and per call in flight for C > 1: the throughput)."""

from __future__ import annotations

import asyncio
import time
from typing import Any
from urllib.parse import parse_qs

from allcores import offload


def echo(x: int) -> int:
    return x


async def _calls(n: int) -> None:
    for _ in range(n):
        await offload(echo, 1)


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    query = parse_qs(scope["query_string"].decode())
    n = int(query.get("n", ["2000"])[0])
    c = int(query.get("c", ["1"])[0])
    await asyncio.gather(*(_calls(50) for _ in range(c)))  # warm: every process used
    started = time.perf_counter()
    await asyncio.gather(*(_calls(n // c) for _ in range(c)))
    micros = (time.perf_counter() - started) / (n // c * c) * 1e6
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": f"{micros:.2f}".encode()})
