"""The seed's worker_threads `main.js` + `worker-task.js` in Python: one event loop
serves HTTP on port 8001 and hands each /cpu request to a Worker, so / stays quick.

    python examples/worker_threads_server.py          # or: allcores demo --example worker-threads
    curl localhost:8001/                 # Hello from Main Thread (non-CPU path)!
    curl localhost:8001/cpu              # ~1 s in a Worker: Hello from Main Thread! Sum: ...
    curl localhost:8001/cpu & curl localhost:8001/    # / answers at once while /cpu computes
    curl localhost:8001/cpu & sleep 0.3; pkill -9 --newest --parent <main pid>
                                         # kills that request's Worker: a 500, and the
                                         # log says "Worker stopped with exit code -9"

PORT overrides the port, CPU_N the loop count of /cpu (default 20,000,000, about as
long in CPython as the seed's 1e9 additions in V8). Only the standard library and
allcores.

Like the seed, /cpu starts one Worker per request: simple, and each costs a process
start. The recommended form is a pool of long-lived processes, started once
(``await pool.run(busy_sum, n)``): it is served on /cpu-pool, and ``--pool`` makes
/cpu use it too.

    curl localhost:8001/cpu-pool         # the same answer, computed in a pool process
    python examples/worker_threads_server.py --pool   # /cpu goes to the pool as well

One thing the seed leaves out: a worker that dies without an answer (killed, out of
memory) sends no "message" and no "error", only "exit"; this server answers 500 then
too, where the seed's request would hang.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import socket
import sys
import traceback
from collections.abc import Awaitable, Callable

from allcores.pool import Pool
from allcores.worker import ParentPort, Worker

PORT = int(os.environ.get("PORT", "8001"))
CPU_N = int(os.environ.get("CPU_N", "20000000"))


def busy_sum(n: int) -> int:
    """The seed's CPU-bound loop."""
    total = 0
    for i in range(n):
        total += i
    return total


def sum_to(parent_port: ParentPort, worker_data: dict[str, int]) -> None:
    """worker-task.js: runs in the Worker process."""
    parent_port.post_message(busy_sum(worker_data["num"]))


async def cpu_in_a_worker() -> tuple[int, str]:
    """main.js's /cpu branch: one Worker for this request, answered by its events."""
    answer: asyncio.Future[tuple[int, str]] = asyncio.get_running_loop().create_future()

    def respond(status: int, body: str) -> None:
        if not answer.done():
            answer.set_result((status, body))

    worker = Worker(sum_to, worker_data={"num": CPU_N})
    worker.on("message", lambda result: respond(200, f"Hello from Main Thread! Sum: {result}\n"))

    @worker.on("error")
    def on_error(err: BaseException) -> None:
        traceback.print_exception(err)
        respond(500, "Error processing request.\n")

    @worker.on("exit")
    def on_exit(code: int) -> None:
        if code != 0:
            print(f"Worker stopped with exit code {code}", file=sys.stderr, flush=True)
            respond(500, "Error processing request.\n")

    return await answer


async def cpu_in_the_pool(pool: Pool) -> tuple[int, str]:
    """The recommended form: a task for a long-lived pool process; errors raise here."""
    try:
        total = await pool.run(busy_sum, CPU_N)
    except Exception as exc:
        traceback.print_exception(exc)
        return 500, "Error processing request.\n"
    return 200, f"Hello from Main Thread! Sum: {total}\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pool", action="store_true", help="serve /cpu from a process pool")
    args = parser.parse_args()
    # Ctrl-C is the normal way to stop a demo server; workers and pool follow us out.
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(use_pool=args.pool))
    return 0


Route = Callable[[], Awaitable[tuple[int, str]]]


def http_handler(
    routes: dict[str, Route],
) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """A minimal HTTP/1.1 responder: enough for curl, browsers and wrk (keep-alive)."""
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                parts = head.split(b" ", 2)
                path = parts[1].decode(errors="replace") if len(parts) == 3 else "/"
                route = routes.get(path)
                if route is None:
                    status, body = 200, "Hello from Main Thread (non-CPU path)!\n"
                else:
                    status, body = await route()
                reason = "OK" if status == 200 else "Internal Server Error"
                closing = b"connection: close" in head.lower()
                writer.write(
                    f"HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain\r\n"
                    f"Content-Length: {len(body)}\r\n".encode()
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

    return handle


async def serve(*, use_pool: bool) -> None:
    print(f"Main thread {os.getpid()} is running", flush=True)
    # The pool's processes start before the port opens, so /cpu-pool never waits
    # for them; its default size is one process per usable CPU.
    async with Pool() as pool:
        routes: dict[str, Route] = {
            "/cpu": cpu_in_a_worker,
            "/cpu-pool": lambda: cpu_in_the_pool(pool),
        }
        if use_pool:
            routes["/cpu"] = routes["/cpu-pool"]
        # Every interface, IPv6 and IPv4, as Node's listen(8001). The socket is made
        # here rather than by asyncio, whose name lookup would start a helper thread:
        # with one OS thread a Worker starts by a plain fork (a few ms), not through a
        # forkserver.
        if socket.has_dualstack_ipv6():
            listener = socket.create_server(
                ("", PORT), family=socket.AF_INET6, dualstack_ipv6=True, backlog=1024
            )
        else:
            listener = socket.create_server(("", PORT), backlog=1024)
        server = await asyncio.start_server(http_handler(routes), sock=listener)
        print(f"Server listening on port {PORT}", flush=True)
        async with server:
            await server.serve_forever()


if __name__ == "__main__":
    sys.exit(main())
