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
      returns child n at once                            target(sock, *args)
    Spawned.pid (waits) ◄─ ("started", n, pid) | ("failed", n, message)
    kill(n) ───────────── ("kill", n) ──────────────►  SIGKILL child n, if still unreaped
    close() ───────────── end of the requests ──────►  SIGKILL every child, reap, exit 0

    parent (event loop: `watch`)                      zygote
    on_exit(n, code, None)  ◄─ ("exited", n, code)     child n's pidfd turned readable
    on_exit(n, None, why)   ◄─ ("failed", n, why)      child n could not be forked

A spawn does not wait for its answer: the pool asks for all its workers at once, and
sends each its set-up while the zygote forks it. Children are named by their spawn
number, which the parent knows at once and which is never reused (a pid is); the
pid is read from the zygote's answers only when someone asks for it.

The zygote dies with its parent (PR_SET_PDEATHSIG), and its children die with it.
Its answers and its notices use two sockets, so that any thread may read a pid,
while the event loop alone reads the notices.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing

# Imported here, once per process: multiprocessing imports it at a fork's first
# Process.start, which would otherwise be in every zygote, before its first fork.
import multiprocessing.popen_fork
import os
import select
import signal
import socket
import sys
import threading
import traceback
from collections.abc import Callable
from typing import Any, NoReturn

from allcores._system import die_with_parent, libc_prctl
from allcores.child.fds import register_parent_end
from allcores.errors import ChannelClosed
from allcores.ipc.channel import Channel, channel_pair

__all__ = ["Spawned", "Zygote", "ZygoteError"]

# How long a pid waits for the zygote's answer: a fork takes about a millisecond,
# but a machine under memory pressure can take far longer; past this the pid is
# reported unknown (None), and asked for again next time.
SPAWN_TIMEOUT = 30.0
# How long close() waits for the zygote to reap its children and exit before it is
# killed: it SIGKILLs them at once, so this is only reached if it is stopped itself.
CLOSE_TIMEOUT = 5.0
# Answers nobody asked for yet, past which a spawn reads them: unread, they would
# fill the socket, and a zygote blocked on sending one reads no more requests.
MAX_UNANSWERED = 64

# on_exit(number, exit code, why): *why* says why child *number* was never forked (its
# code is then None). Number None: the zygote itself is gone, and its children with it.
OnExit = Callable[[int | None, int | None, str | None], None]


class ZygoteError(RuntimeError):
    """The zygote is closed or gone: it can start no more children."""


class Spawned:
    """A child asked of the zygote: its number at once, its pid once the zygote answers."""

    __slots__ = ("_answered", "_pid", "_zygote", "error", "number")

    def __init__(self, zygote: Zygote, number: int) -> None:
        self._zygote = zygote
        self.number = number
        self._pid: int | None = None
        self.error: str | None = None  # why it was not forked, once answered
        self._answered = False

    @property
    def pid(self) -> int | None:
        """The child's pid, None if it was not forked; waits for the zygote's answer."""
        if not self._answered:
            self._zygote.wait_for_answer(self)
        return self._pid

    def answer(self, pid: int | None, error: str | None) -> None:
        self._pid, self.error, self._answered = pid, error, True


class Zygote:
    """Forks a zygote now; `spawn` then starts ``target(sock, *args)`` children from it."""

    def __init__(self, target: Callable[..., object], args: tuple[Any, ...] = ()) -> None:
        # Looked up here, once per process, not in every zygote (`die_with_parent`).
        libc_prctl()
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
        self._unanswered: dict[int, Spawned] = {}
        self._notices_fd = notices.fileno()  # a closed socket forgets its number
        register_parent_end(requests)
        register_parent_end(notices)

    def spawn(self, sock: socket.socket, name: str) -> Spawned:
        """Ask for a child that gets *sock*, without waiting for it. Safe from any thread.

        Raises ZygoteError when the zygote is closed or gone; a fork that fails is
        told later, by the child's pid (None) and by its notice (`watch`)."""
        with self._lock:
            if self._closed:
                raise ZygoteError("the pool's zygote is closed")
            self._spawns += 1
            spawned = Spawned(self, self._spawns)
            # Listed first: cut short after the send (Ctrl-C), its answer is still read.
            self._unanswered[spawned.number] = spawned
            try:
                self._requests.send(("spawn", name, spawned.number), [sock.fileno()])
            except (OSError, ChannelClosed) as exc:
                del self._unanswered[spawned.number]
                raise ZygoteError(
                    f"the pool's zygote (pid {self.pid}) cannot start a worker: {exc!r}"
                ) from exc
            while self._unanswered and (
                len(self._unanswered) > MAX_UNANSWERED or self._requests.readable()
            ):
                if not self._read_answer():
                    break
        return spawned

    def wait_for_answer(self, spawned: Spawned) -> None:
        """Read the zygote's answers until *spawned*'s (`Spawned.pid`); any thread."""
        with self._lock:
            while spawned.number in self._unanswered and self._read_answer():
                pass

    def _read_answer(self) -> bool:
        """Read one answer (under the lock); False if none came within SPAWN_TIMEOUT."""
        try:
            answer, _fds = self._requests.recv(timeout=SPAWN_TIMEOUT)
        except TimeoutError:
            return False
        except (OSError, ChannelClosed) as exc:
            self._answer_all(f"the pool's zygote (pid {self.pid}) is gone: {exc!r}")
            return True
        spawned = self._unanswered.pop(answer[1], None)
        if spawned is not None:
            if answer[0] == "started":
                spawned.answer(int(answer[2]), None)
            else:
                spawned.answer(None, str(answer[2]))
        return True

    def _answer_all(self, error: str) -> None:
        for spawned in self._unanswered.values():
            spawned.answer(None, error)
        self._unanswered.clear()

    def kill(self, number: int) -> None:
        """SIGKILL child *number*, if it was forked and has not been reaped yet."""
        with self._lock:
            if not self._closed:
                with contextlib.suppress(OSError, ChannelClosed):
                    self._requests.send(("kill", number))

    def watch(self, loop: asyncio.AbstractEventLoop, on_exit: OnExit) -> None:
        """Call ``on_exit(number, exit code, why)`` on *loop* as each child exits (`OnExit`).
        Exit codes follow multiprocessing: -N for signal N."""
        if self._watched is loop or self._closed:
            return
        reader = Channel(self._notices)
        fd = self._notices.fileno()

        def on_readable() -> None:
            try:
                while reader.poll():
                    notice, _fds = reader.recv()
                    if notice[0] == "exited":
                        on_exit(int(notice[1]), notice[2], None)
                    else:
                        on_exit(int(notice[1]), None, str(notice[2]))
            except (ChannelClosed, OSError):
                # The zygote is gone, and its children with it (PR_SET_PDEATHSIG).
                loop.remove_reader(fd)
                on_exit(None, None, f"the pool's zygote (pid {self.pid}) is gone")

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
            self._answer_all("the pool's zygote is closed")
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
    children: dict[int, tuple[int, Any]] = {}  # pidfd -> (number, Process), unreaped

    def fork(name: str, number: int, fds: list[int]) -> None:
        # Family, type and protocol given: the socket asks the kernel for none of them.
        child_sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, 0, fileno=fds[0])
        try:
            process = context.Process(target=target, args=(child_sock, me, *args), name=name)
            process.start()
        except Exception as exc:
            failed(name, number, exc)
            return
        finally:
            child_sock.close()
        try:
            pidfd = os.pidfd_open(process.pid or 0)
        except OSError as exc:  # EMFILE: a child that cannot be watched must not live
            process.kill()
            process.join()
            failed(name, number, exc)
            return
        children[pidfd] = (number, process)
        poller.register(pidfd, select.POLLIN)
        requests.send(("started", number, process.pid))

    def failed(name: str, number: int, exc: BaseException) -> None:
        why = (
            f"the zygote could not fork {name}: "
            + "".join(traceback.format_exception_only(exc)).strip()
        )
        requests.send(("failed", number, why))
        notices.send(("failed", number, why))

    def kill(number: int) -> None:
        for child_number, process in children.values():
            if child_number == number:
                with contextlib.suppress(OSError):
                    os.kill(process.pid, signal.SIGKILL)

    poller = select.poll()
    poller.register(requests_sock, select.POLLIN)
    try:
        while True:
            for fd, _event in poller.poll():
                if fd != requests_sock.fileno():
                    number, process = children.pop(fd)
                    poller.unregister(fd)
                    os.close(fd)
                    process.join()
                    notices.send(("exited", number, process.exitcode))
                    continue
                # Every request that has come: one read may bring several, and those
                # past the first wait in the channel, where poll(2) cannot see them.
                # A read stops after a message that carries fds, so the fd of the next
                # spawn is never held here while this one forks.
                while True:
                    try:
                        request, fds = requests.recv()
                    except ChannelClosed:
                        raise SystemExit(0) from None
                    if request[0] == "spawn":
                        fork(request[1], request[2], fds)
                    else:
                        kill(request[1])
                    if not requests.poll():
                        break
    finally:
        for _number, process in children.values():
            with contextlib.suppress(OSError):
                os.kill(process.pid, signal.SIGKILL)
        for _number, process in children.values():
            process.join()
        os._exit(0)
