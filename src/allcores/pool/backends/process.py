"""The process backend: each worker is an OS process, killed and replaced at will.

::

    pool loop (parent)                                    worker process
    start_worker ─ Zygote.spawn (default) ──────────────► _process_worker.main
                   | multiprocessing forkserver / spawn     prctl(PDEATHSIG, SIGKILL), nice
    SETUP frame (blocking, before the loop owns the socket) ─►  Channel.recv_bytes
    send(frame) ── AsyncChannel (loop writes) ──────────► Channel.recv_bytes (blocking)
    on_message  ◄─ AsyncChannel (loop reads, add_reader) ◄─ Channel.send_bytes
    stop() ─ STOP frame ────────────────────────────────► returns: exit 0
    kill() ─ SIGKILL (through the zygote, which never mistakes a reused pid)
    on_exit ◄── the exit code (the zygote's notice, or a pidfd and join()), after
                the channel's EOF (so a result sent just before death is not lost)

Start method: by default every worker is forked by the pool's zygote
(`allcores.child.zygote`), itself forked when the pool was made: workers share the
parent's imported modules and memory as a plain fork does, a replacement never
comes from a process with threads, and nothing re-imports ``__main__``.
``start_method="forkserver" | "spawn"`` (or ``mp_context=``) starts workers through
multiprocessing instead, which re-imports ``__main__`` as it does for
ProcessPoolExecutor.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import multiprocessing.context
import multiprocessing.forkserver
import pickle
import socket
import threading
from collections.abc import Callable, Sequence
from typing import Any

from allcores.child.fds import register_parent_end
from allcores.child.process import WatchedProcess
from allcores.child.zygote import Spawned, Zygote
from allcores.errors import ChannelError
from allcores.ipc.async_channel import AsyncChannel
from allcores.ipc.channel import Channel, channel_pair
from allcores.pool._protocol import Initializer, pack_setup, pack_stop
from allcores.pool.backends import _process_worker
from allcores.pool.backends.base import (
    Backend,
    BackendWorker,
    Capabilities,
    OnExit,
    OnMessage,
    WorkerExit,
)

__all__ = ["ProcessBackend", "ProcessWorker"]

_START_METHODS = ("fork", "forkserver", "spawn")
# After a worker's exit is known, how long its channel may stay open before the
# exit is handled anyway: EOF normally follows within microseconds, but a
# grandchild that inherited the socket would hold it open forever.
_EOF_GRACE = 0.1

OnExitCode = Callable[[int | None], None]

_log = logging.getLogger("allcores.pool")


def _preload_worker_module() -> None:
    """Have the forkserver import our worker module once, not each child."""
    server = multiprocessing.forkserver._forkserver
    if getattr(server, "_forkserver_pid", None) is not None:
        return
    current = list(getattr(server, "_preload_modules", ["__main__"]))
    if _process_worker.__name__ not in current:
        server.set_forkserver_preload([*current, _process_worker.__name__])


class _ZygoteChild:
    """A worker the pool's zygote forks: killed through it, its exit told by it.

    Known by its spawn number from the start; its pid only once the zygote answers,
    read when first asked for (`Spawned.pid`)."""

    def __init__(self, backend: ProcessBackend, zygote: Zygote, spawned: Spawned) -> None:
        self._backend = backend
        self._zygote = zygote
        self._spawned = spawned

    @property
    def pid(self) -> int | None:
        return self._spawned.pid

    def watch(self, loop: asyncio.AbstractEventLoop, on_exit: OnExitCode) -> None:
        self._backend.watch_zygote_child(loop, self._spawned.number, on_exit)

    def unwatch(self) -> None:
        self._backend.unwatch_zygote_child(self._spawned.number)

    def kill(self) -> None:
        # By number: it works before the pid is known, and never hits a reused pid.
        self._zygote.kill(self._spawned.number)

    def reap_now(self) -> int | None:
        """Kill without the loop; the zygote reaps it."""
        self.kill()
        self.unwatch()
        return None


class ProcessWorker(BackendWorker):
    def __init__(
        self,
        worker_id: int,
        child: _ZygoteChild | WatchedProcess,
        sock: socket.socket,
    ) -> None:
        self.worker_id = worker_id
        self._child = child
        self.sock = sock
        self._channel: AsyncChannel | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._on_exit: OnExit | None = None
        self._exit_seen = False
        self._channel_done = False
        self._exited = False
        self._grace: asyncio.TimerHandle | None = None
        # A thread that claimed the socket (`claim_reading`) reads it; the loop then
        # must neither read nor close it, so its end is put off until the release.
        self._claim_lock = threading.Lock()
        self._claimed = False
        self._claim_token: object | None = None
        self._finish_deferred = False
        self._resume_pending = False  # asked for while claimed: done at the release
        self._exitcode: int | None = None

    # A property where `BackendWorker` has an attribute: a zygote's child learns it late.
    @property
    def pid(self) -> int | None:  # type: ignore[override]
        """None if it never started; a zygote's child waits here for the zygote's answer."""
        return self._child.pid

    def attach(
        self, loop: asyncio.AbstractEventLoop, on_message: OnMessage, on_exit: OnExit
    ) -> None:
        self._loop = loop
        self._on_exit = on_exit
        # Again after a Ctrl-C cut the first call short: the channel is kept, and
        # add_reader replaces a reader already there.
        if self._channel is None:
            self._channel = AsyncChannel(
                self.sock, on_message, self._on_channel_closed, loop=loop, raw=True
            )
        self._child.watch(loop, self._on_exited)

    def send(self, payload: bytes | bytearray | memoryview, fds: Sequence[int] = ()) -> None:
        channel = self._channel
        if channel is None or channel.closed:
            return  # It is dying; on_exit will re-queue what it held.
        # try, not contextlib.suppress: this runs per task, and suppress builds an object.
        try:  # noqa: SIM105
            channel.send_bytes(payload, fds)
        except (OSError, ChannelError):
            pass  # A broken channel (ChannelClosed): its exit fd tells the pool.

    def send_from_thread(self, payload: bytes | bytearray | memoryview, fds: Sequence[int]) -> bool:
        channel = self._channel
        return channel is not None and channel.send_now(payload, fds)

    def pause_reading(self) -> None:
        if self._channel is not None:
            self._channel.pause_reading()

    def resume_reading(self) -> None:
        with self._claim_lock:
            if self._claimed:
                self._resume_pending = True
                return
        if self._channel is not None:
            self._channel.resume_reading()

    def claim_reading(self, token: object) -> bool:
        with self._claim_lock:
            channel = self._channel
            if (
                self._claimed
                or self._exited
                or self._exit_seen
                or channel is None
                or channel.closed
                or not channel.paused
            ):
                return False
            self._claimed = True
            self._claim_token = token
            return True

    def release_reading(self, resume: bool, token: object) -> bool:
        with self._claim_lock:
            if not self._claimed or self._claim_token is not token:
                return False
            self._claimed = False
            self._claim_token = None
            deferred, self._finish_deferred = self._finish_deferred, False
            resume = resume or self._resume_pending
            self._resume_pending = False
        loop = self._loop
        if (deferred or resume) and loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nothing to do
                loop.call_soon_threadsafe(self._after_release, deferred, resume)
        return True

    def claimed_by(self) -> object | None:
        return self._claim_token

    def stream_in_doubt(self) -> bool:
        return self._channel is not None and self._channel.in_doubt

    def _after_release(self, deferred: bool, resume: bool) -> None:
        if resume or deferred:
            self.resume_reading()
        if deferred and not self._exited:
            # The worker is gone and our reading side is shut (`_finish`): the loop
            # reads the replies still in the socket, then the EOF ends the worker.
            # Ending it here would drop those replies and fail their tasks as crashed.
            self._start_grace()

    def read_now(self, timeout: float | None) -> tuple[bytes | bytearray, list[int]] | None:
        assert self._channel is not None and self._claimed
        return self._channel.read_now(timeout)

    def stop(self) -> None:
        """Ask the worker to exit once its tasks are done: an explicit message, not
        the channel's end, which a process that inherited our end would hold off."""
        self.send(pack_stop())

    def kill(self) -> None:
        if not self._exited:
            self._child.kill()

    def _on_channel_closed(self, exc: BaseException | None) -> None:
        self._channel_done = True
        if exc is not None:
            # A corrupt stream: the worker cannot be trusted with more work.
            self.kill()
        if self._exit_seen:
            self._finish()

    def _on_exited(self, code: int | None) -> None:
        assert self._loop is not None
        self._exitcode = code
        with self._claim_lock:
            self._exit_seen = True
            claimed = self._claimed
        if self._channel_done:
            self._finish()
            return
        if not claimed:
            # An idle worker's reading is paused: read its EOF (and last frames) now.
            self.resume_reading()
        self._start_grace()

    def _start_grace(self) -> None:
        """End the worker in _EOF_GRACE if its EOF has not done it by then."""
        assert self._loop is not None
        if self._grace is not None:
            self._grace.cancel()
        self._grace = self._loop.call_later(_EOF_GRACE, self._grace_over)

    def _grace_over(self) -> None:
        """No EOF within the grace after the exit: end the worker, after reading what
        it sent before it died. The loop may not have polled its socket yet (uvloop
        runs due timers before polling), and those replies must not be lost."""
        with self._claim_lock:
            claimed = self._claimed
        if not claimed and not self._exited and self._channel is not None:
            self._channel.read_pending()  # its EOF ends the worker (`_on_channel_closed`)
        self._finish()

    def _finish(self) -> None:
        if self._exited:
            return
        with self._claim_lock:
            if self._claimed:
                # The claiming thread reads on until EOF, which a grandchild holding
                # the worker's end could put off forever: end our reading side now
                # (frames already queued are still read first).
                self._finish_deferred = True
                with contextlib.suppress(OSError):
                    self.sock.shutdown(socket.SHUT_RD)
                return
            # Under the lock: a thread must not claim the socket this closes.
            self._exited = True
        if self._grace is not None:
            self._grace.cancel()
        self._child.unwatch()
        if self._channel is not None:
            self._channel.close()
        if self._on_exit is not None:
            self._on_exit(WorkerExit(self._exitcode))

    def terminate_now(self) -> None:
        if self._exited:
            return
        self._exited = True
        loop = self._loop
        self._child.reap_now()
        if self._channel is not None and loop is not None and not loop.is_closed():
            try:
                self._channel.close()
            except (RuntimeError, OSError, ValueError):
                self.sock.close()
        else:
            self.sock.close()


class ProcessBackend(Backend):
    """Workers are processes. *nice* is added to each worker's niceness; *initializer*
    (a function and its arguments) runs in each before its first task.

    The initializer goes with each worker's start, as ProcessPoolExecutor's does:
    the zygote, forked now, holds it in memory and every worker it forks inherits
    it; forkserver and spawn have multiprocessing pickle it with the process, which
    lets initargs hold a multiprocessing Queue, Lock or Event."""

    name = "process"
    capabilities = Capabilities(
        cancel_running=True, enforce_timeout=True, shared_memory=True, crash_isolation=True
    )

    def __init__(
        self,
        *,
        start_method: str | None = None,
        mp_context: multiprocessing.context.BaseContext | None = None,
        nice: int = 0,
        initializer: Initializer | None = None,
    ) -> None:
        if mp_context is not None and start_method is None:
            start_method = mp_context.get_start_method()
        if start_method is not None and start_method not in _START_METHODS:
            raise ValueError(
                f"start_method must be one of {', '.join(_START_METHODS)}, got {start_method!r}"
            )
        self.start_method = start_method or "fork"
        self.nice = nice
        self._initializer = initializer
        self._zygote: Zygote | None = None
        self._on_exit: dict[int, OnExitCode] = {}  # zygote children, by spawn number
        self._early_exits: dict[int, int | None] = {}  # told before being watched
        if self.start_method == "fork":
            self._zygote = Zygote(_process_worker.main, (nice, initializer))

    def start_is_slow(self) -> bool:
        return self._zygote is None

    def start_worker(self, worker_id: int, setup: dict[str, Any]) -> ProcessWorker:
        if self.start_method == "forkserver":
            _preload_worker_module()
        parent_sock, child_sock = channel_pair()
        register_parent_end(parent_sock)
        name = f"allcores-pool-{worker_id}"
        child: _ZygoteChild | WatchedProcess
        try:
            try:
                if self._zygote is not None:
                    # Returns at once: the zygote forks it while its set-up goes out.
                    child = _ZygoteChild(self, self._zygote, self._zygote.spawn(child_sock, name))
                else:
                    process = multiprocessing.get_context(self.start_method).Process(  # type: ignore[attr-defined]
                        target=_process_worker.main,
                        # Its parent is the forkserver, or a spawn trampoline: not us.
                        args=(child_sock, None, self.nice, self._initializer),
                        name=name,
                        daemon=False,
                    )
                    try:
                        process.start()
                    except (pickle.PicklingError, AttributeError, TypeError) as exc:
                        if self._initializer is not None:
                            exc.add_note(
                                f"(start_method={self.start_method!r} pickles the pool's "
                                "initializer and initargs for each worker, as "
                                "ProcessPoolExecutor does: give a module-level function, or "
                                "use the default start method, which forks them)"
                            )
                        raise
                    child = WatchedProcess(process)
            finally:
                child_sock.close()
            # The SETUP frame goes first, before the loop owns the socket.
            packed = pack_setup(setup)
            try:
                Channel(parent_sock, raw=True).send_bytes(packed.payload, packed.fds)
            except ChannelError:
                pass  # it died at once: its exit tells the pool
            finally:
                packed.close()
        except BaseException:
            parent_sock.close()
            raise
        parent_sock.setblocking(False)
        return ProcessWorker(worker_id, child, parent_sock)

    def watch_zygote_child(
        self, loop: asyncio.AbstractEventLoop, number: int, on_exit: OnExitCode
    ) -> None:
        assert self._zygote is not None
        if number in self._early_exits:
            loop.call_soon(on_exit, self._early_exits.pop(number))
            return
        self._on_exit[number] = on_exit
        self._zygote.watch(loop, self._zygote_child_exited)

    def unwatch_zygote_child(self, number: int) -> None:
        self._on_exit.pop(number, None)
        self._early_exits.pop(number, None)

    def _zygote_child_exited(self, number: int | None, code: int | None, why: str | None) -> None:
        if number is None:  # the zygote is gone, and every child with it
            for on_exit in list(self._on_exit.values()):
                on_exit(None)
            self._on_exit.clear()
            return
        if why is not None:
            # The pool sees a worker that ended during its start; this says why.
            _log.error("a pool worker did not start: %s", why)
        if number in self._on_exit:
            self._on_exit.pop(number)(code)
        else:
            self._early_exits[number] = code

    def close(self) -> None:
        self._on_exit.clear()
        self._early_exits.clear()
        if self._zygote is not None:
            self._zygote.close()
