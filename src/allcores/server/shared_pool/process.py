"""One process of the shared CPU pool ("allcores: pool 2 main:app"): take a task when
idle, run it, answer, and die at once if its caller gives up.

::

    loop:
      accept()  ── only an idle process calls it, so the kernel's accept queue of the
                   pool's socket is the queue, and every task goes to an idle process
      read the TASK frame (the fn, its arguments; the time it was queued in the head)
      arm two kernel-side kills, so that no Python code has to notice anything:
        O_ASYNC on the connection: the caller closes it (cancel, or the HTTP worker
          died) ─► SIGIO, whose default action ends this process
        timeout: ITIMER_REAL ─► SIGALRM, whose default action ends it too
      the caller already gone (it cancelled while the task waited)? skip the task
      run it (`allcores.pool._protocol.run_task`: the same as a pool worker does)
      disarm both, send RESULT | ERROR, close the connection, accept the next

The primary sees the process end (SIGIO, SIGALRM or a crash), counts why, and forks a
replacement (`owner.py`). Default signal actions kill even code stuck in C, where a
Python handler would wait for the next bytecode.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import select
import signal
import socket
import struct
import sys
import time
from typing import Any

from allcores.errors import ChannelError
from allcores.ipc.frames import FrameReader, close_fds, fds_ancillary, frame_header
from allcores.observe.scoreboard import Row, RowState, Scoreboard
from allcores.pool._protocol import SPIN_GAP, TASK, WORKER_SPIN, RowWriter, run_task
from allcores.pool._serialize import read_head

__all__ = ["PROCESS_ENV", "serve_tasks"]

PROCESS_ENV = "ALLCORES_POOL_PROCESS"
# A caller writes its task right after connecting; one that has not within this
# long is not going to (a caller stuck, or a stranger), and must not hold a CPU slot.
_READ_TIMEOUT = 10.0
_READ_TIMEOUT_VALUE = struct.pack("ll", int(_READ_TIMEOUT), 0)
_UCRED = struct.Struct("3i")
_PID = os.getpid()  # set again by prepare(), in the process itself


def serve_tasks(listener: socket.socket, row: Row | None) -> None:
    """Run tasks from *listener* one at a time, forever (the primary kills this process)."""
    writer = RowWriter(row)
    uid = os.getuid()
    keep: list[Any] = []
    replied_at = 0.0
    poller = select.poll()
    poller.register(listener, select.POLLIN)
    while True:
        conn = _next_connection(listener, poller, time.perf_counter() - replied_at < SPIN_GAP)
        # A connection from another user is refused: a task is code to run.
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
        if _UCRED.unpack(creds)[1] != uid:
            conn.close()
            continue
        frame = _read_task(conn)
        if frame is None:
            conn.close()
            continue
        payload, fds = frame
        kind, _nbuf, _nuser, task_id, queued_at = read_head(payload)
        # The task's time limit, in µs in the task id (client.py); 0: none.
        limit = task_id / 1_000_000 if task_id > 0 else 0.0
        _arm(conn, limit)
        if kind != TASK or _caller_gone(conn):
            _disarm(conn, limit)
            close_fds(fds)
            conn.close()
            continue
        if row is not None:
            row.observe("wait", max(0.0, time.monotonic() - queued_at))
        writer.start()
        started = time.perf_counter()
        packed = run_task(kind, task_id, payload, fds, keep)
        ran = time.perf_counter() - started
        _disarm(conn, limit)
        del payload
        writer.finish()
        if row is not None:
            row.observe("latency", ran)
        with contextlib.suppress(OSError):
            data = frame_header(len(packed.payload), len(packed.fds)) + packed.payload
            sent = conn.sendmsg([data], fds_ancillary(packed.fds))
            if sent < len(data):
                conn.sendall(memoryview(data)[sent:])
        replied_at = time.perf_counter()
        packed.close()
        keep.clear()
        conn.close()


def _next_connection(listener: socket.socket, poller: select.poll, spin: bool) -> socket.socket:
    """The next task's connection. A process whose last task came right after the
    one before (a caller sending tasks one by one) looks for the next one for
    WORKER_SPIN before it sleeps in accept: being woken costs a cross-CPU wake-up,
    as in the pool's own workers (`allcores.pool._protocol`). It looks with poll:
    the listening socket's blocking mode is shared by every pool process."""
    if spin:
        until = time.perf_counter() + WORKER_SPIN
        while not poller.poll(0) and time.perf_counter() < until:
            os.sched_yield()
    # Another process may take the connection that poll saw: then this one waits.
    return listener.accept()[0]


def _read_task(conn: socket.socket) -> tuple[bytes | bytearray, list[int]] | None:
    """The one frame a caller sends, or None if it sends none in time."""
    reader = FrameReader()
    # In the kernel, not Python's timeout mode, which would make the socket
    # non-blocking and every call below poll first.
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _READ_TIMEOUT_VALUE)
    try:
        while True:
            if not reader.read_from(conn):
                return None
            frames = reader.frames()
            if frames:
                for _payload, extra in frames[1:]:
                    close_fds(extra)
                return frames[0]
    except (ChannelError, OSError):
        return None
    finally:
        reader.discard()


def _arm(conn: socket.socket, limit: float) -> None:
    fd = conn.fileno()
    fcntl.fcntl(fd, fcntl.F_SETOWN, _PID)
    # An accepted socket's flags are known: blocking, read and write.
    fcntl.fcntl(fd, fcntl.F_SETFL, os.O_RDWR | os.O_ASYNC)
    if limit:
        signal.setitimer(signal.ITIMER_REAL, limit)


def _disarm(conn: socket.socket, limit: float) -> None:
    if limit:
        signal.setitimer(signal.ITIMER_REAL, 0)
    fcntl.fcntl(conn.fileno(), fcntl.F_SETFL, os.O_RDWR)


def _caller_gone(conn: socket.socket) -> bool:
    """True when the caller closed its end: it cancelled while the task waited. Checked
    after O_ASYNC is on, so a close from now on raises SIGIO instead."""
    try:
        return conn.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def prepare(number: int, app_name: str, nice: int) -> None:
    """What every pool process does first, forked or started as a program."""
    from allcores.server.titles import set_title

    global _PID
    _PID = os.getpid()
    # SIGINT / SIGTERM / SIGHUP reach process groups and whole cgroups (Ctrl-C,
    # systemd's stop): the pool must outlive the HTTP workers' drain, whose requests
    # may wait on it. The primary ends it with SIGKILL once they are gone.
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)
    # The kills armed around each task (above) are these signals' default actions.
    signal.signal(signal.SIGIO, signal.SIG_DFL)
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    if nice:
        with contextlib.suppress(OSError):
            os.nice(nice)
    set_title(f"pool {number} {app_name}")


def run_forked(
    listener: socket.socket,
    number: int,
    row: int,
    zygote_pid: int,
    board_fd: int,
    rows: int,
    app_name: str,
    nice: int,
) -> int:  # pragma: no cover - runs in a pool process forked by --preload's zygote
    """A pool process forked from the zygote of `allcores serve --preload`."""
    from allcores._system import die_with_parent

    die_with_parent(zygote_pid)  # which dies with the primary
    prepare(number, app_name, nice)
    board = Scoreboard.attach(board_fd, rows)
    serve_tasks(listener, _claim(board, row))
    return 0


def _claim(board: Scoreboard, index: int) -> Row:
    row = board.row(index)
    row.set("pid", os.getpid())
    row.set("state", RowState.READY)
    row.beat()
    return row


def main() -> int:
    """``python -m allcores.server.shared_pool.process``, started by the primary."""
    from allcores._system import die_with_parent

    text = os.environ.pop(PROCESS_ENV, None)
    if text is None:
        print("allcores.server.shared_pool.process is started by `allcores serve`", file=sys.stderr)
        return 2
    spec = json.loads(text)
    die_with_parent(spec["primary_pid"])
    # Tasks name their functions by module (main.fib): import them as a worker would.
    sys.path.insert(0, os.path.abspath(spec["app_dir"]))
    prepare(spec["number"], spec["app_name"], spec["nice"])
    board = Scoreboard.attach(spec["board_fd"], spec["rows"])
    listener = socket.socket(fileno=spec["listener_fd"])
    serve_tasks(listener, _claim(board, spec["row"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
