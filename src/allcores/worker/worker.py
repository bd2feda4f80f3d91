"""Node's worker_threads `Worker`, as one long-lived process that exchanges messages.

::

    parent (the loop that created the Worker)             worker process
    ─────────────────────────────────────────             ──────────────
    Worker(target, worker_data=...)
      fork (multiprocessing's "fork") ─────────────────►   PR_SET_PDEATHSIG(SIGKILL)
      AsyncChannel on the parent's loop  ──("init", worker_data)──►  Channel (blocking)
                                         ◄──("online",)──────────   target(parent_port, worker_data)
    worker.post_message(obj) ────────────("message", obj)──────►   parent_port.receive() /
                                                                    parent_port.on("message", cb)
    on("message", cb), wait_message(),   ◄──("message", obj)───    parent_port.post_message(obj)
      async for msg in worker
    on("error", cb)                      ◄──("error", exc, tb)──   target raised
    on("exit", cb(code))  ◄── channel EOF + pidfd (WatchedProcess) ─   process exits

Every frame is one pickle (protocol 5) made inside `fd_transfer()`, so a `SharedArray`
or `Segment` anywhere in a message travels as its fd, alongside the frame, and the
receiver maps the same memory; everything else is copied.

Where callbacks run: on the event loop that was running when the Worker was created,
read by that loop (no thread). A Worker created with no running loop uses one shared
private loop in a daemon thread, "allcores-worker-events"; its callbacks run in that
thread, and `join()` waits for the exit from any other thread.

Exit codes follow `multiprocessing`: 0 when the target returns (and its message
listeners are done), ``n`` for ``sys.exit(n)``, 1 when the target raised (after the
"error" event), ``-N`` when signal N killed it (`terminate()` sends SIGKILL: -9).

The worker dies with its parent: it sets PR_SET_PDEATHSIG, and it exits when the
channel reaches EOF while it waits for messages. At interpreter exit the parent
kills the workers still running, so a forgotten worker never holds the exit up.

It is always forked, never started through forkserver or spawn: those re-import
``__main__``, which re-runs a script that has no ``if __name__ == "__main__":``
guard. The parent's end of its channel is closed in every other forked child
(`allcores.child.fds`), so a process forked later cannot keep it open.
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import contextlib
import logging
import multiprocessing
import multiprocessing.util  # registers its atexit hook before ours: see _kill_live_workers
import os
import pickle
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any, Literal

from allcores.child.fds import register_parent_end
from allcores.child.process import WatchedProcess
from allcores.errors import ChannelError, RemoteTraceback
from allcores.events import EventEmitter
from allcores.ipc.async_channel import AsyncChannel
from allcores.ipc.channel import channel_pair
from allcores.worker.child import (
    ParentPort,
    Target,
    WorkerProcessError,
    _close_fds,
    _decode,
    _encode,
    _target_spec,
    _worker_main,
)

__all__ = ["ParentPort", "Worker", "WorkerProcessError"]

log = logging.getLogger("allcores.worker")

Listener = Callable[..., Any]
Event = Literal["message", "error", "exit", "online"]
_EVENTS = ("message", "error", "exit", "online")

# A grandchild forked by the worker can inherit the worker's end of the channel and
# keep it open after the worker exits; we wait this long after the exit for the rest
# of the worker's messages before reporting "exit". A worker that exits normally
# closes its end as it dies, so the wait ends at once.
_EOF_GRACE_S = 1.0
# Interpreter exit waits this long for each killed worker to be reaped.
_ATEXIT_REAP_S = 1.0


# Workers still running, killed at interpreter exit.
_LIVE: set[Worker] = set()

_event_loop: asyncio.AbstractEventLoop | None = None
_event_loop_pid = -1
_event_loop_lock = threading.Lock()


def _private_loop() -> asyncio.AbstractEventLoop:
    """The shared loop (in its own daemon thread) for Workers created with no loop running."""
    global _event_loop, _event_loop_pid
    with _event_loop_lock:
        if _event_loop is None or _event_loop_pid != os.getpid():
            loop = asyncio.new_event_loop()
            thread = threading.Thread(
                target=loop.run_forever, name="allcores-worker-events", daemon=True
            )
            thread.start()
            _event_loop, _event_loop_pid = loop, os.getpid()
        return _event_loop


def _on_loop(loop: asyncio.AbstractEventLoop, fn: Callable[..., Any], *args: Any) -> None:
    """Run fn(*args) on *loop*: now if we are in it, else at its next turn."""
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is loop:
        fn(*args)
    else:
        loop.call_soon_threadsafe(fn, *args)


def _settle(fut: asyncio.Future[Any], value: Any = None, exc: BaseException | None = None) -> None:
    def settle() -> None:
        if fut.done():
            return
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(value)

    _on_loop(fut.get_loop(), settle)


class Worker:
    """One worker process running *target*, with Node's messaging API.

    *target* is a function ``target(parent_port, worker_data)`` or its
    ``"package.module:function"`` path; *worker_data* is any picklable value (a
    SharedArray inside it is shared, not copied). The process starts at once.

    Events (`on`, `once`, `off`): ``"online"`` (the worker started running the
    target), ``"message"`` (msg), ``"error"`` (the exception the target raised; its
    ``__cause__`` is a `RemoteTraceback` with the worker's traceback), ``"exit"``
    (exit code). Messages that arrive while nothing listens for them are kept for
    the next listener or `wait_message`.
    """

    def __init__(
        self, target: str | Target, *, worker_data: Any = None, name: str = "allcores-worker"
    ) -> None:
        spec = _target_spec(target)
        init_payload, init_fds = _encode(("init", worker_data), "worker_data")
        self._events = _LoopEvents(self._listener_raised)
        self._inbox: collections.deque[Any] = collections.deque()
        self._message_waiters: list[asyncio.Future[Any]] = []
        self._exit_waiters: list[asyncio.Future[int]] = []
        self._exited = threading.Event()
        self._exit_code: int | None = None
        self._error: BaseException | None = None
        self._eof = False
        self._eof_timer: asyncio.TimerHandle | None = None
        self._channel: AsyncChannel | None = None

        parent_end, child_end = channel_pair()
        process = multiprocessing.get_context("fork").Process(
            target=_worker_main, args=(child_end, spec, os.getpid()), name=name
        )
        register_parent_end(parent_end)
        try:
            process.start()
        except BaseException:
            parent_end.close()
            _close_fds(init_fds)
            raise
        finally:
            child_end.close()
        self._proc = WatchedProcess(process)
        self._pid: int = process.pid or 0
        self._parent_end = parent_end
        _LIVE.add(self)
        # Only now, after the fork: the private loop adds a thread to this process.
        try:
            self._loop = asyncio.get_running_loop()
        except RuntimeError:
            self._loop = _private_loop()
        _on_loop(self._loop, self._connect, init_payload, init_fds)

    # ── Node's API ──

    @property
    def pid(self) -> int:
        return self._pid

    @property
    def exit_code(self) -> int | None:
        """The exit code once the "exit" event has fired, else None."""
        return self._exit_code

    def post_message(self, obj: Any) -> None:
        """Send a pickled copy of *obj* to the worker (SharedArray memory is shared).

        Raises WorkerProcessError at once if *obj* cannot be pickled; a message posted
        after the worker has exited is dropped, as in Node.
        """
        payload, fds = _encode(("message", obj), "the message")
        _on_loop(self._loop, self._send, payload, fds)

    def on(self, event: Event, listener: Listener | None = None) -> Listener:
        """Call *listener* on every *event*; returns it, or a decorator when it is omitted."""
        return self._add_listener(event, listener, once=False)

    def once(self, event: Event, listener: Listener | None = None) -> Listener:
        """Call *listener* on the next *event* only."""
        return self._add_listener(event, listener, once=True)

    def off(self, event: Event, listener: Listener) -> None:
        self._check_event(event)

        _on_loop(self._loop, self._events.off, event, listener)

    def terminate(self) -> None:
        """Kill the worker now (SIGKILL, as Node stops a thread mid-instruction).

        The "exit" event follows with code -9; `await wait_exit()` waits for it.
        """
        if not self._exited.is_set():
            with contextlib.suppress(ValueError, ProcessLookupError):
                self._proc.kill()

    # ── awaitable and blocking forms ──

    async def wait_message(self) -> Any:
        """The next message from the worker.

        Raises the worker's exception if it fails first, or WorkerProcessError if it exits
        without sending one.
        """
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        _on_loop(self._loop, self._add_message_waiter, fut)
        return await fut

    async def wait_exit(self) -> int:
        """Wait until the worker has exited and every message was delivered; its exit code."""
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        _on_loop(self._loop, self._add_exit_waiter, fut)
        return await fut

    def __aiter__(self) -> AsyncIterator[Any]:
        """``async for msg in worker``: every message until exit; raises as wait_message."""
        return self._stream()

    def join(self, timeout: float | None = None) -> int | None:
        """Block until the "exit" event has fired; the exit code, or None on timeout.

        For code without an event loop; on the Worker's own loop use `wait_exit`.
        """
        with contextlib.suppress(RuntimeError):
            if asyncio.get_running_loop() is self._loop:
                raise WorkerProcessError(
                    "join() would block the event loop that must deliver the exit; "
                    "use 'await worker.wait_exit()'"
                )
        self._exited.wait(timeout)
        return self._exit_code

    def __repr__(self) -> str:
        state = "running" if self._exit_code is None else f"exited {self._exit_code}"
        return f"<Worker pid={self._pid} {state}>"

    # ── internals: everything below runs on self._loop ──

    @staticmethod
    def _check_event(event: str) -> None:
        if event not in _EVENTS:
            raise WorkerProcessError(f"Worker has no {event!r} event; it has: {', '.join(_EVENTS)}")

    def _add_listener(self, event: str, listener: Listener | None, *, once: bool) -> Listener:
        self._check_event(event)
        if listener is None:
            return lambda fn: self._add_listener(event, fn, once=once)
        registered = listener

        def add() -> None:
            (self._events.once if once else self._events.on)(event, registered)
            if event == "message":
                self._deliver()

        _on_loop(self._loop, add)
        return listener

    def _connect(self, init_payload: bytes, init_fds: list[int]) -> None:
        self._channel = AsyncChannel(
            self._parent_end, self._on_frame, self._on_channel_close, loop=self._loop, raw=True
        )
        self._proc.watch(self._loop, self._on_exited)
        self._send(init_payload, init_fds)

    def _send(self, payload: bytes, fds: list[int]) -> None:
        try:
            if self._channel is not None and not self._channel.closed:
                self._channel.send_bytes(payload, fds)
        except ChannelError:
            pass  # the worker is gone; "exit" tells the user
        finally:
            _close_fds(fds)

    def _listener_raised(self, event: str, exc: Exception) -> None:
        self._loop.call_exception_handler(
            {"message": f"a {event!r} listener of {self!r} raised", "exception": exc}
        )

    def _deliver(self) -> None:
        while self._inbox and (self._events.listener_count("message") or self._message_waiters):
            message = self._inbox.popleft()
            waiters, self._message_waiters = self._message_waiters, []
            for fut in waiters:
                _settle(fut, message)
            self._events.emit("message", message)

    def _add_message_waiter(self, fut: asyncio.Future[Any]) -> None:
        if self._inbox and not self._events.listener_count("message"):
            _settle(fut, self._inbox.popleft())
        elif self._error is not None:
            _settle(fut, exc=self._error)
        elif self._exited.is_set():
            # Not as soon as the exit code is known: messages may still be on their way
            # (`_finish` waits for the channel's end too).
            _settle(fut, exc=self._exited_error(" before sending a message"))
        else:
            self._message_waiters.append(fut)

    def _add_exit_waiter(self, fut: asyncio.Future[int]) -> None:
        if self._exited.is_set():
            _settle(fut, self._exit_code)
        else:
            self._exit_waiters.append(fut)

    def _exited_error(self, when: str = "") -> WorkerProcessError:
        return WorkerProcessError(
            f"worker {self._pid} exited with code {self._exit_code}{when}",
            exit_code=self._exit_code,
        )

    def _on_frame(self, payload: bytes | bytearray, fds: list[int]) -> None:
        try:
            frame = _decode(payload, fds)
        except Exception as exc:
            self._on_error(
                WorkerProcessError(
                    f"a message from worker {self._pid} could not be unpickled here ({exc!r}); "
                    "is its class importable in the parent?"
                )
            )
            return
        kind = frame[0]
        if kind == "message":
            self._inbox.append(frame[1])
            self._deliver()
        elif kind == "online":
            self._events.emit("online")
        elif kind == "error":
            self._on_error(self._rebuild_error(*frame[1:]))

    def _rebuild_error(
        self, blob: bytes | None, type_name: str, text: str, tb: str
    ) -> BaseException:
        exc: BaseException | None = None
        if blob is not None:
            with contextlib.suppress(Exception):
                exc = pickle.loads(blob)
        if not isinstance(exc, BaseException):
            exc = WorkerProcessError(f"worker {self._pid} raised {type_name}: {text}")
        exc.__cause__ = RemoteTraceback(tb)
        return exc

    def _on_error(self, exc: BaseException) -> None:
        self._error = exc
        waiters, self._message_waiters = self._message_waiters, []
        for fut in waiters:
            _settle(fut, exc=exc)
        if not self._events.emit("error", exc) and not waiters:
            self._loop.call_exception_handler(
                {
                    "message": f"{self!r} raised and nothing listens for its 'error' event",
                    "exception": exc,
                }
            )

    def _on_channel_close(self, exc: BaseException | None) -> None:
        if exc is not None:
            # A worker killed with unread messages in its socket resets the connection:
            # an ordinary way to end, reported by the exit code, not here.
            log.debug("channel to worker %d broke: %s", self._pid, exc)
        self._eof = True
        self._finish()

    def _on_exited(self, code: int | None) -> None:
        self._exit_code = code if code is not None else -1
        if not self._eof:
            self._eof_timer = self._loop.call_later(_EOF_GRACE_S, self._give_up_on_eof)
        self._finish()

    def _give_up_on_eof(self) -> None:
        if self._channel is not None:
            self._channel.close()
        self._eof = True
        self._finish()

    def _finish(self) -> None:
        code = self._exit_code
        if code is None or not self._eof or self._exited.is_set():
            return
        if self._eof_timer is not None:
            self._eof_timer.cancel()
        if self._channel is not None:
            self._channel.close()
        self._parent_end.close()
        _LIVE.discard(self)
        self._exited.set()
        waiters, self._message_waiters = self._message_waiters, []
        for fut in waiters:
            _settle(fut, exc=self._error or self._exited_error(" before sending a message"))
        exit_waiters, self._exit_waiters = self._exit_waiters, []
        for exit_fut in exit_waiters:
            _settle(exit_fut, code)
        self._events.emit("exit", code)

    async def _stream(self) -> AsyncIterator[Any]:
        queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        loop = asyncio.get_running_loop()

        def on_message(message: Any) -> None:
            _on_loop(loop, queue.put_nowait, ("message", message))

        def on_error(exc: BaseException) -> None:
            _on_loop(loop, queue.put_nowait, ("error", exc))

        def on_exit(code: int) -> None:
            _on_loop(loop, queue.put_nowait, ("exit", code))

        def attach() -> None:
            self._events.on("message", on_message)
            self._deliver()
            if self._error is not None:
                on_error(self._error)
            if self._exit_code is not None and self._exited.is_set():
                on_exit(self._exit_code)
            else:
                self._events.on("error", on_error)
                self._events.on("exit", on_exit)

        def detach() -> None:
            self._events.off("message", on_message)
            self._events.off("error", on_error)
            self._events.off("exit", on_exit)

        _on_loop(self._loop, attach)
        try:
            while True:
                kind, value = await queue.get()
                if kind == "message":
                    yield value
                elif kind == "error":
                    raise value
                else:
                    if value != 0:
                        raise self._exited_error()
                    return
        finally:
            _on_loop(self._loop, detach)


@atexit.register
def _kill_live_workers() -> None:
    # Registered after multiprocessing's own exit hook (imported above), so it runs
    # first: multiprocessing would otherwise join our workers and hold the exit up.
    for worker in list(_LIVE):
        with contextlib.suppress(Exception):
            worker._proc.reap_now(_ATEXIT_REAP_S)


class _LoopEvents(EventEmitter):
    """The Worker's listeners: a listener that raises goes to the loop's exception handler."""

    def __init__(self, report: Callable[[str, Exception], None]) -> None:
        super().__init__()
        self._report = report

    def on_listener_error(self, event: str, exc: Exception) -> None:
        self._report(event, exc)
