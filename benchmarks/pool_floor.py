"""The floor under one-by-one dispatch: two processes, a socketpair, pickle, nothing else.

A pool's one-by-one round trip (submit a tiny task, wait for its result) cannot cost
less than moving one small pickled frame to another process and one back. This
measures that and nothing more: a parent and one forked child joined by
``socket.socketpair()``, blocking sockets, no threads, no pool. The parent sends a
length-prefixed pickle of ``(task_id, inc, (i,))``, shaped like a pool's task; the
child unpickles it, calls ``inc``, and sends back a length-prefixed pickle of
``(task_id, result)``; the parent reads and unpickles it. Same task, same warm-up and
same number of round trips as the ``one_by_one`` workload, so each pool's one by one
reads as a multiple of this floor (benchmarks/README.md aims at ≤ 1.5x).
"""

from __future__ import annotations

import multiprocessing
import pickle
import socket
import struct
import time
from typing import Any, BinaryIO

from bench_tasks import inc

HEADER = struct.Struct("!I")  # the frame's length, then the frame


def _send(sock: socket.socket, obj: object) -> None:
    frame = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    sock.sendall(HEADER.pack(len(frame)) + frame)


def _recv(reader: BinaryIO) -> Any:
    """One frame, or None at end of stream (the buffered reader gets a small frame,
    header and body, in one recv())."""
    header = reader.read(HEADER.size)
    if not header:
        return None
    (length,) = HEADER.unpack(header)
    return pickle.loads(reader.read(length))


def _child(sock: socket.socket, parents_end: socket.socket) -> None:
    parents_end.close()  # inherited by fork; closed, so the parent's close ends the loop
    reader = sock.makefile("rb")
    while (task := _recv(reader)) is not None:
        task_id, fn, args = task
        _send(sock, (task_id, fn(*args)))


def measure_floor(n_tasks: int, warmup: int) -> float:
    """µs per round trip, over ``n_tasks`` round trips after ``warmup`` untimed ones."""
    parent, child = socket.socketpair()
    process = multiprocessing.get_context("fork").Process(target=_child, args=(child, parent))
    process.start()
    child.close()
    reader = parent.makefile("rb")

    def round_trips(first: int, count: int) -> None:
        for i in range(first, first + count):
            _send(parent, (i, inc, (i,)))
            reply = _recv(reader)
            if reply != (i, i + 1):
                raise RuntimeError(f"round trip {i} came back as {reply!r}")

    try:
        round_trips(0, warmup)
        start = time.perf_counter()
        round_trips(warmup, n_tasks)
        elapsed = time.perf_counter() - start
    finally:
        reader.close()
        parent.close()  # the child reads end of stream and returns
        process.join()
    return elapsed / n_tasks * 1e6
