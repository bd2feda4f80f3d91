"""Starting a worker process, and watching it until it exits.

A worker is this program run again (or `ClusterSettings.exec`). It learns that it
is a worker, and where its channel and scoreboard row are, from its environment::

    primary                                               worker process
    ───────                                               ──────────────
    worker_argv(settings) + worker_env(...)
    start_process: Popen(argv, env, pass_fds=(channel end, scoreboard fd),
                         stderr=PIPE, own process group) ──► ALLCORES_WORKER_ID=3
                                                            ALLCORES_CHANNEL_FD=7
                                                            ALLCORES_SCOREBOARD=fd:rows:row
                                                            ALLCORES_PRIMARY_PID=pid
    StderrTail ◄───────────────────── stderr pipe ───────── tracebacks, logging
      (forwarded to the primary's stderr unless silent; last lines kept for reports)
    ExitWatch ◄──────────────── pidfd readable (exit) ───── the process ends

The channel itself (`allcores.ipc.channel`) and what goes over it are the primary's
business (`allcores.cluster.primary`, `allcores.cluster.messages`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import re
import subprocess
import sys
from collections.abc import Callable, Mapping

from allcores.cluster.settings import ClusterSettings

__all__ = [
    "ENV_CHANNEL_FD",
    "ENV_PRIMARY_PID",
    "ENV_SCOREBOARD",
    "ENV_WORKER_ID",
    "OUTPUT_LINES",
    "ExitWatch",
    "StderrTail",
    "start_process",
    "worker_argv",
    "worker_env",
]

ENV_WORKER_ID = "ALLCORES_WORKER_ID"
ENV_CHANNEL_FD = "ALLCORES_CHANNEL_FD"
ENV_SCOREBOARD = "ALLCORES_SCOREBOARD"  # "fd:rows:row"
ENV_PRIMARY_PID = "ALLCORES_PRIMARY_PID"

# Lines of a worker's stderr kept for its crash report: enough for a traceback.
OUTPUT_LINES = 40
# Of a line with no newline yet, this much is kept: a report needs its end, and a
# worker writing megabytes without a newline must not grow the primary.
_PARTIAL_LINE = 4096
# What a booting worker wrote is held back up to this much (its end is kept): a
# traceback with its log lines fits many times over.
_HOLD_LIMIT = 256 * 1024
# A pipe holds 64 KiB by default on Linux: one read takes all a worker wrote.
_READ_SIZE = 65536
# Without pidfd (not Linux), exits are found by polling waitpid this often.
_POLL_EXITS = 0.1
# How long to wait in waitpid once an exit was seen: the process has ended, so
# this only bounds a surprise (the kernel not done with it yet); then poll again.
_REAP_TIMEOUT = 5.0


def worker_argv(settings: ClusterSettings) -> list[str]:
    """The command line of a worker: `settings.exec`, or this program run again.

    The interpreter's own argv is not always the executable path (venv shims), so
    `sys.orig_argv` is used: it keeps ``-m`` / ``-c`` / ``-X`` options as given.
    """
    if settings.exec is not None:
        args = list(settings.args if settings.args is not None else sys.argv[1:])
        if settings.exec.endswith(".py"):
            return [sys.executable, settings.exec, *args]
        return [settings.exec, *args]
    orig = list(getattr(sys, "orig_argv", []))
    if settings.args is not None:
        return [sys.executable, *orig[1 : len(orig) - len(sys.argv) + 1], *settings.args]
    if len(orig) >= 1:
        return [sys.executable, *orig[1:]]
    return [sys.executable, *sys.argv]


def worker_env(
    settings: ClusterSettings,
    extra: Mapping[str, str] | None,
    *,
    worker_id: int,
    channel_fd: int,
    scoreboard: str,
) -> dict[str, str]:
    """A worker's environment: this process's, `settings.env`, the fork's *extra*,
    and what tells the worker who it is (*scoreboard* is ``"fd:rows:row"``)."""
    env = dict(os.environ)
    env.update(settings.env)
    if extra:
        env.update({str(k): str(v) for k, v in extra.items()})
    env[ENV_WORKER_ID] = str(worker_id)
    env[ENV_CHANNEL_FD] = str(channel_fd)
    env[ENV_SCOREBOARD] = scoreboard
    env[ENV_PRIMARY_PID] = str(os.getpid())
    return env


def start_process(
    argv: list[str], env: dict[str, str], pass_fds: tuple[int, ...], *, silent: bool
) -> subprocess.Popen[bytes]:
    """Start a worker process; raises OSError if it cannot be started."""
    return subprocess.Popen(
        argv,
        env=env,
        pass_fds=pass_fds,
        stdout=subprocess.DEVNULL if silent else None,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        # Its own process group: a terminal's Ctrl-C reaches only the primary,
        # which then drains the workers in order instead of all dying at once.
        process_group=0,
    )


class ExitWatch:
    """Calls ``on_exit(status)`` once *process* has exited and been reaped, from *loop*.

    *status* is Popen's returncode: the exit code, or minus the signal that killed
    it. Linux tells the loop through a pidfd; elsewhere waitpid is polled.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        process: subprocess.Popen[bytes],
        on_exit: Callable[[int], None],
    ) -> None:
        self._loop = loop
        self._process = process
        self._on_exit = on_exit
        try:
            pidfd = os.pidfd_open(process.pid)
        except (AttributeError, OSError):
            self._poll()
            return

        def readable() -> None:
            loop.remove_reader(pidfd)
            os.close(pidfd)
            self._reap()

        loop.add_reader(pidfd, readable)

    def _poll(self) -> None:
        if self._process.poll() is None:
            self._loop.call_later(_POLL_EXITS, self._poll)
        else:
            self._reap()

    def _reap(self) -> None:
        try:
            status = self._process.wait(timeout=_REAP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self._loop.call_later(_POLL_EXITS, self._reap)
            return
        self._on_exit(status)


class StderrTail:
    """Reads a worker's stderr pipe from *loop*: forwards it to this process's stderr
    (unless *silent*) and keeps its last lines in *lines* for crash reports.

    With *hold*, what it reads is kept back (its last `_HOLD_LIMIT` bytes) until
    `release()`: the primary releases a worker's output once it listens, has been up
    `boot_period`, or has died, and then only if no worker failed the same way
    before it. An import error is then shown once, not once per worker started.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        process: subprocess.Popen[bytes],
        lines: collections.deque[str],
        *,
        silent: bool,
        hold: bool = False,
    ) -> None:
        assert process.stderr is not None
        self._loop = loop
        self._pipe = process.stderr
        self._lines = lines
        self._silent = silent
        self._held: bytearray | None = bytearray() if hold else None
        self._partial = b""
        os.set_blocking(self._pipe.fileno(), False)
        loop.add_reader(self._pipe.fileno(), self.read)

    @property
    def holding(self) -> bool:
        return self._held is not None

    def release(self, *, show: bool = True) -> None:
        """Write what was held back (unless not *show*); forward the rest as it comes."""
        held, self._held = self._held, None
        if held and show:
            self._forward(bytes(held))

    def show_once(self, shown: set[str]) -> bool:
        """At the worker's end: read the rest, and if its output was held back, show
        it unless *shown* (the outputs, digits blanked, already on screen) has it.
        False only when it was held back and not shown for that reason."""
        self.read()
        if self._held is None:
            return True
        failure = re.sub(r"\d+", "#", "\n".join(self._lines))
        first = failure not in shown
        shown.add(failure)
        self.release(show=first)
        return first

    def read(self) -> None:
        """Read what is there now; at EOF, stop reading and keep the unfinished line."""
        if self._pipe.closed:
            return
        fd = self._pipe.fileno()
        while True:
            try:
                data = os.read(fd, _READ_SIZE)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self._loop.remove_reader(fd)
                self._pipe.close()
                if self._partial:
                    self._lines.append(self._partial.decode(errors="replace"))
                    self._partial = b""
                return
            if self._held is not None:
                self._held += data
                del self._held[:-_HOLD_LIMIT]
            else:
                self._forward(data)
            lines = (self._partial + data).split(b"\n")
            self._partial = lines.pop()[-_PARTIAL_LINE:]
            self._lines.extend(line.decode(errors="replace") for line in lines[-OUTPUT_LINES:])

    def _forward(self, data: bytes) -> None:
        if not self._silent:
            with contextlib.suppress(AttributeError, ValueError, OSError):
                sys.stderr.buffer.write(data)
                sys.stderr.flush()
