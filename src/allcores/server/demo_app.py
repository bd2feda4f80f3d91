"""The seed's demo as an app for `allcores serve`; `allcores demo` serves it.

``/`` answers from a worker at once; ``/cpu`` sums 20,000,000 numbers in a pool
process through `offload`, so ``/`` stays fast while it runs. Each worker's pool has
DEMO_POOL processes (1), at a lower CPU priority than the workers; CPU_N sets the count.
"""

from __future__ import annotations

import os
from typing import Any

from allcores.pool import Pool, offload, set_default_pool

CPU_N = int(os.environ.get("CPU_N", "20000000"))


def busy_sum(n: int) -> int:
    total = 0
    for i in range(n):
        total += i
    return total


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                set_default_pool(Pool(max_workers=int(os.environ.get("DEMO_POOL", "1"))))
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                pool = set_default_pool(None)
                if pool is not None:
                    await pool.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return
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
