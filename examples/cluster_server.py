"""The seed's `server.js` in Python: a primary forks one worker per CPU; every worker
serves on port 8000.

    python examples/cluster_server.py        # or: allcores demo
    curl localhost:8000/                     # Hello from Worker <pid>!  (different pids)
    curl localhost:8000/cpu                  # busy for ~1 s in one worker; / still answers
    kill -9 <a worker pid>                   # "Worker <pid> died", and a new one starts

PORT overrides the port, CPU_N the loop count of /cpu (default 20,000,000, about as
long in CPython as the seed's 1e9 additions in V8). Only the standard library and
allcores.
"""

from __future__ import annotations

import asyncio
import os
import sys

from allcores import available_cpus, cluster

PORT = int(os.environ.get("PORT", "8000"))
CPU_N = int(os.environ.get("CPU_N", "20000000"))


def busy_sum(n: int) -> int:
    total = 0
    for i in range(n):
        total += i
    return total


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A minimal HTTP/1.1 responder: enough for curl, browsers and wrk (keep-alive)."""
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            path = head.split(b" ", 2)[1].decode() if head.count(b" ") >= 2 else "/"
            if path == "/cpu":
                body = f"Hello from Worker {os.getpid()}! Sum: {busy_sum(CPU_N)}\n"
            else:
                body = f"Hello from Worker {os.getpid()}!\n"
            closing = b"connection: close" in head.lower() or (
                cluster.worker is not None and cluster.worker.disconnecting
            )
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                + f"Content-Length: {len(body)}\r\n".encode()
                + (b"Connection: close\r\n" if closing else b"")
                + b"\r\n"
                + body.encode()
            )
            await writer.drain()
            if closing:
                break
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
        pass
    finally:
        writer.close()


def main() -> int:
    if cluster.is_primary:
        print(f"Primary {os.getpid()} is running", flush=True)
        # Respawn what dies, as the seed's comment suggests; a crash loop still stops.
        cluster.setup_primary(respawn=True)
        for _ in range(available_cpus()):
            cluster.fork()

        def on_exit(worker: cluster.Worker, code: int | None, signal: str | None) -> None:
            print(f"Worker {worker.pid} died", flush=True)

        cluster.on("exit", on_exit)
        return cluster.run()

    async def serve() -> None:
        server = await cluster.start_server(handle, port=PORT)
        print(f"Worker {os.getpid()} started", flush=True)
        await server.serve_forever()

    asyncio.run(serve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
