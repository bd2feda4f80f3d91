"""The seed's demo as an app for `allcores serve`; `allcores demo` serves it.

``/`` answers from a worker at once; ``/cpu`` sums 20,000,000 numbers (CPU_N) in a
process of the server's shared pool through `offload`, so ``/`` stays fast while it
runs: the pool's processes run at a lower CPU priority than the workers.
"""

from __future__ import annotations

import os
from typing import Any

from allcores.pool import offload

CPU_N = int(os.environ.get("CPU_N", "20000000"))


def busy_sum(n: int) -> int:
    total = 0
    for i in range(n):
        total += i
    return total


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    if scope["path"] == "/cpu":
        body = f"Hello from Worker {os.getpid()}! Sum: {await offload(busy_sum, CPU_N)}\n"
    elif scope["path"] == "/":
        body = f"Hello from Worker {os.getpid()}!\n"
    else:
        body = "Not found: try / or /cpu\n"
    status = 404 if body.startswith("Not found") else 200
    headers = [(b"content-type", b"text/plain; charset=utf-8")]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body.encode()})
