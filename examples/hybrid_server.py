"""The seed's closing idea: the cluster balances requests over the workers, and each
worker sends `/cpu` to its own pool, so no event loop ever runs the CPU-heavy loop.

    python examples/hybrid_server.py         # or: allcores demo --example hybrid
    curl localhost:8000/                     # Hello from Worker <pid>!
    curl localhost:8000/cpu                  # the sum, computed in a pool process
    kill -9 <a worker pid>                   # "Worker <pid> died", and a new one starts

Sizing: W HTTP workers, each with a pool of P processes, with W + W*P = the usable
CPUs, so the machine is not oversubscribed when both kinds are busy: half the cores
serve HTTP, half compute (on 2 cores: 1 worker + 1 pool process). WORKERS and POOL
override the split; PORT the port (8000); CPU_N the loop count (20,000,000).
Pool processes run at a lower CPU priority than the workers, so `/` stays fast even
when the pools are saturated.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Awaitable, Callable

from allcores import Pool, available_cpus, cluster

PORT = int(os.environ.get("PORT", "8000"))
CPU_N = int(os.environ.get("CPU_N", "20000000"))
CPUS = available_cpus()
WORKERS = int(os.environ.get("WORKERS", str(max(1, CPUS // 2))))
POOL = int(os.environ.get("POOL", str(max(1, (CPUS - WORKERS) // WORKERS))))


def busy_sum(n: int) -> int:
    total = 0
    for i in range(n):
        total += i
    return total


def response(status: str, body: str, closing: bool) -> bytes:
    return (
        f"HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {len(body)}\r\n"
        + ("Connection: close\r\n" if closing else "")
        + "\r\n"
        + body
    ).encode()


def handler(pool: Pool) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                path = head.split(b" ", 2)[1].decode() if head.count(b" ") >= 2 else "/"
                status = "200 OK"
                if path == "/cpu":
                    try:
                        total = await pool.run(busy_sum, CPU_N)
                        body = f"Hello from Worker {os.getpid()}! Sum: {total}\n"
                    except Exception as exc:
                        print(f"/cpu failed: {exc!r}", file=sys.stderr, flush=True)
                        status, body = "500 Internal Server Error", "Error processing request.\n"
                else:
                    body = f"Hello from Worker {os.getpid()}!\n"
                closing = b"connection: close" in head.lower() or (
                    cluster.worker is not None and cluster.worker.disconnecting
                )
                writer.write(response(status, body, closing))
                await writer.drain()
                if closing:
                    break
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass
        finally:
            writer.close()

    return handle


def main() -> int:
    if cluster.is_primary:
        print(f"Primary {os.getpid()} is running", flush=True)
        print(f"{WORKERS} HTTP worker(s), each with a pool of {POOL} process(es)", flush=True)
        cluster.setup_primary(respawn=True)
        for _ in range(WORKERS):
            cluster.fork()

        def on_exit(worker: cluster.Worker, code: int | None, signal: str | None) -> None:
            print(f"Worker {worker.pid} died", flush=True)

        cluster.on("exit", on_exit)
        return cluster.run()

    async def serve() -> None:
        async with Pool(max_workers=POOL) as pool:
            server = await cluster.start_server(handler(pool), port=PORT)
            print(f"Worker {os.getpid()} started", flush=True)
            await server.serve_forever()

    asyncio.run(serve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
