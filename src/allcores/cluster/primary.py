"""The primary: starts workers, answers them, and supervises them in one loop.

`Primary` is what `allcores.cluster` drives in the primary process. Its parts::

    Primary (this module): fork, run, stop, disconnect; channel messages; supervision
      ├── handle.py    Worker: the primary's handle on one worker (Node's Worker)
      ├── spawn.py     argv and environment, Popen, exit watch (pidfd), stderr tail
      ├── handover.py  listening sockets; accept, pick a worker, pass the fd
      ├── inbox.py     what each frame from a worker does
      ├── policy.py    crash loop and respawn backoff: pure, no I/O
      ├── rolling.py   reload: replace the workers one at a time, each old one
      │                draining only once its successor listens
      ├── health.py    hung-loop watchdog; recycling (max requests, RSS, lifetime)
      └── messages.py  the message kinds on a worker's channel, with the diagram of
                       who sends which

Supervision is one coroutine (`_supervise`), as in gunicorn's arbiter. Signal
handlers, process exits (pidfd readable) and channel events only record what
happened and wake it::

    SIGTERM / SIGINT ──► _signals ──┐
    SIGHUP ────────────► _signals ──┤
    worker exited ─────► _exits ────┼──► _supervise: wake, then
    stop() ─────────────────────────┘      1. act on signals: drain, or kill at once;
                                              SIGHUP queues a rolling reload
                                           2. bury each exit: recover its connections,
                                              free its row, emit "exit", judge it
                                              (policy.py): a crash may make its row
                                              wanted again after a backoff, a crash
                                              loop stops the cluster
                                           3. refill the wanted rows that are due
                                           4. close reuseport sockets of rows that no
                                              worker holds and none is wanted for
                                           5. every health interval: hung loops,
                                              workers due to be recycled (health.py)
                                           6. end when no worker is left or wanted;
                                              else sleep until woken, a row is due
                                              or the next health check
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import contextlib
import logging
import os
import random
import signal
import socket
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from allcores._system import new_event_loop, raise_fd_limit, signal_name
from allcores.cluster import messages
from allcores.cluster.handle import Worker
from allcores.cluster.handover import Handover
from allcores.cluster.health import Health
from allcores.cluster.inbox import Inbox
from allcores.cluster.listeners import Address
from allcores.cluster.policy import Exit, RespawnPolicy, Verdict
from allcores.cluster.rolling import Rolling
from allcores.cluster.settings import ClusterSettings
from allcores.cluster.spawn import (
    ENV_CHANNEL_FD,
    ENV_PRIMARY_PID,
    ENV_SCOREBOARD,
    ENV_WORKER_ID,
    ExitWatch,
    StderrTail,
    start_process,
    worker_argv,
    worker_env,
)
from allcores.errors import AllcoresError
from allcores.events import EventEmitter
from allcores.ipc.async_channel import AsyncChannel
from allcores.ipc.channel import channel_pair
from allcores.observe.scoreboard import RowState, Scoreboard

if TYPE_CHECKING:
    # Only `allcores serve --preload` makes one; a worker need not import a zygote.
    from allcores.cluster.forking import ForkLauncher

__all__ = [
    "ENV_CHANNEL_FD",
    "ENV_PRIMARY_PID",
    "ENV_SCOREBOARD",
    "ENV_WORKER_ID",
    "ClusterError",
    "Primary",
    "Worker",
]

log = logging.getLogger("allcores.cluster")

# Seconds between the end of a worker's own drain and the primary's SIGKILL: time
# for interpreter shutdown and atexit handlers, which take well under a second.
_KILL_MARGIN = 2.0


class ClusterError(AllcoresError):
    """The cluster could not do what was asked (fork in a worker, bad message, ...)."""


class Primary(EventEmitter):
    """The cluster's primary process. `allcores.cluster` drives one of these."""

    def __init__(self, settings: ClusterSettings | None = None) -> None:
        super().__init__()
        self.settings = settings or ClusterSettings()
        self.workers: dict[int, Worker] = {}
        self._next_id = 1
        self._loop: asyncio.AbstractEventLoop | None = None
        self._own_loop = False
        self._handover = Handover(lambda: self.loop, self.settings)
        self._scoreboard: Scoreboard | None = None
        self._free_rows: list[int] = []
        self._wakeup: asyncio.Event | None = None
        # What happened since `_supervise` last looked; it alone acts on these.
        self._signals: list[int] = []
        self._exits: list[tuple[Worker, float]] = []
        # Rows to refill after a crash, and when (monotonic seconds).
        self._wanted: dict[int, float] = {}
        self._policy = RespawnPolicy(self.settings)
        self._stopping = False
        self._failure: str | None = None
        self._running = False
        self._ran = False
        self._atexit_registered = False
        self._kill_timers: dict[int, asyncio.TimerHandle] = {}
        self._last_exit_unplanned = False
        self._when_all_gone: list[Callable[[], Any]] = []
        self._rolling = Rolling(self)
        self.launcher: ForkLauncher | None = None
        """Set: workers are forked from its zygote instead of started as programs."""
        self._inbox = Inbox(self)
        self.restarts: collections.Counter[str] = collections.Counter()
        """Workers replaced, by cause: crash, hung, reload, recycle."""
        self._health = Health(self)
        self._next_health = 0.0
        # Boot failures whose output was printed, digits blanked: the next worker
        # that fails the same way (an import error fails every one) is not repeated.
        self._shown_failures: set[str] = set()

    # -- set-up -------------------------------------------------------------------

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            try:
                self._loop = asyncio.get_running_loop()
            except RuntimeError:
                self._loop = new_event_loop()
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

    @property
    def stopping(self) -> bool:
        return self._stopping

    def _wake(self) -> None:
        if self._wakeup is not None:
            self._wakeup.set()

    def _emit_both(self, event: str, worker: Worker, *args: Any) -> None:
        worker.emit(event, *args)
        self.emit(event, worker, *args)

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
        if self.launcher is not None:
            try:
                worker.process = self.launcher.start(
                    loop, worker.id, row, child_sock, lambda status: self._on_exit(worker, status)
                )
            except OSError as exc:
                parent_sock.close()
                child_sock.close()
                self._free_rows.append(row)
                raise ClusterError(f"cannot fork worker {worker.id}: {exc}") from exc
            return self._started(worker, row, parent_sock, child_sock)
        argv = worker_argv(self.settings)
        child_env = worker_env(
            self.settings,
            env,
            worker_id=worker.id,
            channel_fd=child_sock.fileno(),
            scoreboard=f"{scoreboard.fd}:{scoreboard.rows}:{row}",
        )
        silent = self.settings.silent
        try:
            process = start_process(
                argv, child_env, (child_sock.fileno(), scoreboard.fd), silent=silent
            )
        except OSError as exc:
            parent_sock.close()
            child_sock.close()
            self._free_rows.append(row)
            raise ClusterError(f"cannot start worker {worker.id} ({argv[0]}): {exc}") from exc
        worker.process = process
        worker = self._started(worker, row, parent_sock, child_sock)
        ExitWatch(loop, process, lambda status: self._on_exit(worker, status))
        # Its stderr is held until it listens (or has been up `boot_period`): a boot
        # failure's traceback is then shown once, not once per worker started.
        worker._stderr = StderrTail(loop, process, worker.output, silent=silent, hold=True)
        loop.call_later(self.settings.boot_period, worker._stderr.release)
        return worker

    def _started(
        self, worker: Worker, row: int, parent_sock: socket.socket, child_sock: socket.socket
    ) -> Worker:
        """A worker process exists: its row, its channel, its events."""
        loop = self.loop
        assert worker.process is not None
        worker._child_end = child_sock
        self.scoreboard.row(row).set("pid", worker.process.pid)
        self.workers[worker.id] = worker
        inbox = self._inbox
        worker._channel = AsyncChannel(
            parent_sock,
            lambda obj, fds: inbox.on_message(worker, obj, fds),
            lambda exc: inbox.on_closed(worker, exc),
            loop=loop,
            on_error=lambda exc: inbox.on_bad_message(worker, exc),
        )
        loop.call_soon(self._emit_both, "fork", worker)
        if not self._ran and not self._running and not self._atexit_registered and self._own_loop:
            # Node keeps a primary alive while it has workers. A script that forks and
            # falls off the end gets the same: the primary loop runs at exit.
            atexit.register(self._run_at_exit)
            self._atexit_registered = True
        return worker

    # -- what a Worker asks of its primary ------------------------------------------

    def _disconnect_worker(self, worker: Worker) -> None:
        self._start_draining(worker)
        # While the cluster goes on, a draining worker hands its idle keep-alive
        # connections back for another worker to serve; when it stops, it closes them.
        frame = {
            "t": messages.DISCONNECT,
            "timeout": self.settings.graceful_timeout,
            "handoff": not self._stopping,
        }
        worker._post(frame)
        self._arm_kill_timer(worker)

    def _forget_listening(self, worker: Worker) -> None:
        self._handover.forget(worker)

    def _start_draining(self, worker: Worker) -> None:
        """Route nothing more to *worker*, and under reuseport close its row's socket
        now: the kernel would go on queueing connections there that nobody accepts."""
        self._forget_listening(worker)
        self._handover.close_row(worker.row)

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
                    os.kill(worker.process.pid, signal.SIGKILL)

        # The worker drains for graceful_timeout itself; the margin lets a drain that
        # used all of it still exit on its own instead of being killed mid-exit.
        deadline = self.settings.graceful_timeout + _KILL_MARGIN
        self._kill_timers[worker.id] = self.loop.call_later(deadline, kill)

    # -- stopping -------------------------------------------------------------------

    def bind(self, host: str | None, port: int, backlog: int | None = None) -> Address:
        """Listen on (host, port) before any worker asks for it: a taken port is a
        BindError here, and port 0 gets its number (workers then ask for that port)."""
        self.scoreboard  # noqa: B018 - a primary from here on: its fd limit is raised
        return self._handover.bind(host, port, backlog)

    def reload(self) -> None:
        """Replace every worker, one at a time, each old one draining only once its
        successor listens (SIGHUP does this). A reload asked for during another runs
        after it; if a new worker fails, the reload stops and the old ones serve on."""
        if self._stopping:
            raise ClusterError("the cluster is stopping; it does not reload")
        self._rolling.reload()

    def serving(self, *, listening: bool = False) -> list[Worker]:
        """The workers that serve or boot to serve, and are meant to go on (not
        draining, not a reload's candidate), oldest first; with *listening*, only
        those that listen already."""
        workers = [w for w in self.workers.values() if w.serving()]
        if listening:
            workers = [w for w in workers if w.state == "listening"]
        return sorted(workers, key=lambda w: w.started)

    def scale(self, count: int) -> None:
        """Run *count* workers: start new ones, or drain the newest (Node has no such
        call; PM2's ``scale``). A crashed worker waiting for its respawn counts."""
        if self._stopping:
            raise ClusterError("the cluster is stopping; it does not scale")
        if count < 0:
            raise ClusterError(f"cannot run {count} workers: give 0 or more")
        serving = self.serving()
        extra = len(serving) + len(self._wanted) - count
        log.info("allcores: scaling to %d worker(s)", count)
        for _ in range(-extra):
            self._fork(None, None)
        for row in sorted(self._wanted, reverse=True)[: max(0, extra)]:
            del self._wanted[row]
            extra -= 1
        for worker in reversed(serving[len(serving) - max(0, extra) :]):
            worker.disconnect()

    def stop(self) -> None:
        """Stop accepting, drain every worker within the graceful timeout, then end."""
        if self._stopping:
            return
        self._stopping = True
        self._rolling.cancel()
        self._wanted.clear()
        self._handover.close()
        for worker in list(self.workers.values()):
            worker.disconnect()
        self._wake()

    def disconnect(self, callback: Callable[[], Any] | None = None) -> None:
        """Node's cluster.disconnect(): disconnect every worker, then call *callback*."""
        for worker in list(self.workers.values()):
            worker.disconnect()
        if callback is not None:
            if self.workers:
                self._when_all_gone.append(callback)
            else:
                self.loop.call_soon(callback)

    # -- recording (callbacks only record, then wake `_supervise`) ------------------------

    def _on_signal(self, signum: int) -> None:
        self._signals.append(signum)
        self._wake()

    def _on_exit(self, worker: Worker, status: int) -> None:
        worker.exit_code = status if status >= 0 else None
        worker.signal_code = signal_name(-status) if status < 0 else None
        # Dead from now on: nothing may signal its pid, which the kernel may reuse.
        worker.state = "dead"
        self._exits.append((worker, time.monotonic()))
        self._wake()

    # -- supervision ------------------------------------------------------------

    async def _supervise(self) -> int:
        assert self._wakeup is not None
        while True:
            self._wakeup.clear()
            self._act_on_signals()
            now = time.monotonic()
            self._reconcile(now)
            if not self.workers and not self._wanted:
                break
            interval = self._health.interval
            if interval is not None and now >= self._next_health and not self._stopping:
                self._next_health = now + interval
                self._health.check(now)
            await self._sleep()
        if self._failure is not None:
            print(self._failure, file=sys.stderr, flush=True)
            return 1
        return 0

    def _act_on_signals(self) -> None:
        while self._signals:
            signum = self._signals.pop(0)
            if self._stopping and signum == signal.SIGINT:
                log.warning("allcores: second SIGINT: killing workers now")
                for worker in list(self.workers.values()):
                    worker.kill(signal.SIGKILL)
            elif signum == signal.SIGHUP:
                if not self._stopping:
                    log.info("allcores: SIGHUP: rolling reload")
                    self._rolling.reload()
            else:
                log.info("allcores: %s: stopping gracefully", signal_name(signum))
                self.stop()

    def _reconcile(self, now: float) -> None:
        """Bring the live workers in line with what is wanted: bury the exits, refill
        the rows that are due, let go of the rows nobody will fill."""
        while self._exits:
            worker, ended = self._exits.pop(0)
            self._bury(worker, ended)
        for row, due in list(self._wanted.items()):
            if due <= now:
                del self._wanted[row]
                self._respawn(row)
        held = {worker.row for worker in self.workers.values()}
        self._handover.keep_rows(held | self._wanted.keys())

    async def _sleep(self) -> None:
        """Until something is recorded, or the next wanted row is due."""
        assert self._wakeup is not None
        timer = None
        due = [*self._wanted.values()]
        if self._health.interval is not None and not self._stopping:
            due.append(self._next_health)
        if due:
            timer = self.loop.call_later(max(0.0, min(due) - time.monotonic()), self._wake)
        try:
            await self._wakeup.wait()
        finally:
            if timer is not None:
                timer.cancel()

    def _bury(self, worker: Worker, ended: float) -> None:
        """Everything that follows a worker's exit, then the decision on its row."""
        repeated = worker._stderr is not None and not worker._stderr.show_once(self._shown_failures)
        self._forget_listening(worker)
        self._handover.recover(worker)
        if worker._channel is not None and not worker._channel.closed:
            worker._channel.close()
        timer = self._kill_timers.pop(worker.id, None)
        if timer is not None:
            timer.cancel()
        self.workers.pop(worker.id, None)
        self._health.forget(worker)
        if self._scoreboard is not None:
            self._scoreboard.row(worker.row).clear()
            self._free_rows.append(worker.row)
            self._free_rows.sort(reverse=True)
        self._emit_both("exit", worker, worker.exit_code, worker.signal_code)
        if not self.workers:
            for callback in self._when_all_gone:
                self.loop.call_soon(callback)
            self._when_all_gone.clear()
        # A reload's candidate that never listened failed the reload, which says so.
        planned = worker.exited_after_disconnect or self._stopping or worker.candidate
        self._last_exit_unplanned = not planned
        worker_exit = Exit(
            worker_id=worker.id,
            pid=worker.pid,
            code=worker.exit_code,
            signal=worker.signal_code,
            row=worker.row,
            started=worker.started,
            ended=ended,
            listened=worker.listening_once,
            planned=planned,
        )
        verdict = self._policy.judge(worker_exit)
        if verdict is Verdict.PLANNED:
            return
        # Its output was held back and is the same as a worker's before it: one line.
        same = " (its output: the same as above)" if repeated and worker.output else ""
        log.warning("allcores: %s%s", self._policy.describe(worker_exit), same)
        self.restarts["hung" if worker.hung else "crash"] += 1
        if verdict is Verdict.CRASH_LOOP:
            self._failure = self._policy.crash_loop_report(
                worker_exit, worker.output, shown_above=not self.settings.silent
            )
            self.stop()
        elif self._respawn_wanted(worker):
            delay = self._policy.respawn_delay(worker_exit, random.random())
            self._wanted[worker.row] = ended + delay

    def _respawn_wanted(self, worker: Worker) -> bool:
        rule = self.settings.respawn
        if not callable(rule):
            return rule
        try:
            return bool(rule(worker, worker.exit_code, worker.signal_code))
        except Exception:
            log.exception("allcores: the respawn rule raised; worker %d is not replaced", worker.id)
            return False

    def _respawn(self, row: int) -> None:
        try:
            self._fork(None, row)
        except (ClusterError, OSError) as exc:  # OSError: out of fds for its channel
            log.error("allcores: respawn failed: %s", exc)

    # -- running --------------------------------------------------------------------

    async def run_async(self) -> int:
        """Supervise until every worker is gone; returns the primary's exit code."""
        if self._running:
            raise ClusterError("the primary is already running")
        self._running = True
        self._ran = True
        loop = self.loop
        installed: list[int] = []
        for signum in (int(signal.SIGTERM), int(signal.SIGINT), int(signal.SIGHUP)):
            try:
                loop.add_signal_handler(signum, self._on_signal, signum)
                installed.append(signum)
            except (RuntimeError, ValueError):
                pass  # not the main thread: the caller handles signals
        try:
            code = await self._supervise()
        finally:
            for signum in installed:
                loop.remove_signal_handler(signum)
            self._running = False
            self._close_all()
        if code == 0 and self._last_exit_unplanned:
            # Nothing stopped the cluster: its last worker died unplanned.
            code = 1
        return code

    def run(self) -> int:
        """Block in the primary's loop until the cluster ends; returns the exit code.

        0 after a clean stop (SIGTERM/SIGINT or every worker disconnected), 1 after a
        crash loop or when every worker died unplanned with no respawn.
        """
        loop = self.loop
        if loop.is_running():
            raise ClusterError("run() called inside a running event loop; use await run_async()")
        try:
            return loop.run_until_complete(self.run_async())
        finally:
            if self._own_loop:
                loop.run_until_complete(loop.shutdown_asyncgens())

    def _run_at_exit(self) -> None:
        if self._ran:
            return
        code = self.run()
        if code:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)

    def _close_all(self) -> None:
        self._handover.close()
        for timer in self._kill_timers.values():
            timer.cancel()
        self._kill_timers.clear()
        if self._scoreboard is not None and not self.workers:
            self._scoreboard.close()
            self._scoreboard = None
        if self.launcher is not None and not self.workers:
            self.launcher.close()
            self.launcher = None
