"""The primary's side of the shared CPU pool: its socket, its processes, their rows.

::

    SharedPool.open()       the socket (abstract UNIX name, listen(queue)) and a
                            scoreboard of one row per pool process
    start(loop)             N processes: forked from --preload's zygote (the app
                            already imported), else ``python -m ...process``; each
                            niced, titled "allcores: pool K app", dying with the primary
    a process exits         counted by cause (SIGALRM: a timeout, SIGIO: a cancel,
                            anything else: a crash) and replaced at once; one that
                            dies young again and again waits longer each time
    close()                 after the HTTP workers are gone: SIGKILL every process,
                            close the socket and the scoreboard

The HTTP workers connect to the socket's name (`client.py`); tasks never pass through
this process.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
from typing import TYPE_CHECKING

from allcores._system import signal_name
from allcores.cluster.spawn import ExitWatch
from allcores.observe.scoreboard import RowSnapshot, RowState, Scoreboard
from allcores.server.shared_pool.client import ADDRESS_ENV
from allcores.server.shared_pool.process import PROCESS_ENV

if TYPE_CHECKING:
    from allcores.cluster.forking import ForkLauncher

__all__ = ["ADDRESS_ENV", "SharedPool"]

log = logging.getLogger("allcores.server")

# A process that dies within this many seconds of its start, before running a task,
# is replaced after a delay that doubles each time (from 0.1 s up to 10 s).
_YOUNG = 1.0
_MAX_DELAY = 10.0
_CAUSES = {"SIGALRM": "timeout", "SIGIO": "cancel", "SIGKILL": "killed"}


class _Slot:
    __slots__ = ("delay", "number", "pid", "started")

    def __init__(self, number: int) -> None:
        self.number = number
        self.pid = 0
        self.started = 0.0
        self.delay = 0.0


class SharedPool:
    """*size* pool processes behind one socket; built in the primary before any fork."""

    def __init__(self, size: int, queue: int, nice: int, app_name: str, app_dir: str) -> None:
        self.size = size
        self.queue = queue
        self.nice = nice  # added to the primary's niceness (--pool-nice)
        self._app_name = app_name
        self._app_dir = app_dir
        self.address = f"\0allcores-pool-{os.getpid()}-{secrets.token_hex(6)}"
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.address)
        # The kernel lets backlog + 1 connections wait on a UNIX socket.
        self.listener.listen(queue - 1)
        if queue - 1 > _somaxconn():
            log.warning(
                "allcores: --pool-queue %d is more than the kernel allows "
                "(net.core.somaxconn = %d); the queue holds %d",
                queue,
                _somaxconn(),
                _somaxconn() + 1,
            )
        self.board = Scoreboard.create(size)
        self.restarts: collections.Counter[str] = collections.Counter()
        """Pool processes replaced, by cause: timeout, cancel, crash, killed."""
        self._slots = [_Slot(n) for n in range(size)]
        self._loop: asyncio.AbstractEventLoop | None = None
        self._launcher: ForkLauncher | None = None
        self._closed = False
        os.environ[ADDRESS_ENV] = self.address[1:]

    def fork_args(self) -> tuple[object, ...]:
        """What --preload's zygote passes a forked pool process (after its own)."""
        return (self.board.fd, self.board.rows, self._app_name, self.nice)

    def start(self, loop: asyncio.AbstractEventLoop, launcher: ForkLauncher | None) -> None:
        self._loop = loop
        self._launcher = launcher
        for slot in self._slots:
            self._spawn(slot)

    def _spawn(self, slot: _Slot) -> None:
        if self._closed:
            return
        loop = self._loop
        assert loop is not None
        self.board.row(slot.number).clear(state=RowState.STARTING)
        number = slot.number + 1
        try:
            if self._launcher is not None:
                forked = self._launcher.start(
                    loop,
                    number,
                    slot.number,
                    self.listener,
                    lambda status: self._on_exit(slot, status),
                    kind="pool",
                )
                slot.pid = forked.pid
            else:
                process = self._start_program(slot)
                slot.pid = process.pid
                ExitWatch(loop, process, lambda status: self._on_exit(slot, status))
        except OSError as exc:
            log.error("allcores: cannot start pool process %d: %s", number, exc)
            slot.delay = min(_MAX_DELAY, max(1.0, slot.delay * 2))
            self._respawn_later(slot)
            return
        slot.started = loop.time()

    def _start_program(self, slot: _Slot) -> subprocess.Popen[bytes]:
        spec = {
            "listener_fd": self.listener.fileno(),
            "board_fd": self.board.fd,
            "rows": self.board.rows,
            "row": slot.number,
            "number": slot.number + 1,
            "primary_pid": os.getpid(),
            "app_name": self._app_name,
            "app_dir": self._app_dir,
            "nice": self.nice,
        }
        return subprocess.Popen(
            [sys.executable, "-m", "allcores.server.shared_pool.process"],
            env={**os.environ, PROCESS_ENV: json.dumps(spec)},
            pass_fds=(self.listener.fileno(), self.board.fd),
            stdin=subprocess.DEVNULL,
            # Its own process group, like an HTTP worker: Ctrl-C reaches the primary.
            process_group=0,
        )

    def _on_exit(self, slot: _Slot, status: int) -> None:
        if self._closed:
            return
        loop = self._loop
        assert loop is not None
        row = self.board.read(slot.number)
        cause = _CAUSES.get(signal_name(-status) if status < 0 else "", "crash")
        self.restarts[cause] += 1
        if cause in ("crash", "killed"):
            how = f"killed by {signal_name(-status)}" if status < 0 else f"exited with {status}"
            log.warning(
                "allcores: pool process %d (pid %d) %s; replacing it",
                slot.number + 1,
                slot.pid,
                how,
            )
        young = loop.time() - slot.started < _YOUNG and row.tasks_total == 0
        slot.delay = min(_MAX_DELAY, max(0.1, slot.delay * 2)) if young else 0.0
        slot.pid = 0
        self.board.row(slot.number).clear()
        self._respawn_later(slot)

    def _respawn_later(self, slot: _Slot) -> None:
        loop = self._loop
        assert loop is not None
        if slot.delay:
            loop.call_later(slot.delay, self._spawn, slot)
        else:
            self._spawn(slot)

    def rows(self) -> list[RowSnapshot]:
        return [self.board.read(slot.number) for slot in self._slots]

    def pids(self) -> list[int]:
        return [slot.pid for slot in self._slots if slot.pid]

    def close(self) -> None:
        """Kill every pool process (the HTTP workers are gone: nobody waits on a task)."""
        if self._closed:
            return
        self._closed = True
        for slot in self._slots:
            if slot.pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(slot.pid, signal.SIGKILL)
        self.listener.close()
        self.board.close()
        if os.environ.get(ADDRESS_ENV) == self.address[1:]:
            del os.environ[ADDRESS_ENV]


def _somaxconn() -> int:
    try:
        with open("/proc/sys/net/core/somaxconn") as file:
            return int(file.read())
    except (OSError, ValueError):
        return 4096
