"""A zygote: one small process, forked early, that forks children on request.

Why: a child forked from a process that has threads can deadlock on a lock another
thread held at the fork, and multiprocessing's way around it (forkserver, spawn)
re-imports ``__main__``, so a script with no ``if __name__ == "__main__":`` guard runs
again in every replacement worker. A pool forks its zygote when it is created, while
its own loop thread does not exist yet, and every worker comes from there: the
zygote is single-threaded for life, keeps the memory the parent had at that moment
(as a plain fork does), and re-executes nothing.

::

    parent (any thread, under a lock)                 zygote (blocking loop, no threads)
    spawn(sock, name) ── ("spawn", name, n) + fd ───►  multiprocessing fork Process:
                      ◄─ ("started", n, pid) | ("failed", n, message)   target(sock, *args)
    kill(pid) ─────────── ("kill", pid) ────────────►  SIGKILL, if still its unreaped child
    close() ───────────── end of the requests ──────►  SIGKILL every child, reap, exit 0

    parent (event loop: `watch`)                      zygote
    on_exit(pid, code) ◄─ ("exited", pid, exit code)   a child's pidfd turned readable

The zygote dies with its parent (PR_SET_PDEATHSIG), and its children die with it.
Its requests and its notices use two sockets, so that a spawn's reply is read by the
thread that asked, while the event loop alone reads the notices.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import select
import signal
import socket
import sys
import threading
import traceback
from collections.abc import Callable
from typing import Any, NoReturn

from allcores._system import die_with_parent
from allcores.child.fds import register_parent_end
from allcores.errors import ChannelClosed
from allcores.ipc.channel import Channel, channel_pair

__all__ = ["Zygote", "ZygoteError"]

# How long a spawn waits for the zygote's answer: a fork takes about a millisecond,
# but a machine under memory pressure can take far longer; past this the zygote is
# taken for hung and the spawn fails with an error that says so.
SPAWN_TIMEOUT = 30.0
# How long close() waits for the zygote to reap its children and exit before it is
# killed: it SIGKILLs them at once, so this is only reached if it is stopped itself.
CLOSE_TIMEOUT = 5.0

OnExit = Callable[[int, int | None], None]


class ZygoteError(RuntimeError):
    """The zygote could not start a child, or is gone."""


class Zygote:
    """Forks a zygote now; `spawn` then starts ``target(sock, *args)`` children from it."""

    def __init__(self, target: Callable[..., object], args: tuple[Any, ...] = ()) -> None:
        requests, requests_child = channel_pair()
        notices, notices_child = channel_pair()
        parent = os.getpid()
        # Flushed first, or text buffered in the parent would be written twice.
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        try:
            pid = os.fork()
        except BaseException:
            for sock in (requests, requests_child, notices, notices_child):
                sock.close()
            raise
        if pid == 0:  # pragma: no cover - the zygote; covered through every pool test
            try:
                requests.close()
                notices.close()
                _serve(requests_child, notices_child, parent, target, args)
            finally:
                os._exit(1)
        requests_child.close()
        notices_child.close()
        self.pid = pid
        self._requests = Channel(requests)
        self._notices = notices
        self._lock = threading.Lock()
        self._watched: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self._spawns = 0
        self._notices_fd = notices.fileno()  # a closed socket forgets its number
        register_parent_end(requests)
        register_parent_end(notices)

    def spawn(self, sock: socket.socket, name: str) -> int:
        """Start a child that gets *sock*; returns its pid. Safe from any thread."""
        with self._lock:
            if self._closed:
                raise ZygoteError("the pool's zygote is closed")
            self._spawns += 1
            number = self._spawns
            try:
                self._requests.send(("spawn", name, number), [sock.fileno()])
                # An earlier spawn cut short (Ctrl-C) left its reply unread: skip it.
                # Its child got EOF for a channel, and has exited.
                reply: tuple[Any, ...] = ("", 0)
                while reply[1] != number:
                    reply, _fds = self._requests.recv(timeout=SPAWN_TIMEOUT)
            except (OSError, ChannelClosed, TimeoutError) as exc:
                raise ZygoteError(
                    f"the pool's zygote (pid {self.pid}) did not start a worker: {exc!r}"
                ) from exc
        if reply[0] != "started":
            raise ZygoteError(f"the pool's zygote could not fork a worker: {reply[2]}")
        return int(reply[2])

    def kill(self, pid: int) -> None:
        """SIGKILL the child *pid*, if it has not been reaped yet."""
        with self._lock:
            if not self._closed:
                with contextlib.suppress(OSError, ChannelClosed):
                    self._requests.send(("kill", pid))

    def watch(self, loop: asyncio.AbstractEventLoop, on_exit: OnExit) -> None:
        """Call ``on_exit(pid, exit code)`` on *loop* as each child exits. Exit codes
        follow multiprocessing: -N for signal N, None if the zygote itself died."""
        if self._watched is loop or self._closed:
            return
        reader = Channel(self._notices)
        fd = self._notices.fileno()

        def on_readable() -> None:
            try:
                while reader.poll():
                    notice, _fds = reader.recv()
                    on_exit(int(notice[1]), notice[2])
            except (ChannelClosed, OSError):
                # The zygote is gone, and its children with it (PR_SET_PDEATHSIG).
                loop.remove_reader(fd)
                on_exit(-1, None)

        loop.add_reader(fd, on_readable)
        # Only now: a Ctrl-C before this line leaves the next call to do it all again.
        self._watched = loop

    def unwatch(self) -> None:
        loop, self._watched = self._watched, None
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(ValueError, RuntimeError, OSError):
                loop.remove_reader(self._notices_fd)

    def close(self) -> None:
        """Kill the children still alive, end the zygote and reap it (bounded)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self.unwatch()
            self._requests.close()
            self._notices.close()
        if not _wait_for_exit(self.pid, CLOSE_TIMEOUT):
            with contextlib.suppress(OSError):
                os.kill(self.pid, signal.SIGKILL)
            _wait_for_exit(self.pid, None)


def _wait_for_exit(pid: int, timeout: float | None) -> bool:
    """Reap our child *pid*; False if it is still running after *timeout*."""
    try:
        if timeout is not None and hasattr(os, "pidfd_open"):
            pidfd = os.pidfd_open(pid)
            try:
                if not select.select([pidfd], [], [], timeout)[0]:
                    return False
            finally:
                os.close(pidfd)
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass  # reaped by someone else (a SIGCHLD handler, os.wait())
    except ProcessLookupError:
        pass
    return True


def _serve(
    requests_sock: socket.socket,
    notices_sock: socket.socket,
    parent: int,
    target: Callable[..., object],
    args: tuple[Any, ...],
) -> NoReturn:  # pragma: no cover - runs in the zygote
    """The zygote's life. It runs no user code and takes no lock a thread could
    have held at its fork: syscalls, and multiprocessing's fork start method."""
    die_with_parent(parent)
    # Ctrl-C reaches the whole process group; the parent decides what stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Children close these (`allcores.child.fds`): they are no business of theirs.
    register_parent_end(requests_sock)
    register_parent_end(notices_sock)
    requests = Channel(requests_sock)
    notices = Channel(notices_sock)
    context = multiprocessing.get_context("fork")
    me = os.getpid()
    children: dict[int, Any] = {}  # pidfd -> multiprocessing.Process, still unreaped

    def handle(request: tuple[Any, ...], fds: list[int]) -> None:
        if request[0] == "kill":
            for process in children.values():
                if process.pid == request[1]:
                    with contextlib.suppress(OSError):
                        os.kill(process.pid, signal.SIGKILL)
            return
        child_sock = socket.socket(fileno=fds[0])
        try:
            process = context.Process(target=target, args=(child_sock, me, *args), name=request[1])
            process.start()
            pidfd = os.pidfd_open(process.pid or 0)
        except Exception as exc:
            requests.send(("failed", request[2], "".join(traceback.format_exception_only(exc))))
            return
        finally:
            child_sock.close()
        children[pidfd] = process
        poller.register(pidfd, select.POLLIN)
        requests.send(("started", request[2], process.pid))

    poller = select.poll()
    poller.register(requests_sock, select.POLLIN)
    try:
        while True:
            for fd, _event in poller.poll():
                if fd != requests_sock.fileno():
                    process = children.pop(fd)
                    poller.unregister(fd)
                    os.close(fd)
                    process.join()
                    notices.send(("exited", process.pid, process.exitcode))
                    continue
                # Every request that has come: one read may bring several, and those
                # past the first wait in the channel, where poll(2) cannot see them.
                while True:
                    try:
                        handle(*requests.recv())
                    except ChannelClosed:
                        raise SystemExit(0) from None
                    if not requests.poll():
                        break
    finally:
        for process in children.values():
            with contextlib.suppress(OSError):
                os.kill(process.pid, signal.SIGKILL)
        for process in children.values():
            process.join()
        os._exit(0)
