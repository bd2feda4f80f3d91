"""A multiprocessing child whose exit the event loop sees (a pidfd, read by the loop).

Used for the children this process starts itself: `allcores.Worker`, and pool
workers under the forkserver and spawn start methods. (Default pool workers are
the zygote's children; the zygote tells their exits: `allcores.child.zygote`.)
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing.process
import os
from collections.abc import Callable

__all__ = ["WatchedProcess"]


class WatchedProcess:
    """Wraps a started ``multiprocessing.Process``: `watch` calls back with its exit code."""

    def __init__(self, process: multiprocessing.process.BaseProcess) -> None:
        self._process = process
        self.pid = process.pid
        self._loop: asyncio.AbstractEventLoop | None = None
        self._fd = -1

    def watch(self, loop: asyncio.AbstractEventLoop, on_exit: Callable[[int | None], None]) -> None:
        """Call ``on_exit(exit code)`` on *loop* once the process has exited."""
        self._loop = loop
        if self._fd < 0:
            # A pidfd where the kernel has them: multiprocessing's sentinel pipe is
            # also held by any grandchild the process forked, and would hide its end.
            try:
                self._fd = os.pidfd_open(self._process.pid or 0)
            except (OSError, AttributeError):
                self._fd = os.dup(self._process.sentinel)

        def exited() -> None:
            self.unwatch()
            self._process.join()
            on_exit(self._process.exitcode)

        loop.add_reader(self._fd, exited)

    def unwatch(self) -> None:
        loop, self._loop = self._loop, None
        if self._fd >= 0:
            if loop is not None and not loop.is_closed():
                with contextlib.suppress(ValueError, RuntimeError, OSError):
                    loop.remove_reader(self._fd)
            os.close(self._fd)
            self._fd = -1

    def kill(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self._process.kill()

    def reap_now(self, timeout: float | None = None) -> int | None:
        """Kill and reap without the loop (interpreter exit, a closed loop)."""
        self.unwatch()
        self.kill()
        self._process.join(timeout)
        return self._process.exitcode
