"""The seed's experiment as an ASGI app: `/` says hello, `/cpu` burns ~55 ms of CPU.

SEED_MODE chooses where `/cpu` runs:
    inline    in the event loop (blocks every other request)
    ppe       loop.run_in_executor(ProcessPoolExecutor(2)), the stdlib answer
    allcores  await allcores.pool.Pool(max_workers=2).run(...) (SEED_POOL_NICE sets nice=)
    offload   await allcores.offload(...) (the pool `allcores serve` shares); the hook for
              the `allcores serve` variant, which runs this app under that server

The pool is made at lifespan start-up and shut down at lifespan end, so a SIGTERM to
the server leaves no pool process behind.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
from collections.abc import Awaitable, Callable
from concurrent.futures import ProcessPoolExecutor
from typing import Any

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

MODE = os.environ.get("SEED_MODE", "inline")
# 2,000,000 additions: about 55 ms of pure Python on this machine (benchmarks/README.md).
CPU_LOOP_N = int(os.environ.get("SEED_CPU_N", "2000000"))
POOL_WORKERS = 2

_pool: Any = None


def cpu_loop(n: int) -> int:
    total = 0
    for i in range(n):
        total += i
    return total


async def _run_cpu() -> int:
    if MODE == "inline":
        return cpu_loop(CPU_LOOP_N)
    if MODE == "ppe":
        return await asyncio.get_running_loop().run_in_executor(_pool, cpu_loop, CPU_LOOP_N)
    if MODE == "allcores":
        result: int = await _pool.run(cpu_loop, CPU_LOOP_N)
        return result
    if MODE == "offload":
        from allcores import offload

        offloaded: int = await offload(cpu_loop, CPU_LOOP_N)
        return offloaded
    raise ValueError(f"unknown SEED_MODE {MODE!r}")


async def _lifespan(receive: Receive, send: Send) -> None:
    global _pool
    message = await receive()
    if message["type"] == "lifespan.startup":
        if MODE == "ppe":
            _pool = ProcessPoolExecutor(
                POOL_WORKERS, mp_context=multiprocessing.get_context("fork")
            )
        elif MODE == "allcores":
            from allcores.pool import Pool

            # SEED_POOL_NICE=0 runs the workers at the server's priority, to tell the
            # cost of dispatch apart from the effect of the pool's default niceness.
            nice = os.environ.get("SEED_POOL_NICE")
            if nice:
                _pool = Pool(max_workers=POOL_WORKERS, nice=int(nice))
            else:
                _pool = Pool(max_workers=POOL_WORKERS)
        await send({"type": "lifespan.startup.complete"})
    message = await receive()
    if message["type"] == "lifespan.shutdown":
        if _pool is not None:
            _pool.shutdown(wait=True)
        await send({"type": "lifespan.shutdown.complete"})


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        await _lifespan(receive, send)
        return
    if scope["type"] != "http":
        return
    body = b"hello"
    if scope["path"] == "/cpu":
        body = str(await _run_cpu()).encode()
    headers = [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})
