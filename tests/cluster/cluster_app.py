"""A cluster program for the tests, configured by environment variables.

The primary prints one JSON line per event on stdout, so a test can assert what
fired and with which arguments. Workers serve a tiny HTTP/1.1 app:
``/`` -> pid, ``/cpu?n=N`` -> busy loop, ``/sleep?s=S`` -> slow answer,
``/corrupt`` -> writes garbage into this worker's own channel (to test that the
primary survives a corrupt frame), ``/exit?code=C`` -> os._exit(C).
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
import time
from typing import Any
from urllib.parse import parse_qs, urlsplit

from allcores import cluster

WORKERS = int(os.environ.get("APP_WORKERS", "2"))
PORT = int(os.environ["APP_PORT"])
BOOT_FAIL = os.environ.get("APP_BOOT_FAIL") == "1"
# A worker started while this file exists fails to boot: a reload of broken code.
BOOT_FAIL_FILE = os.environ.get("APP_BOOT_FAIL_FILE", "")
# ... or, for this one, never gets to listening (a boot that hangs).
BOOT_HANG_FILE = os.environ.get("APP_BOOT_HANG_FILE", "")
SERVERS: list[Any] = []

if cluster.is_primary:

    class OnlyInThePrimary:
        """Pickled as __main__.OnlyInThePrimary, which a worker's __main__ lacks."""


def say(**fields: Any) -> None:
    # One write() per line: the primary and its workers share this pipe, and print()
    # may write the text and its newline separately, interleaving lines.
    os.write(1, (json.dumps(fields) + "\n").encode())


def primary() -> int:
    settings: dict[str, Any] = {
        "scheduling_policy": os.environ.get("APP_POLICY", "balanced"),
        "respawn": os.environ.get("APP_RESPAWN") == "1",
        "respawn_delay": 0.05,
        "crash_loop_limit": int(os.environ.get("APP_CRASH_LIMIT", "5")),
        "crash_loop_window": 30.0,
        "graceful_timeout": float(os.environ.get("APP_GRACE", "10")),
        "ready_timeout": float(os.environ.get("APP_READY_TIMEOUT", "60")),
    }
    cluster.setup_primary(**settings)
    cluster.on("fork", lambda w: say(event="fork", id=w.id, pid=w.pid))
    cluster.on("online", lambda w: say(event="online", id=w.id, pid=w.pid))
    cluster.on(
        "listening",
        lambda w, a: say(event="listening", id=w.id, pid=w.pid, address=a.address, port=a.port),
    )
    cluster.on("disconnect", lambda w: say(event="disconnect", id=w.id, pid=w.pid))
    cluster.on(
        "exit",
        lambda w, code, sig: say(
            event="exit",
            id=w.id,
            pid=w.pid,
            code=code,
            signal=sig,
            planned=w.exited_after_disconnect,
        ),
    )

    def on_message(worker: cluster.Worker, message: Any, handle: socket.socket | None) -> None:
        say(event="message", id=worker.id, message=message, handle=handle is not None)
        if isinstance(message, dict) and "ping" in message and handle is not None:
            # Send the socket straight back, with a reply: a round trip with a handle.
            worker.send({"pong": message["ping"]}, handle)
            handle.close()
        if message == "disconnect me":
            worker.disconnect()

    cluster.on("message", on_message)

    if os.environ.get("APP_SEND_UNPICKLABLE") == "1":

        def send_twice(worker: cluster.Worker, address: Any) -> None:
            worker.send(OnlyInThePrimary())
            worker.send("after")

        cluster.on("listening", send_twice)
    if os.environ.get("APP_DISCONNECT_ALL") == "1":

        def disconnect_when_all_listen(worker: cluster.Worker, address: Any) -> None:
            if sum(w.state == "listening" for w in cluster.workers.values()) == WORKERS:
                cluster.disconnect(lambda: say(event="all-gone"))

        cluster.on("listening", disconnect_when_all_listen)
    for _ in range(WORKERS):
        cluster.fork()
    code = cluster.run()
    say(event="primary-exit", code=code)
    return code


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            target = urlsplit(head.split(b" ", 2)[1].decode())
            query = {k: v[0] for k, v in parse_qs(target.query).items()}
            body = str(os.getpid())
            if target.path == "/cpu":
                total = 0
                for i in range(int(query.get("n", "1000000"))):
                    total += i
                body = f"{os.getpid()} {total}"
            elif target.path == "/sleep":
                await asyncio.sleep(float(query.get("s", "1")))
                body = f"{os.getpid()} slept"
            elif target.path == "/corrupt":
                assert cluster.worker is not None
                # Bypass the channel: write a frame with a bad magic to the primary.
                cluster.worker._sock.send(b"\xde\xad\xbe\xef" * 4)
            elif target.path == "/disconnect-me":
                assert cluster.worker is not None
                cluster.worker.send("disconnect me")
            elif target.path == "/busy-then-close":
                # Block the loop (connections pile up unread in our channel), then
                # close our server while they are still queued.
                time.sleep(float(query.get("s", "1")))
                SERVERS[0].close()
            elif target.path == "/exit":
                os._exit(int(query.get("code", "3")))
            data = body.encode()
            closing = cluster.worker is not None and cluster.worker.disconnecting
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Length: "
                + str(len(data)).encode()
                + (b"\r\nConnection: close" if closing else b"")
                + b"\r\n\r\n"
                + data
            )
            await writer.drain()
            if closing:
                break
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def worker_main() -> None:
    assert cluster.worker is not None
    me = cluster.worker
    if BOOT_FAIL or (BOOT_FAIL_FILE and os.path.exists(BOOT_FAIL_FILE)):
        print(f"worker {me.id}: cannot boot: missing configuration APP_SECRET", file=sys.stderr)
        sys.exit(3)
    if BOOT_HANG_FILE and os.path.exists(BOOT_HANG_FILE):
        time.sleep(3600)
    os.write(1, f"worker {me.id} up\n".encode())  # not JSON: ignored by the event reader
    # A slow boot (imports, warm-up) that a stop may interrupt; blocking on purpose.
    time.sleep(float(os.environ.get("APP_BOOT_DELAY", "0")))
    got: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

    def on_message(message: Any, handle: socket.socket | None) -> None:
        if message == "after":
            me.send("got after")
            return
        if not got.done():
            got.set_result((message, handle))

    me.on("message", on_message)
    if os.environ.get("APP_MODE") == "listen":
        # Another server library on the cluster's socket: here plain asyncio.
        try:
            sock = await cluster.listen("127.0.0.1", PORT)
        except cluster.WorkerError as exc:
            say(event="listen-refused", id=me.id, error=str(exc))
            await asyncio.sleep(3600)
            return
        plain = await asyncio.start_server(handle, sock=sock)
        async with plain:
            await plain.serve_forever()
        return
    server = await cluster.start_server(handle, "127.0.0.1", PORT)
    SERVERS.append(server)
    if os.environ.get("APP_PING") == "1":
        mine, theirs = socket.socketpair()
        me.send({"ping": me.id}, theirs)
        theirs.close()
        message, returned = await asyncio.wait_for(got, 10)
        returned.sendall(b"through the handle")
        say(event="pong", id=me.id, message=message, data=mine.recv(100).decode())
        returned.close()
        mine.close()
    await server.serve_forever()
    say(event="worker-done", id=me.id, at=time.time())


if __name__ == "__main__":
    if cluster.is_primary:
        sys.exit(primary())
    asyncio.run(worker_main())
