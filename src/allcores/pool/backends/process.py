"""The process backend: each worker is an OS process, killed and replaced at will.

::

    pool loop (parent)                                    worker process
    start_worker ─ fork | forkserver | spawn ───────────► _process_worker.main
                   socketpair end in args                   prctl(PDEATHSIG, SIGKILL), nice
    send(frame) ── AsyncChannel (loop writes) ──────────► Channel.recv_bytes (blocking)
    on_message  ◄─ AsyncChannel (loop reads, add_reader) ◄─ Channel.send_bytes
    kill() ─ SIGKILL
    stop() ─ close the channel ─────────────────────────► EOF: exit 0
    on_exit ◄── loop.add_reader(pidfd, else process.sentinel), after the channel's EOF
                (so a result sent just before death is not lost), then join()

Start method: ``fork`` while this process has a single OS thread (fast: ~1 ms, and
a forked child shares the parent's imported modules), else ``forkserver``, since
forking a process with threads can deadlock the child on a lock some other thread
held. ``start_method=`` (or ``mp_context=``) forces one. A forked worker is started
by a bare ``os.fork()`` (`_ForkedProcess`) and finds its SETUP in memory; forkserver
and spawn workers are ``multiprocessing.Process`` objects that read SETUP as their
first frame.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import functools
import io
import itertools
import multiprocessing
import multiprocessing.context
import multiprocessing.forkserver
import multiprocessing.process
import multiprocessing.util
import os
import signal
import socket
import sys
import threading
import traceback
from collections.abc import Callable, Sequence
from typing import Any

from allcores._system import libc_prctl, os_thread_count
from allcores.errors import ChannelError
from allcores.ipc.channel import AsyncChannel, Channel, channel_pair
from allcores.pool._protocol import pack_setup
from allcores.pool.backends import _process_worker
from allcores.pool.backends.base import (
    Backend,
    BackendWorker,
    Capabilities,
    OnExit,
    OnMessage,
    WorkerExit,
)

__all__ = ["ProcessBackend", "ProcessWorker", "choose_start_method"]

_START_METHODS = ("fork", "forkserver", "spawn")
# multiprocessing's helpers that a forked worker runs as its own children do.
_mp_util: Any = multiprocessing.util
# The parent's ends of every live worker channel of every pool in this process. A
# forked worker closes them all: one that held another worker's end would hide
# that worker's shutdown (no EOF) and its parent's death.
_PARENT_FDS: dict[int, int] = {}
_WORKER_KEYS = itertools.count()
# After the sentinel says a worker died, how long its channel may stay open before
# the exit is handled anyway: EOF normally follows within microseconds, but a
# grandchild that inherited the socket would hold it open forever.
_EOF_GRACE = 0.1


def choose_start_method(forced: str | None = None) -> str:
    """fork when safe (one OS thread, counting C threads), else forkserver."""
    if forced is not None:
        return forced
    if "fork" in multiprocessing.get_all_start_methods() and os_thread_count() == 1:
        return "fork"
    if "forkserver" in multiprocessing.get_all_start_methods():
        return "forkserver"
    return "spawn"


def _preload_worker_module() -> None:
    """Have the forkserver import our worker module once, not each child."""
    server = multiprocessing.forkserver._forkserver
    if getattr(server, "_forkserver_pid", None) is not None:
        return
    current = list(getattr(server, "_preload_modules", ["__main__"]))
    if _process_worker.__name__ not in current:
        server.set_forkserver_preload([*current, _process_worker.__name__])


class _ForkedProcess:
    """A worker started by a bare ``os.fork()``: the fork start method, made lighter.

    ``multiprocessing.Process`` adds ~0.3 ms to a fork in the parent (two pipes, a
    Finalize, its bookkeeping) and ~0.5 ms to the child's start (its bootstrap, above
    all reopening stdin as a new text file), of a worker start of ~2.5 ms. Nothing
    else does this for a forked child, so it is done by hand here, keeping what a
    task can see of multiprocessing's (`_become_child`): stdin on /dev/null,
    ``current_process()`` naming this worker, the after-fork hooks that reset
    inherited multiprocessing locks and queues, and its finalizers run at exit.
    The interface is the part of ``BaseProcess`` that ProcessWorker uses.
    """

    def __init__(self, target: Callable[..., object], args: tuple[Any, ...], name: str) -> None:
        self._target = target
        self._args = args
        self.name = name
        self.pid: int | None = None
        self.exitcode: int | None = None
        self.sentinel = -1

    def start(self) -> None:
        # Made before the fork, so that the child finds them ready: every object a
        # fresh child builds costs it copy-on-write faults (~0.05 ms for one of these).
        devnull = _devnull_stdin()
        parent = _parent_identity(os.getpid())
        identity = multiprocessing.context.ForkProcess(name=self.name)
        _mp_util._flush_std_streams()  # or buffered output is written twice
        readable, writable = os.pipe()
        try:
            pid = os.fork()
        except BaseException:
            os.close(readable)
            os.close(writable)
            raise
        if pid == 0:  # pragma: no cover - the child; covered by every pool test
            code = 1
            try:
                os.close(readable)
                _become_child(identity, parent, devnull)
                self._target(*self._args)
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
            except BaseException:
                traceback.print_exc()
            finally:
                # As multiprocessing's bootstrap ends: finalizers, then non-daemon
                # threads a task left, then the std streams.
                with contextlib.suppress(BaseException):
                    _mp_util._exit_function()
                with contextlib.suppress(BaseException):
                    threading._shutdown()  # type: ignore[attr-defined]
                with contextlib.suppress(BaseException):
                    _mp_util._flush_std_streams()
                os._exit(code)
        os.close(writable)
        self.pid = pid
        self.sentinel = readable  # EOF once the child and all it forked are gone

    def kill(self) -> None:
        if self.pid is not None and self.exitcode is None:
            os.kill(self.pid, signal.SIGKILL)

    def join(self) -> None:
        if self.pid is None or self.exitcode is not None:
            return
        try:
            _pid, status = os.waitpid(self.pid, 0)
        except ChildProcessError:
            self.exitcode = -1  # reaped by someone else (a SIGCHLD handler, os.wait())
            return
        self.exitcode = os.waitstatus_to_exitcode(status)

    def close(self) -> None:
        if self.sentinel >= 0:
            os.close(self.sentinel)
            self.sentinel = -1


@functools.cache
def _devnull_stdin() -> io.TextIOWrapper | None:
    """The stdin forked workers get, opened once in the parent: a worker reads EOF,
    never the parent's terminal (as multiprocessing does, without its ~0.25 ms
    per child of opening a new text file)."""
    try:
        stdin = open(os.devnull, encoding="utf-8")  # noqa: SIM115 - kept until exit
    except OSError:
        return None
    atexit.register(stdin.close)
    return stdin


@functools.cache
def _parent_identity(pid: int) -> multiprocessing.process.BaseProcess | None:
    """What ``multiprocessing.parent_process()`` returns in this process's forked
    workers (keyed by *pid*: a worker that starts a pool of its own is a new parent).
    Its sentinel is a pidfd of this process, readable once it has exited."""
    make = getattr(multiprocessing.process, "_ParentProcess", None)
    if make is None or not hasattr(os, "pidfd_open"):
        return None
    try:
        sentinel = os.pidfd_open(pid)
    except OSError:
        return None
    parent: multiprocessing.process.BaseProcess = make(
        multiprocessing.current_process().name, pid, sentinel
    )
    return parent


def _become_child(
    identity: multiprocessing.process.BaseProcess,
    parent: multiprocessing.process.BaseProcess | None,
    stdin: io.TextIOWrapper | None,
) -> None:
    """In a freshly forked worker: what multiprocessing's bootstrap does that a task
    may notice. Reaches into multiprocessing's module state (checked on 3.11 to
    3.13); anything missing is skipped."""
    if stdin is not None:
        # The parent's stdin object is left unclosed (0.1 ms): unreachable but for
        # sys.__stdin__, and its fd 0 now reads /dev/null. In this order, since
        # dropping it may close fd 0.
        sys.stdin = stdin
        with contextlib.suppress(OSError, ValueError):
            os.dup2(stdin.fileno(), 0)  # C code reading fd 0 sees EOF too
    process_module: Any = multiprocessing.process
    process_module._children = set()
    process_module._process_counter = itertools.count(1)
    process_module._current_process = identity
    if parent is not None:
        process_module._parent_process = parent
    _mp_util._finalizer_registry.clear()
    if _mp_util._afterfork_registry:  # most often empty: its walk costs ~0.1 ms
        _mp_util._run_after_forkers()


class ProcessWorker(BackendWorker):
    def __init__(
        self,
        worker_id: int,
        process: multiprocessing.process.BaseProcess | _ForkedProcess,
        sock: socket.socket,
        on_reaped: Callable[[int], None],
    ) -> None:
        self.worker_id = worker_id
        self._on_reaped = on_reaped
        self.process = process
        self.pid = process.pid
        self.sock = sock
        self._channel: AsyncChannel | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._on_exit: OnExit | None = None
        self._sentinel_seen = False
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
        self._pidfd: int | None = None

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
        loop.add_reader(self._exit_fd(), self._on_sentinel)

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
                or self._sentinel_seen
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
        if resume:
            self.resume_reading()
        if deferred:
            self._finish()

    def read_now(self, timeout: float | None) -> tuple[bytes | bytearray, list[int]] | None:
        assert self._channel is not None and self._claimed
        return self._channel.read_now(timeout)

    def stop(self) -> None:
        if self._channel is not None:
            self._channel.close(flush=True)

    def kill(self) -> None:
        if not self._exited:
            with contextlib.suppress(OSError, ValueError):
                self.process.kill()

    def _on_channel_closed(self, exc: BaseException | None) -> None:
        self._channel_done = True
        if exc is not None:
            # A corrupt stream: the worker cannot be trusted with more work.
            self.kill()
        if self._sentinel_seen:
            self._finish()

    def _exit_fd(self) -> int:
        """An fd readable once the worker has exited: a pidfd where the kernel has
        them, else multiprocessing's sentinel pipe, which a grandchild the worker
        forked keeps open (the worker's end would then go unseen while it lives)."""
        if self._pidfd is None:
            self._pidfd = -1
            if self.pid is not None and hasattr(os, "pidfd_open"):
                with contextlib.suppress(OSError):
                    self._pidfd = os.pidfd_open(self.pid)
        return self._pidfd if self._pidfd >= 0 else self.process.sentinel

    def _close_pidfd(self) -> None:
        if self._pidfd is not None and self._pidfd >= 0:
            os.close(self._pidfd)
        self._pidfd = -1

    def _on_sentinel(self) -> None:
        assert self._loop is not None
        self._loop.remove_reader(self._exit_fd())
        with self._claim_lock:
            self._sentinel_seen = True
            claimed = self._claimed
        if self._channel_done:
            self._finish()
            return
        if not claimed:
            # An idle worker's reading is paused: read its EOF (and last frames) now.
            self.resume_reading()
        self._grace = self._loop.call_later(_EOF_GRACE, self._finish)

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
        if self._channel is not None:
            self._channel.close()
        self._close_pidfd()
        self.process.join()
        exitcode = self.process.exitcode
        self.process.close()
        self._on_reaped(self.worker_id)
        if self._on_exit is not None:
            self._on_exit(WorkerExit(exitcode))

    def terminate_now(self) -> None:
        if self._exited:
            return
        self._exited = True
        loop = self._loop
        if loop is not None and not loop.is_closed() and not self._sentinel_seen:
            with contextlib.suppress(ValueError, RuntimeError, OSError):
                loop.remove_reader(self._exit_fd())
        self._close_pidfd()
        with contextlib.suppress(OSError, ValueError):
            self.process.kill()
        self.process.join()
        self.process.close()
        self._on_reaped(self.worker_id)
        if self._channel is not None and loop is not None and not loop.is_closed():
            try:
                self._channel.close()
            except (RuntimeError, OSError, ValueError):
                self.sock.close()
        else:
            self.sock.close()


class ProcessBackend(Backend):
    """Workers are processes. *nice* is added to each worker's niceness."""

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
    ) -> None:
        if mp_context is not None and start_method is None:
            start_method = mp_context.get_start_method()
        if start_method is not None and start_method not in _START_METHODS:
            raise ValueError(
                f"start_method must be one of {', '.join(_START_METHODS)}, got {start_method!r}"
            )
        self.forced_start_method = start_method
        self.nice = nice
        self.last_start_method: str | None = None

    def start_is_slow(self) -> bool:
        return choose_start_method(self.forced_start_method) != "fork"

    def start_worker(self, worker_id: int, setup: dict[str, Any]) -> ProcessWorker:
        method = choose_start_method(self.forced_start_method)
        self.last_start_method = method
        if method == "forkserver":
            _preload_worker_module()
        parent_sock, child_sock = channel_pair()
        close_in_child: list[int] = []
        parent_pid: int | None = None
        inherited: dict[str, Any] | None = None
        if method == "fork":
            close_in_child = [*_PARENT_FDS.values(), parent_sock.fileno()]
            parent_pid = os.getpid()
            # A forked child has the setup in its copy of memory, the scoreboard's
            # mapping included: no SETUP frame to pickle, send, receive and map again
            # (~0.5 ms of a fresh child's start), and prctl ready to call.
            inherited = setup
            libc_prctl()
        args = (child_sock, self.nice, close_in_child, parent_pid, inherited)
        name = f"allcores-pool-{worker_id}"
        process: multiprocessing.process.BaseProcess | _ForkedProcess
        if method == "fork":
            process = _ForkedProcess(_process_worker.main, args, name)
        else:
            process = multiprocessing.get_context(method).Process(  # type: ignore[attr-defined]
                target=_process_worker.main, args=args, name=name, daemon=False
            )
        try:
            process.start()
        finally:
            child_sock.close()
        if inherited is None:
            # The SETUP frame goes first, before the loop owns the socket.
            packed = pack_setup(setup)
            try:
                Channel(parent_sock, raw=True).send_bytes(packed.payload, packed.fds)
            finally:
                packed.close()
        parent_sock.setblocking(False)
        key = next(_WORKER_KEYS)
        _PARENT_FDS[key] = parent_sock.fileno()

        def forget(_worker_id: int) -> None:
            _PARENT_FDS.pop(key, None)

        return ProcessWorker(worker_id, process, parent_sock, forget)
