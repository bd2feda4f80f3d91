"""What the pool asks of a backend: start a worker, talk to it, stop it, hear it end.

The pool's core (queue, dispatch, futures, timeouts, stats, map) knows only this
interface. A backend owns everything about *where* a worker runs: a process (today),
a subinterpreter, a free-threaded thread, a Dask or Ray worker (next). Each says
what it can do in `Capabilities`, and the pool degrades where one cannot (a thread
cannot be killed, so its running tasks cannot be cancelled or timed out).

::

    pool core                                 backend worker
    backend.start_worker(id, setup) ────────► a worker running `_protocol.serve`
    worker.attach(loop, on_message, on_exit)  its frames reach on_message in the loop
    worker.send(payload, fds)  ─────────────► a frame
    worker.stop()   (no more work: finish, then end) / worker.kill() (now)
    on_exit(WorkerExit) ◄──────────────────── it ended, for whatever reason (exactly once)
"""

from __future__ import annotations

import abc
import asyncio
import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["Backend", "BackendWorker", "Capabilities", "WorkerExit"]


@dataclasses.dataclass(frozen=True)
class Capabilities:
    """What a backend can do; the pool and the docs' table read it."""

    cancel_running: bool
    enforce_timeout: bool
    shared_memory: bool
    crash_isolation: bool


@dataclasses.dataclass(frozen=True)
class WorkerExit:
    """How a worker ended: an exit code (negative: the signal that killed it)."""

    exitcode: int | None


OnMessage = Callable[[bytes | bytearray, list[int]], None]
OnExit = Callable[[WorkerExit], None]


class BackendWorker(abc.ABC):
    """One worker, as the pool core sees it. Methods run in the pool's loop."""

    worker_id: int
    pid: int | None

    @abc.abstractmethod
    def attach(
        self, loop: asyncio.AbstractEventLoop, on_message: OnMessage, on_exit: OnExit
    ) -> None:
        """Start delivering this worker's frames and its end to the loop."""

    @abc.abstractmethod
    def send(self, payload: bytes | bytearray | memoryview, fds: Sequence[int] = ()) -> None:
        """Queue one frame to the worker (never blocks the loop)."""

    # Reading a worker's replies from a thread other than the loop's, for a caller
    # that waits on its own task (`Pool` uses it when the worker is idle). The loop
    # pauses its reading; one thread claims the right to read, reads, releases.
    # A backend that cannot keeps these defaults, and the pool never claims.

    def send_from_thread(self, payload: bytes | bytearray | memoryview, fds: Sequence[int]) -> bool:
        """Send one small frame now, from a thread other than the loop's, or nothing.

        True when the whole frame went, False when nothing did. The pool calls it only
        for an idle worker, which no other thread sends to meanwhile.
        """
        return False

    def pause_reading(self) -> None:  # noqa: B027 - optional, see above
        """The loop stops reading this worker (loop thread)."""

    def resume_reading(self) -> None:  # noqa: B027 - optional, see above
        """The loop reads this worker again (loop thread)."""

    def claim_reading(self, token: object) -> bool:
        """Take the right to `read_now` (any thread) for *token*, which names the claim
        (the pool passes the claiming thread's frame); False when it cannot be had."""
        return False

    def release_reading(self, resume: bool, token: object) -> bool:
        """Give *token*'s claim back (any thread); with *resume*, the loop reads this
        worker again. False, doing nothing, when the claim is not *token*'s."""
        return False

    def claimed_by(self) -> object | None:
        """The token of the claim held now, or None."""
        return None

    def stream_in_doubt(self) -> bool:
        """True when a thread cut (by an exception raised asynchronously) may have
        lost something: `read_now` took a frame since the last `send_from_thread`,
        or a read or send was cut midway. A reply may then never come, and the
        worker must be replaced."""
        return False

    def read_now(self, timeout: float | None) -> tuple[bytes | bytearray, list[int]] | None:
        """The next frame, read in the claiming thread; None after *timeout*.

        Raises `ChannelClosed` when the worker's channel ended."""
        raise NotImplementedError

    @abc.abstractmethod
    def stop(self) -> None:
        """No more work: the worker ends after the frames already sent (on_exit follows)."""

    @abc.abstractmethod
    def kill(self) -> None:
        """End the worker now, whatever it is doing (on_exit follows)."""

    @abc.abstractmethod
    def terminate_now(self) -> None:
        """End and reap the worker without the loop (interpreter exit, a closed loop)."""


class Backend(abc.ABC):
    name: str
    capabilities: Capabilities

    @abc.abstractmethod
    def start_worker(self, worker_id: int, setup: dict[str, Any]) -> BackendWorker:
        """Start a worker and hand it *setup*, what `_protocol.serve` reads first.

        A worker that starts as a copy of this process (fork) may find it in memory;
        others get it as a SETUP frame (`_protocol.pack_setup`). May block briefly.
        """

    def start_is_slow(self) -> bool:
        """True when `start_worker` may block for long (the pool then calls it in a thread)."""
        return False

    def close(self) -> None:  # noqa: B027 - optional hook, most backends hold nothing
        """Release what the backend holds once every worker has ended."""
