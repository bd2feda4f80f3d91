"""Errors of the pool: each says what happened to which task, and what was done about it."""

from __future__ import annotations

from concurrent.futures import BrokenExecutor

from allcores.errors import AllcoresError, RemoteTraceback

__all__ = [
    "InitializerError",
    "PoolClosedError",
    "PoolError",
    "QueueFullError",
    "RemoteTraceback",
    "TaskTimeoutError",
    "WorkerCrashedError",
]


class PoolError(AllcoresError):
    """Base class of the pool's errors."""


class WorkerCrashedError(PoolError):
    """The worker running a task died; only that task fails, and the worker is replaced."""

    def __init__(
        self,
        worker_id: int,
        pid: int | None,
        exitcode: int | None,
        task: str,
    ) -> None:
        self.worker_id = worker_id
        self.pid = pid
        self.exitcode = exitcode
        self.task = task
        super().__init__(worker_id, pid, exitcode, task)

    @property
    def signal_name(self) -> str | None:
        """The name of the signal that killed the worker (``"SIGKILL"``), if one did."""
        if self.exitcode is None or self.exitcode >= 0:
            return None
        from allcores._system import signal_name

        return signal_name(-self.exitcode)

    def __str__(self) -> str:
        if self.signal_name is not None:
            how = f"was killed by {self.signal_name}"
        elif self.exitcode is None:
            how = "died (exit status unknown)"
        else:
            how = f"exited with code {self.exitcode}"
        who = f"pool worker {self.worker_id} (pid {self.pid})" if self.pid else "a pool process"
        return (
            f"{who} {how} while running {self.task}; "
            "the worker was replaced and other tasks carry on (a C-level crash, os._exit, "
            "a kill or the OOM killer end a worker this way)"
        )

    def __reduce__(self) -> tuple[object, ...]:
        return type(self), (self.worker_id, self.pid, self.exitcode, self.task)


class TaskTimeoutError(PoolError, TimeoutError):
    """A task ran past its time limit; its worker was killed and replaced."""

    def __init__(self, limit: float, task: str, worker_id: int | None = None) -> None:
        self.limit = limit
        self.task = task
        self.worker_id = worker_id
        super().__init__(limit, task, worker_id)

    def __str__(self) -> str:
        who = "its worker" if self.worker_id is None else f"worker {self.worker_id}"
        return (
            f"{self.task} ran longer than its {self.limit:g} s limit; {who} "
            "was killed and replaced (raise the task's timeout= if it needs longer)"
        )

    def __reduce__(self) -> tuple[object, ...]:
        return type(self), (self.limit, self.task, self.worker_id)


class ReplyLostError(PoolError):
    """A task's reply was lost because the thread reading it was interrupted mid-read.

    A thread blocked in ``future.result()`` reads its task's reply itself (see
    "Direct round trips" in docs/pool.md). An exception raised asynchronously in that
    thread, such as KeyboardInterrupt, can land after the reply left the worker's
    socket and before it reached the future. The pool then fails the task with this
    error instead of leaving it pending forever; if the worker's stream was cut
    mid-frame, the worker is replaced. The task ran; only its outcome is unknown.
    """

    def __init__(self, task: str, worker_id: int | None = None) -> None:
        self.task = task
        self.worker_id = worker_id
        super().__init__(task, worker_id)

    def __str__(self) -> str:
        return (
            f"the reply of {self.task} from worker {self.worker_id} was lost: the thread "
            "reading it was interrupted (Ctrl-C or another asynchronous exception) in the "
            "middle of the read; the task ran, but its result is unknown"
        )

    def __reduce__(self) -> tuple[object, ...]:
        return type(self), (self.task, self.worker_id)


class QueueFullError(PoolError):
    """The pool's queue holds ``max_queue`` tasks; wait for room or raise ``max_queue``."""


class PoolClosedError(PoolError, RuntimeError):
    """The pool was shut down (or its event loop closed); it takes no new tasks."""


class InitializerError(PoolError, BrokenExecutor):
    """A worker's initializer raised (or the worker died starting): the pool cannot start.

    The original exception is the ``__cause__``. The pool does not respawn workers
    that would fail the same way; every pending task fails with this error.
    """
