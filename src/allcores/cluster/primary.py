"""The primary: starts workers, owns the listening sockets, supervises.

Who sends what to whom (one channel per worker, see `allcores.ipc`)::

    primary (one asyncio loop, main thread)            worker k (runs the program again)
    ───────────────────────────────────────            ───────────────────────────────
    fork() ── Popen(argv, pass_fds=channel, scoreboard) ─►  import allcores.cluster
            ◄─────────────────────── {"t": "online"} ───   (sent at import)
            ◄─── {"t": "listen", host, port, req} ──────   await cluster.start_server(...)
    bind once, keep forever
    {"t": "listening", req, policy} + fd ──────────────►   shared / reuseport: accept itself
    balanced / rr: accept() here, then
    {"t": "conn", key} + accepted fd ──────────────────►   connect_accepted_socket(protocol)
    worker.send(obj, handle) {"t": "msg"} + fd ────────►   cluster.worker.on("message")
            ◄──────────────────── {"t": "msg"} + fd ────   cluster.worker.send(obj, handle)
    worker.disconnect() {"t": "disconnect", timeout} ──►   stop taking connections, drain,
            ◄────────────────────────── channel EOF ────   close the channel, exit

    scoreboard row k ◄──── heartbeat, open/closed connection counts (no messages)

Supervision is one coroutine (`_supervise`). Signal handlers, process exits (pidfd
readable) and channel events only record what happened and wake it; it decides:
respawn with backoff, stop after a crash loop, drain on SIGTERM/SIGINT, and end when
no worker is left.
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import contextlib
import logging
import os
import random
import signal as signal_module
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from allcores._system import raise_fd_limit
from allcores.cluster.balance import least_busy_worker, round_robin
from allcores.cluster.listeners import Address, bind_listener
from allcores.cluster.settings import ClusterSettings
from allcores.errors import AllcoresError, ChannelError
from allcores.events import EventEmitter
from allcores.ipc.async_channel import AsyncChannel
from allcores.ipc.channel import channel_pair
from allcores.ipc.frames import read_unread
from allcores.observe.scoreboard import Row, RowState, Scoreboard

__all__ = ["ENV_CHANNEL_FD", "ENV_SCOREBOARD", "ENV_WORKER_ID", "Primary", "Worker"]

log = logging.getLogger("allcores.cluster")

ENV_WORKER_ID = "ALLCORES_WORKER_ID"
ENV_CHANNEL_FD = "ALLCORES_CHANNEL_FD"
ENV_SCOREBOARD = "ALLCORES_SCOREBOARD"  # "fd:rows:row"
ENV_PRIMARY_PID = "ALLCORES_PRIMARY_PID"

# Lines of a worker's stderr kept for its crash report: enough for a traceback.
_OUTPUT_LINES = 40
# Accepts per wakeup of a listener under balanced/rr: a burst of new connections is
# drained in one go, yet a flood cannot keep the loop from reading worker channels.
_ACCEPT_BATCH = 64
# Connections accepted while no worker can take one wait here (then the listener
# stops accepting, and the kernel's backlog holds the rest).
_PENDING_LIMIT = 1024
# Seconds between the end of a worker's own drain and the primary's SIGKILL: time
# for interpreter shutdown and atexit handlers, which take well under a second.
_KILL_MARGIN = 2.0
# While accepted connections wait for a worker, the primary retries this often: soon
# enough that a worker back from a blocked loop gets them within a frame or two of
# a human's patience, rare enough to cost nothing.
_RETRY_PENDING = 0.05
# Without pidfd (not Linux), exits are found by polling waitpid this often.
_POLL_EXITS = 0.1


def _new_loop() -> asyncio.AbstractEventLoop:
    """uvloop where installed: the primary's accept-and-pass path under `balanced` is
    a loop wake-up per connection, which uvloop makes cheaper."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


class ClusterError(AllcoresError):
    """The cluster could not do what was asked (fork in a worker, bad message, ...)."""


def signal_name(signum: int) -> str:
    try:
        return signal_module.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class Worker(EventEmitter):
    """The primary's handle on one worker: Node's `Worker`.

    Events: ``online()``, ``listening(address)``, ``message(message, handle)``,
    ``disconnect()``, ``exit(code, signal)``, ``error(exc)``.
    """

    def __init__(self, primary: Primary, worker_id: int, row: int) -> None:
        super().__init__()
        self.id = worker_id
        self.row = row
        self._primary = primary
        self.process: subprocess.Popen[bytes] | None = None
        self.exited_after_disconnect = False
        self.state = "none"
        self.started = time.monotonic()
        self.listening_once = False
        self.connections_sent = 0
        self.exit_code: int | None = None
        self.signal_code: str | None = None
        self.output: collections.deque[str] = collections.deque(maxlen=_OUTPUT_LINES)
        self._channel: AsyncChannel | None = None
        self._child_end: socket.socket | None = None
        self._row: Row | None = None
        self._output_partial = b""

    @property
    def pid(self) -> int:
        return self.process.pid if self.process is not None else 0

    def __repr__(self) -> str:
        return f"<Worker {self.id} pid={self.pid} {self.state}>"

    # -- Node's API -------------------------------------------------------------

    def send(self, message: Any, handle: socket.socket | int | None = None) -> bool:
        """Send *message* (anything picklable), optionally with a socket or fd."""
        if self._channel is None or self._channel.closed:
            return False
        fds = [] if handle is None else [handle if isinstance(handle, int) else handle.fileno()]
        self._channel.send({"t": "msg", "data": message}, fds)
        return True

    def disconnect(self) -> None:
        """Stop giving this worker connections; it finishes what is in flight, then exits."""
        self.exited_after_disconnect = True
        if self.state in ("disconnected", "dead"):
            return
        self.state = "disconnecting"
        self._primary._forget_listening(self)
        if self._channel is not None and not self._channel.closed:
            self._channel.send(
                {"t": "disconnect", "timeout": self._primary.settings.graceful_timeout}
            )
        self._primary._arm_kill_timer(self)

    def kill(self, sig: int | str = signal_module.SIGTERM) -> None:
        """Send *sig* (default SIGTERM) to the worker; a planned exit, as in Node."""
        self.exited_after_disconnect = True
        signum = getattr(signal_module, sig) if isinstance(sig, str) else sig
        self._primary._forget_listening(self)
        if self.process is not None and self.state != "dead":
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.process.pid, signum)

    destroy = kill

    def is_connected(self) -> bool:
        return self._channel is not None and not self._channel.closed

    def is_dead(self) -> bool:
        return self.state == "dead"

    # -- what the balancer reads -----------------------------------------------

    @property
    def open_connections(self) -> int:
        assert self._row is not None
        return self.connections_sent - int(self._row.get("connections_closed"))

    @property
    def heartbeat_age(self) -> float:
        assert self._row is not None
        beat = self._row.get("heartbeat")
        return time.monotonic() - beat if beat > 0 else float("inf")

    def can_take_connections(self) -> bool:
        """Its channel is open and not backed up (a backed-up channel means its loop is
        not reading: more fds would only pile up in the primary)."""
        channel = self._channel
        return channel is not None and not channel.closed and not channel.pending_writes


class _Listener:
    """One address the primary listens on, and the workers serving it."""

    def __init__(self, key: tuple[str, int], policy: str, sock: socket.socket) -> None:
        self.key = key
        self.policy = policy
        self.sock = sock
        self.address = Address.of(sock)
        self.workers: list[Worker] = []
        self.next_index = 0
        self.pending: collections.deque[socket.socket] = collections.deque()
        self.reading = False
        self.per_row: dict[int, socket.socket] = {}
        self.retry: asyncio.TimerHandle | None = None

    def close(self) -> None:
        if self.retry is not None:
            self.retry.cancel()
            self.retry = None
        for conn in self.pending:
            conn.close()
        self.pending.clear()
        self.sock.close()
        for sock in self.per_row.values():
            sock.close()
        self.per_row.clear()


class Primary(EventEmitter):
    """The cluster's primary process. `allcores.cluster` drives one of these."""

    def __init__(self, settings: ClusterSettings | None = None) -> None:
        super().__init__()
        self.settings = settings or ClusterSettings()
        self.workers: dict[int, Worker] = {}
        self._next_id = 1
        self._loop: asyncio.AbstractEventLoop | None = None
        self._own_loop = False
        self._scoreboard: Scoreboard | None = None
        self._free_rows: list[int] = []
        self._listeners: dict[tuple[str, int], _Listener] = {}
        self._wakeup: asyncio.Event | None = None
        self._signals: list[int] = []
        self._stopping = False
        self._stop_deadline: float | None = None
        self._failure: str | None = None
        self._crash_times: collections.deque[float] = collections.deque()
        self._slot_crashes: dict[int, int] = {}
        self._respawn_timers: set[asyncio.TimerHandle] = set()
        self._running = False
        self._ran = False
        self._atexit_registered = False
        self._kill_timers: dict[int, asyncio.TimerHandle] = {}
        self._reuseport_warned = False
        self._last_exit_unplanned = False

    # -- set-up -------------------------------------------------------------------

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            try:
                self._loop = asyncio.get_running_loop()
            except RuntimeError:
                self._loop = _new_loop()
                self._own_loop = True
            self._wakeup = asyncio.Event()
        return self._loop

    @property
    def scoreboard(self) -> Scoreboard:
        if self._scoreboard is None:
            # First use: the primary is becoming a primary. Every connection it passes
            # holds an fd for a moment, and a burst can be thousands.
            raise_fd_limit()
            self._scoreboard = Scoreboard.create(self.settings.max_workers)
            self._free_rows = list(range(self.settings.max_workers - 1, -1, -1))
        return self._scoreboard

    def scoreboard_row(self, row: int) -> Row:
        return self.scoreboard.row(row)

    def _wake(self) -> None:
        if self._wakeup is not None:
            self._wakeup.set()

    # -- fork -----------------------------------------------------------------

    def fork(self, env: dict[str, str] | None = None) -> Worker:
        """Start a worker that runs this program again (or `settings.exec`)."""
        return self._fork(env, None)

    def _fork(self, env: dict[str, str] | None, preferred_row: int | None) -> Worker:
        if self._stopping:
            raise ClusterError("the cluster is stopping; it starts no new workers")
        loop = self.loop
        scoreboard = self.scoreboard
        if not self._free_rows:
            raise ClusterError(
                f"cannot start more than {self.settings.max_workers} workers at once "
                "(ClusterSettings.max_workers)"
            )
        if preferred_row is not None and preferred_row in self._free_rows:
            # A respawn takes its predecessor's row, and with it (under reuseport)
            # the socket holding the connections queued for that row.
            self._free_rows.remove(preferred_row)
            row = preferred_row
        else:
            row = self._free_rows.pop()
        scoreboard.row(row).clear(state=RowState.STARTING)
        worker = Worker(self, self._next_id, row)
        worker._row = scoreboard.row(row)
        self._next_id += 1
        parent_sock, child_sock = channel_pair()
        argv = self._worker_argv()
        child_env = dict(os.environ)
        child_env.update(self.settings.env)
        if env:
            child_env.update({str(k): str(v) for k, v in env.items()})
        child_env[ENV_WORKER_ID] = str(worker.id)
        child_env[ENV_CHANNEL_FD] = str(child_sock.fileno())
        child_env[ENV_SCOREBOARD] = f"{scoreboard.fd}:{scoreboard.rows}:{row}"
        child_env[ENV_PRIMARY_PID] = str(os.getpid())
        # The process image for the interpreter is not always the executable path
        # (venv shims); orig_argv keeps -m / -c / -X options exactly as given.
        silent = self.settings.silent
        try:
            worker.process = subprocess.Popen(
                argv,
                env=child_env,
                pass_fds=(child_sock.fileno(), scoreboard.fd),
                stdout=subprocess.DEVNULL if silent else None,
                stderr=subprocess.PIPE,
                stdin=subprocess.DEVNULL,
                # Its own process group: a terminal's Ctrl-C reaches only the primary,
                # which then drains the workers in order instead of all dying at once.
                process_group=0,
            )
        except OSError as exc:
            parent_sock.close()
            child_sock.close()
            self._free_rows.append(row)
            raise ClusterError(f"cannot start worker {worker.id} ({argv[0]}): {exc}") from exc
        # The primary keeps its own reference to the worker's end: if the worker dies,
        # the connections passed to it that it never read stay queued there, and are
        # given to another worker instead of being reset (see _recover_connections).
        worker._child_end = child_sock
        scoreboard.row(row).set("pid", worker.process.pid)
        self.workers[worker.id] = worker
        worker._channel = AsyncChannel(
            parent_sock,
            lambda obj, fds: self._on_worker_message(worker, obj, fds),
            lambda exc: self._on_worker_channel_closed(worker, exc),
            loop=loop,
            on_error=lambda exc: self._on_bad_message(worker, exc),
        )
        self._watch_exit(worker)
        self._watch_output(worker)
        loop.call_soon(self._emit_both, "fork", worker)
        if not self._ran and not self._running and not self._atexit_registered and self._own_loop:
            # Node keeps a primary alive while it has workers. A script that forks and
            # falls off the end gets the same: the primary loop runs at exit.
            atexit.register(self._run_at_exit)
            self._atexit_registered = True
        return worker

    def _worker_argv(self) -> list[str]:
        if self.settings.exec is not None:
            args = list(self.settings.args if self.settings.args is not None else sys.argv[1:])
            if self.settings.exec.endswith(".py"):
                return [sys.executable, self.settings.exec, *args]
            return [self.settings.exec, *args]
        orig = list(getattr(sys, "orig_argv", []))
        if self.settings.args is not None:
            return [sys.executable, *orig[1 : len(orig) - len(sys.argv) + 1], *self.settings.args]
        if len(orig) >= 1:
            return [sys.executable, *orig[1:]]
        return [sys.executable, *sys.argv]

    def _emit_both(self, event: str, worker: Worker, *args: Any) -> None:
        worker.emit(event, *args)
        self.emit(event, worker, *args)

    # -- watching processes -----------------------------------------------------

    def _watch_exit(self, worker: Worker) -> None:
        assert worker.process is not None
        pid = worker.process.pid
        try:
            pidfd = os.pidfd_open(pid)
        except (AttributeError, OSError):
            self._poll_exit(worker)
            return

        def readable() -> None:
            self.loop.remove_reader(pidfd)
            os.close(pidfd)
            self._reap(worker)

        self.loop.add_reader(pidfd, readable)

    def _poll_exit(self, worker: Worker) -> None:
        assert worker.process is not None
        if worker.process.poll() is None:
            self.loop.call_later(_POLL_EXITS, self._poll_exit, worker)
        else:
            self._reap(worker)

    def _watch_output(self, worker: Worker) -> None:
        assert worker.process is not None and worker.process.stderr is not None
        fd = worker.process.stderr.fileno()
        os.set_blocking(fd, False)
        self.loop.add_reader(fd, self._read_output, worker)

    def _read_output(self, worker: Worker) -> None:
        """Forward what a worker wrote to stderr, and keep its last lines for reports."""
        pipe = worker.process.stderr if worker.process is not None else None
        if pipe is None or pipe.closed:
            return
        fd = pipe.fileno()
        while True:
            try:
                data = os.read(fd, 65536)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self.loop.remove_reader(fd)
                pipe.close()
                if worker._output_partial:
                    worker.output.append(worker._output_partial.decode(errors="replace"))
                    worker._output_partial = b""
                return
            if not self.settings.silent:
                with contextlib.suppress(AttributeError, ValueError, OSError):
                    sys.stderr.buffer.write(data)
                    sys.stderr.flush()
            lines = (worker._output_partial + data).split(b"\n")
            worker._output_partial = lines.pop()[-4096:]
            worker.output.extend(line.decode(errors="replace") for line in lines[-_OUTPUT_LINES:])

    def _reap(self, worker: Worker) -> None:
        assert worker.process is not None
        try:
            status = worker.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.loop.call_later(_POLL_EXITS, self._reap, worker)
            return
        # Its last words may still be in the pipe: read them before reporting the exit.
        self._read_output(worker)
        code: int | None = status if status >= 0 else None
        sig = signal_name(-status) if status < 0 else None
        worker.exit_code, worker.signal_code = code, sig
        self._forget_listening(worker)
        self._recover_connections(worker)
        if worker._channel is not None and not worker._channel.closed:
            worker._channel.close()
        timer = self._kill_timers.pop(worker.id, None)
        if timer is not None:
            timer.cancel()
        worker.state = "dead"
        self.workers.pop(worker.id, None)
        if self._scoreboard is not None:
            self._scoreboard.row(worker.row).clear()
            self._free_rows.append(worker.row)
            self._free_rows.sort(reverse=True)
        self._emit_both("exit", worker, code, sig)
        self._last_exit_unplanned = not worker.exited_after_disconnect and not self._stopping
        respawning = self._last_exit_unplanned and self._unplanned_exit(worker, code, sig)
        if not respawning:
            self._release_row_sockets(worker.row)
        self._wake()

    def _take_back(self, worker: Worker, obj: dict[str, Any], fds: list[int]) -> None:
        """A worker returned a connection its closed server could not take."""
        for extra in fds[1:]:
            os.close(extra)
        if not fds:
            return
        conn = socket.socket(fileno=fds[0])
        listener = self._listeners.get(tuple(obj.get("key", ())))  # type: ignore[arg-type]
        if listener is None or self._stopping:
            conn.close()
            return
        if worker in listener.workers:
            listener.workers.remove(worker)
        if not self._hand_over(listener, conn):
            listener.pending.append(conn)
            self._retry_pending_later(listener)

    def _recover_connections(self, worker: Worker) -> None:
        """Give the connections a dead worker never took to the others."""
        child_end, worker._child_end = worker._child_end, None
        if child_end is None:
            return
        recovered = 0
        for obj, fds in read_unread(child_end):
            listener = None
            if isinstance(obj, dict) and obj.get("t") == "conn" and fds:
                listener = self._listeners.get(tuple(obj.get("key", ())))  # type: ignore[arg-type]
            if listener is None or self._stopping:
                for fd in fds:
                    os.close(fd)
                continue
            for extra in fds[1:]:
                os.close(extra)
            conn = socket.socket(fileno=fds[0])
            recovered += 1
            if not self._hand_over(listener, conn):
                listener.pending.append(conn)
        child_end.close()
        if recovered:
            log.info(
                "allcores: %d connection(s) worker %d never took went to others",
                recovered,
                worker.id,
            )

    # -- supervision ------------------------------------------------------------

    def _describe_exit(self, worker: Worker, code: int | None, sig: str | None) -> str:
        how = f"killed by {sig}" if sig else f"exit code {code}"
        booting = not worker.listening_once and (
            time.monotonic() - worker.started < self.settings.boot_period
        )
        when = "failed while booting" if booting else "crashed"
        return f"worker {worker.id} (pid {worker.pid}) {when}: {how}"

    def _unplanned_exit(self, worker: Worker, code: int | None, sig: str | None) -> bool:
        """Count a crash; stop after a crash loop, else maybe respawn. True if respawning."""
        now = time.monotonic()
        window = self.settings.crash_loop_window
        self._crash_times.append(now)
        while self._crash_times and now - self._crash_times[0] > window:
            self._crash_times.popleft()
        description = self._describe_exit(worker, code, sig)
        log.warning("allcores: %s", description)
        if len(self._crash_times) >= self.settings.crash_loop_limit:
            output = "\n".join(f"  | {line}" for line in worker.output) or "  (no output)"
            self._failure = (
                f"allcores: {description}; {len(self._crash_times)} unplanned worker exits "
                f"within {window:g} s (crash_loop_limit={self.settings.crash_loop_limit}): "
                f"stopping the cluster.\nLast output of worker {worker.id}:\n{output}"
            )
            self.stop()
            return False
        rule = self.settings.respawn
        wanted = rule(worker, code, sig) if callable(rule) else rule
        if not wanted:
            return False
        lived = now - worker.started
        streak = 0 if lived > window else self._slot_crashes.get(worker.row, 0)
        self._slot_crashes[worker.row] = streak + 1
        delay = min(self.settings.respawn_delay * 2**streak, self.settings.respawn_delay_max)
        delay *= random.uniform(0.5, 1.5)
        handle: asyncio.TimerHandle | None = None

        def respawn() -> None:
            assert handle is not None
            self._respawn_timers.discard(handle)
            self._respawn(worker.row)

        handle = self.loop.call_later(delay, respawn)
        self._respawn_timers.add(handle)
        return True

    def _respawn(self, row: int) -> None:
        if not self._stopping:
            try:
                if self._fork(None, row).row != row:
                    self._release_row_sockets(row)
            except ClusterError as exc:
                self._release_row_sockets(row)
                log.error("allcores: respawn failed: %s", exc)
        self._wake()

    def _arm_kill_timer(self, worker: Worker) -> None:
        if worker.id in self._kill_timers:
            return

        def kill() -> None:
            self._kill_timers.pop(worker.id, None)
            if worker.state != "dead" and worker.process is not None:
                log.warning(
                    "allcores: worker %d (pid %d) still running %g s after disconnect; killing it",
                    worker.id,
                    worker.pid,
                    self.settings.graceful_timeout,
                )
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.process.pid, signal_module.SIGKILL)

        # The worker drains for graceful_timeout itself; the margin lets a drain that
        # used all of it still exit on its own instead of being killed mid-exit.
        deadline = self.settings.graceful_timeout + _KILL_MARGIN
        self._kill_timers[worker.id] = self.loop.call_later(deadline, kill)

    def stop(self) -> None:
        """Stop accepting, drain every worker within the graceful timeout, then end."""
        if self._stopping:
            return
        self._stopping = True
        for timer in self._respawn_timers:
            timer.cancel()
        self._respawn_timers.clear()
        for listener in self._listeners.values():
            if listener.reading:
                self.loop.remove_reader(listener.sock.fileno())
                listener.reading = False
            listener.close()
        self._listeners.clear()
        for worker in list(self.workers.values()):
            worker.disconnect()
        self._wake()

    def disconnect(self, callback: Callable[[], Any] | None = None) -> None:
        """Node's cluster.disconnect(): disconnect every worker, then call *callback*."""
        for worker in list(self.workers.values()):
            worker.disconnect()
        if callback is not None:

            async def when_all_gone() -> None:
                while self.workers:
                    await asyncio.sleep(0.05)
                callback()

            self.loop.create_task(when_all_gone())

    def _on_signal(self, signum: int) -> None:
        # Record only; `_supervise` acts.
        self._signals.append(signum)
        self._wake()

    async def _supervise(self) -> int:
        assert self._wakeup is not None
        while True:
            while self._signals:
                signum = self._signals.pop(0)
                if self._stopping and signum == signal_module.SIGINT:
                    log.warning("allcores: second SIGINT: killing workers now")
                    for worker in list(self.workers.values()):
                        worker.kill(signal_module.SIGKILL)
                else:
                    log.info("allcores: %s: stopping gracefully", signal_name(signum))
                    self.stop()
            if not self.workers and not self._respawn_timers:
                break
            self._wakeup.clear()
            await self._wakeup.wait()
        if self._failure is not None:
            print(self._failure, file=sys.stderr, flush=True)
            return 1
        return 0

    async def run_async(self) -> int:
        """Supervise until every worker is gone; returns the primary's exit code."""
        if self._running:
            raise ClusterError("the primary is already running")
        self._running = True
        self._ran = True
        loop = self.loop
        assert self._wakeup is not None
        installed: list[int] = []
        for signum in (int(signal_module.SIGTERM), int(signal_module.SIGINT)):
            try:
                loop.add_signal_handler(signum, self._on_signal, signum)
                installed.append(signum)
            except (RuntimeError, ValueError):
                pass  # not the main thread: the caller handles signals
        try:
            return await self._supervise()
        finally:
            for signum in installed:
                loop.remove_signal_handler(signum)
            self._running = False
            self._close_all()

    def run(self) -> int:
        """Block in the primary's loop until the cluster ends; returns the exit code.

        0 after a clean stop (SIGTERM/SIGINT or every worker disconnected), 1 after a
        crash loop or when every worker died unplanned with no respawn.
        """
        loop = self.loop
        if loop.is_running():
            raise ClusterError("run() called inside a running event loop; use await run_async()")
        try:
            code = loop.run_until_complete(self.run_async())
        finally:
            if self._own_loop:
                loop.run_until_complete(loop.shutdown_asyncgens())
        if code == 0 and self._last_exit_unplanned:
            # Nothing stopped the cluster: its last worker died unplanned.
            code = 1
        return code

    def _run_at_exit(self) -> None:
        if self._ran:
            return
        code = self.run()
        if code:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)

    def _close_all(self) -> None:
        for listener in self._listeners.values():
            if listener.reading:
                self.loop.remove_reader(listener.sock.fileno())
            listener.close()
        self._listeners.clear()
        for timer in self._kill_timers.values():
            timer.cancel()
        self._kill_timers.clear()
        if self._scoreboard is not None and not self.workers:
            self._scoreboard.close()
            self._scoreboard = None

    # -- channel messages ---------------------------------------------------------

    def _on_worker_message(self, worker: Worker, obj: Any, fds: list[int]) -> None:
        kind = obj.get("t") if isinstance(obj, dict) else None
        if kind == "msg":
            handle = socket.socket(fileno=fds[0]) if fds else None
            for extra in fds[1:]:
                os.close(extra)
            self._emit_both("message", worker, obj.get("data"), handle)
            return
        if kind == "conn-back":
            self._take_back(worker, obj, fds)
            return
        for fd in fds:
            os.close(fd)
        if kind == "online":
            worker.state = "online"
            self.scoreboard.row(worker.row).set("state", RowState.READY)
            self._emit_both("online", worker)
        elif kind == "listen":
            self._on_listen(worker, obj)
        elif kind == "unlisten":
            self._forget_listening(worker)
        elif kind == "bye":
            # The worker closes its end after this; with the primary holding a
            # reference to that end no EOF would tell us, so the worker says so.
            if worker._channel is not None:
                worker._channel.close()
        elif kind == "disconnecting":
            worker.exited_after_disconnect = True
            worker.state = "disconnecting"
            self._forget_listening(worker)
            self._arm_kill_timer(worker)
        else:
            log.warning("allcores: worker %d sent an unknown message %r; ignored", worker.id, obj)

    def _on_bad_message(self, worker: Worker, exc: ChannelError) -> None:
        log.error("allcores: worker %d sent a message that was dropped: %s", worker.id, exc)
        worker.emit("error", exc)

    def _on_worker_channel_closed(self, worker: Worker, exc: BaseException | None) -> None:
        if isinstance(exc, ChannelError):
            log.error("allcores: channel to worker %d broke: %s", worker.id, exc)
            worker.emit("error", exc)
        self._forget_listening(worker)
        if worker.state != "dead":
            worker.state = "disconnected"
        self._emit_both("disconnect", worker)
        if worker.exited_after_disconnect:
            self._arm_kill_timer(worker)

    # -- listening ------------------------------------------------------------------

    def _on_listen(self, worker: Worker, request: dict[str, Any]) -> None:
        host = request.get("host") or "0.0.0.0"
        port = int(request.get("port") or 0)
        policy = self.settings.scheduling_policy
        reply: dict[str, Any] = {"t": "listening", "req": request.get("req"), "policy": policy}
        if self._stopping or worker.state in ("disconnecting", "disconnected"):
            reply["stopping"] = True
            self._send(worker, reply)
            return
        key = (host, port)
        listener = self._listeners.get(key)
        try:
            if listener is None:
                backlog = request.get("backlog") or 2048
                reuseport = policy == "reuseport"
                # Under reuseport the primary's own socket only holds the port (bound,
                # not listening, so the kernel sends it nothing); each worker row gets
                # its own listening socket.
                sock = bind_listener(
                    host, port, backlog=backlog, reuseport=reuseport, listen=not reuseport
                )
                listener = _Listener(key, policy, sock)
                self._listeners[key] = listener
                if port == 0:
                    # Port 0 means "any": every worker that asks gets the same one.
                    self._listeners[(host, listener.address.port)] = listener
        except OSError as exc:
            reply["error"] = str(exc)
            self._send(worker, reply)
            return
        address = listener.address
        reply["address"] = (address.address, address.port, address.address_type)
        reply["key"] = list(listener.key)
        fds: list[int] = []
        if policy == "shared":
            fds = [listener.sock.fileno()]
        elif policy == "reuseport":
            self._warn_reuseport()
            backlog = request.get("backlog") or 2048
            fds = [self._reuseport_socket(listener, worker.row, backlog).fileno()]
        if worker not in listener.workers:
            listener.workers.append(worker)
        self._send(worker, reply, fds)
        worker.state = "listening"
        worker.listening_once = True
        self._slot_crashes.pop(worker.row, None)
        if policy in ("balanced", "rr"):
            self._flush_pending(listener)
            self._start_accepting(listener)
        self._emit_both("listening", worker, listener.address)

    def _reuseport_socket(self, listener: _Listener, row: int, backlog: int) -> socket.socket:
        """The SO_REUSEPORT socket of a scoreboard row: a respawned worker takes over
        its predecessor's socket, with the connections queued on it."""
        sock = listener.per_row.get(row)
        if sock is None:
            host = listener.key[0]
            sock = bind_listener(host, listener.address.port, backlog=backlog, reuseport=True)
            listener.per_row[row] = sock
        return sock

    def _release_row_sockets(self, row: int) -> None:
        """A row no worker will fill: close its reuseport sockets, or the kernel keeps
        sending them connections that nobody accepts."""
        for listener in self._listeners.values():
            sock = listener.per_row.pop(row, None)
            if sock is not None:
                sock.close()

    def _warn_reuseport(self) -> None:
        if self._reuseport_warned:
            return
        self._reuseport_warned = True
        migrate = ""
        with contextlib.suppress(OSError), open("/proc/sys/net/ipv4/tcp_migrate_req") as f:
            migrate = f.read().strip()
        if migrate != "1":
            log.warning(
                "allcores: policy 'reuseport': connections queued on a worker's socket "
                "wait while that worker is replaced, and are lost if its socket is closed; "
                "set net.ipv4.tcp_migrate_req=1 to let the kernel move them"
            )

    def _send(self, worker: Worker, obj: Any, fds: list[int] | None = None) -> bool:
        channel = worker._channel
        if channel is None or channel.closed:
            return False
        try:
            channel.send(obj, fds or ())
        except (ChannelError, OSError):  # OSError: out of fds to queue the message with
            return False
        return True

    def _forget_listening(self, worker: Worker) -> None:
        for listener in self._listeners.values():
            if worker in listener.workers:
                listener.workers.remove(worker)

    def _start_accepting(self, listener: _Listener) -> None:
        if not listener.reading and listener.workers:
            listener.reading = True
            self.loop.add_reader(listener.sock.fileno(), self._on_acceptable, listener)

    def _stop_accepting(self, listener: _Listener) -> None:
        if listener.reading:
            listener.reading = False
            self.loop.remove_reader(listener.sock.fileno())

    def _pick(self, listener: _Listener) -> Worker | None:
        candidates = [w for w in listener.workers if w.can_take_connections()]
        if not candidates:
            return None
        start = listener.next_index
        listener.next_index = (start + 1) % len(candidates)
        if listener.policy == "rr":
            return round_robin(candidates, start)
        return least_busy_worker(candidates, start, self.settings.heartbeat_stale)

    def _hand_over(self, listener: _Listener, conn: socket.socket) -> bool:
        for _attempt in range(len(listener.workers) + 1):
            worker = self._pick(listener)
            if worker is None:
                return False
            if self._send(worker, {"t": "conn", "key": list(listener.key)}, [conn.fileno()]):
                worker.connections_sent += 1
                conn.close()
                return True
            self._forget_listening(worker)
        return False

    def _on_acceptable(self, listener: _Listener) -> None:
        for _ in range(_ACCEPT_BATCH):
            try:
                conn, _addr = listener.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.error("allcores: accept on %s failed: %s", listener.address, exc)
                return
            if conn.family in (socket.AF_INET, socket.AF_INET6):
                # Workers get the connection already made; set what an accepting event
                # loop would have set (asyncio and uvloop disable Nagle on TCP).
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if not self._hand_over(listener, conn):
                listener.pending.append(conn)
                if len(listener.pending) >= _PENDING_LIMIT or not listener.workers:
                    self._stop_accepting(listener)
                self._retry_pending_later(listener)
                return

    def _retry_pending_later(self, listener: _Listener) -> None:
        """Workers may be back (loops unblocked, channels drained): try again soon."""
        if listener.retry is None:
            listener.retry = self.loop.call_later(_RETRY_PENDING, self._retry_pending, listener)

    def _retry_pending(self, listener: _Listener) -> None:
        listener.retry = None
        if self._stopping or self._listeners.get(listener.key) is not listener:
            return
        self._flush_pending(listener)
        if listener.pending:
            self._retry_pending_later(listener)
        else:
            self._start_accepting(listener)

    def _flush_pending(self, listener: _Listener) -> None:
        while listener.pending:
            conn = listener.pending.popleft()
            if not self._hand_over(listener, conn):
                listener.pending.appendleft(conn)
                return
