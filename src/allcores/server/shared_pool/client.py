"""`offload` in an HTTP worker of `allcores serve`: each task on a connection of its
own, straight to the shared pool's socket, on the worker's event loop.

::

    await offload(fn, *args, timeout=T)
      pack the call (as a pool does: large buffers out of band in a memfd)
      connect() to the pool's socket ── EAGAIN: the queue is full ─► QueueFullError
      send TASK (queued-at time and T in its head), then read on the loop:
        RESULT value | ERROR (exception, remote traceback) ─► return | raise
        end of stream first ─► the pool process died: past T since sent, a timeout
                               (TaskTimeoutError), else a crash (WorkerCrashedError)
      cancelled (the awaiting task, asyncio.timeout, a drain) ─► close the connection:
        a queued task is skipped, a running one's process gets SIGIO and dies

Nothing here keeps state between tasks but a counter: a connection lives as long as
its task, and the kernel's accept queue in front of the pool is the only queue.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable
from typing import Any, TypeVar

from allcores.errors import RemoteTraceback
from allcores.ipc.frames import FrameReader, close_fds, fds_ancillary, frame_header
from allcores.observe.scoreboard import Row
from allcores.pool._protocol import ERROR, RESULT, TASK
from allcores.pool._serialize import SameAsArgument, dump_function, pack_call, unpack
from allcores.pool.errors import (
    PoolClosedError,
    PoolError,
    QueueFullError,
    TaskTimeoutError,
    WorkerCrashedError,
)

__all__ = ["ADDRESS_ENV", "SharedPoolClient"]

R = TypeVar("R")

# The HTTP workers find the pool's socket here (set in the primary's environment,
# which every worker inherits, forked or started as a program): its abstract name,
# without the leading NUL that an environment cannot hold.
ADDRESS_ENV = "ALLCORES_POOL_ADDRESS"


class SharedPoolClient:
    """The shared pool as seen from one HTTP worker: ``await client.run(fn, *args)``."""

    def __init__(self, address: str, row: Row | None = None) -> None:
        self.address = address
        self._row = row
        self.in_flight = 0

    async def run(
        self, fn: Callable[..., R], /, *args: Any, timeout: float | None = None, **kwargs: Any
    ) -> R:
        """fn(*args, **kwargs) in a pool process; as `Pool.run`, with the same errors."""
        if timeout is not None and not timeout > 0:
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
        loop = asyncio.get_running_loop()
        # The time limit travels in the task id, in microseconds (0: none): the pool
        # process arms its own alarm with it (process.py).
        limit = round(timeout * 1_000_000) if timeout else 0
        packed = pack_call(TASK, limit, dump_function(fn), args, kwargs, seconds=time.monotonic())
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        try:
            sock.connect(self.address)
        except BlockingIOError:
            sock.close()
            packed.close()
            raise QueueFullError(
                "the shared pool's queue is full (--pool-queue tasks wait for a process); "
                "shed load (answer 503), or raise --pool-queue or --pool"
            ) from None
        except OSError as exc:
            sock.close()
            packed.close()
            raise PoolClosedError(
                f"the shared pool of allcores serve is not there ({exc.strerror}); "
                "the server is stopping"
            ) from None
        call = _Call(loop, sock, _describe(fn), timeout)
        self._count(1)
        try:
            header = frame_header(len(packed.payload), len(packed.fds))
            call.send(header + packed.payload, packed.fds)
        finally:
            # Sent (or failed): the fds are in the kernel's hands now, or useless.
            packed.close()
        try:
            value = await call.future
        except asyncio.CancelledError:
            call.abandon()
            raise
        finally:
            self._count(-1)
        if type(value) is SameAsArgument:
            return args[value.index]  # type: ignore[no-any-return]
        return value  # type: ignore[no-any-return]

    def _count(self, delta: int) -> None:
        self.in_flight += delta
        if self._row is not None:
            self._row.set("offloads", self.in_flight)


class _Call:
    """One task's connection: write the task, read the answer, settle the future."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        task: str,
        timeout: float | None,
    ) -> None:
        self.future: asyncio.Future[Any] = loop.create_future()
        self._loop = loop
        self._sock = sock
        self._fd = sock.fileno()
        self._task = task
        self._timeout = timeout
        self._sent_at = time.monotonic()
        self._reader = FrameReader()
        self._rest = memoryview(b"")
        self._fds: list[int] = []
        self._closed = False

    def send(self, data: bytes, fds: list[int]) -> None:
        try:
            sent = self._sock.sendmsg([data], fds_ancillary(fds))
        except BlockingIOError:
            sent = 0
            self._fds = list(fds)  # not sent: they go with the first byte that is
        except OSError as exc:
            self._fail(PoolError(f"could not send {self._task} to the shared pool: {exc}"))
            return
        self._loop.add_reader(self._fd, self._on_readable)
        if sent < len(data):
            self._rest = memoryview(data)[sent:]
            self._loop.add_writer(self._fd, self._on_writable)

    def _on_writable(self) -> None:
        try:
            sent = self._sock.sendmsg([self._rest], fds_ancillary(self._fds))
        except BlockingIOError:
            return
        except OSError as exc:
            self._fail(PoolError(f"could not send {self._task} to the shared pool: {exc}"))
            return
        self._fds = []
        self._rest = self._rest[sent:]
        if not self._rest:
            self._loop.remove_writer(self._fd)

    def _on_readable(self) -> None:
        try:
            got = self._reader.read_from(self._sock)
        except BlockingIOError:
            return
        except OSError:
            got = 0
        if not got:
            self._ended()
            return
        for payload, fds in self._reader.frames():
            if self.future.done():
                close_fds(fds)
                continue
            kind = payload[0]
            try:
                value = unpack(payload, fds)
            except Exception as exc:
                self._fail(exc)
                return
            if kind == RESULT:
                self.future.set_result(value)
            elif kind == ERROR:
                error, tb = value
                error.__cause__ = RemoteTraceback(tb)
                self.future.set_exception(error)
            self._close()

    def _ended(self) -> None:
        """The pool process closed the connection without an answer: it died."""
        elapsed = time.monotonic() - self._sent_at
        if self._timeout is not None and elapsed >= self._timeout:
            # Its alarm ran out (the limit counts from its start, which came after
            # the send): a timeout, as far as anyone here can tell.
            self._fail(TaskTimeoutError(self._timeout, self._task))
        else:
            self._fail(WorkerCrashedError(0, None, None, self._task))

    def _fail(self, exc: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(exc)
        self._close()

    def abandon(self) -> None:
        """The caller gave up: closing the connection drops a queued task, and makes a
        running one's process die of SIGIO (process.py)."""
        self._close()

    def _close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._loop.remove_reader(self._fd)
        if self._rest:
            self._loop.remove_writer(self._fd)
        close_fds(self._fds)
        self._sock.close()


def _describe(fn: Callable[..., Any]) -> str:
    name = getattr(fn, "__qualname__", None) or repr(fn)
    return f"task {name}()"
