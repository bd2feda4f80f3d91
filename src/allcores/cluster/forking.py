"""Workers forked from a zygote instead of started as new programs (`allcores serve
--preload`): each keeps the memory the primary had when the zygote was made (the app
imported once, shared copy-on-write), and a respawn takes a fork, not an interpreter
start.

::

    primary, before its loop: import the app, gc.freeze(),
      ForkLauncher(run, args, others={"pool": (run_pool, pool_args)})
      └─ fork ─► zygote (allcores.child.zygote: no threads, no loop, no sockets yet)
    Primary._fork ── spawn(channel end, "worker:<id>:<row>") ──► zygote forks:
                                                         run(channel, worker id, row, *args)
    start(..., kind="pool") ── "pool:<n>:<row>" ──► run_pool(socket, n, row, *pool_args)
      the pid comes back at once; the exit, with its code, as a notice ─► _on_exit

The child becomes a cluster worker in place (`cluster._become_worker`), as if it had
been started with the worker's environment. Its parent is the zygote, which dies with
the primary; its stdout and stderr are the primary's.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import socket
from collections.abc import Callable
from typing import Any

from allcores.child.zygote import Zygote, ZygoteError

__all__ = ["ForkLauncher", "Forked"]

OnExit = Callable[[int], None]


class Forked:
    """What the primary's `Worker` handle needs of a forked worker: its pid."""

    __slots__ = ("pid",)

    def __init__(self, pid: int) -> None:
        self.pid = pid


class ForkLauncher:
    """Starts workers as ``run(channel, worker_id, row, zygote_pid, *args)`` in children
    of a zygote forked now; ``run`` returns the worker's exit code. *others* names more
    kinds of child, each with its own ``run`` and arguments (the shared CPU pool's)."""

    def __init__(
        self,
        run: Callable[..., int],
        args: tuple[Any, ...] = (),
        others: dict[str, tuple[Callable[..., int], tuple[Any, ...]]] | None = None,
    ) -> None:
        self._zygote = Zygote(_child, ({"worker": (run, args), **(others or {})},))
        self._exits: dict[int, OnExit] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(
        self,
        loop: asyncio.AbstractEventLoop,
        worker_id: int,
        row: int,
        channel: socket.socket,
        on_exit: OnExit,
        kind: str = "worker",
    ) -> Forked:
        """Fork a worker that gets *channel*; *on_exit(status)* on *loop* when it ends
        (status as Popen's: the exit code, or minus the signal). OSError if it cannot."""
        if self._loop is not loop:
            self._zygote.watch(loop, self._on_exit)
            self._loop = loop
        try:
            spawned = self._zygote.spawn(channel, f"{kind}:{worker_id}:{row}")
        except ZygoteError as exc:
            raise OSError(str(exc)) from exc
        self._exits[spawned.number] = on_exit
        pid = spawned.pid
        if pid is None:
            del self._exits[spawned.number]
            raise OSError(spawned.error or "the zygote did not fork the worker")
        return Forked(pid)

    def _on_exit(self, number: int | None, code: int | None, why: str | None) -> None:
        if number is None:  # the zygote is gone, and every worker with it
            exits, self._exits = self._exits, {}
            for on_exit in exits.values():
                on_exit(-9)
            return
        if number in self._exits:
            self._exits.pop(number)(code if code is not None else 1)

    def close(self) -> None:
        self._zygote.close()


def _child(
    channel: socket.socket,
    zygote_pid: int,
    runners: dict[str, tuple[Callable[..., int], tuple[Any, ...]]],
) -> None:  # pragma: no cover - runs in a forked worker
    kind, worker_id, row = multiprocessing.current_process().name.split(":")
    run, args = runners[kind]
    raise SystemExit(run(channel, int(worker_id), int(row), zygote_pid, *args))
