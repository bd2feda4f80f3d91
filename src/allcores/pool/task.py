"""The pool's model: a task, a worker as the pool sees it, and their states.

A task's life (`TaskState`), all on the pool's loop unless a direct round trip
(`allcores.pool.direct`) moves it from the caller's thread::

    QUEUED ──(dispatch, or a direct send)──► SENT ──(its reply)──► DONE
       │                                       │
       └──(cancel before a worker takes it)──► CANCELLED ◄──(cancel: its worker is killed)

A worker's life (`WorkerState`): STARTING until its READY, then READY (idle, busy
or prefetched), RETIRING once told to stop, KILLED once killed or ended.

`Owner` names who reads a direct task's reply: nobody yet (the task went from the
caller's thread and no one waits yet), the caller (in ``result()``), or the loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import enum
import reprlib
import time
from collections.abc import Callable
from typing import Any

from allcores.pool._serialize import Packed
from allcores.pool.backends.base import BackendWorker

__all__ = ["Owner", "PoolWorker", "Task", "TaskState", "WorkerState"]


class TaskState(enum.IntEnum):
    QUEUED = 0
    SENT = 1
    DONE = 2
    CANCELLED = 3


class WorkerState(enum.IntEnum):
    STARTING = 0
    READY = 1
    RETIRING = 2
    KILLED = 3


class Owner(enum.IntEnum):
    """Who reads a direct task's reply."""

    NONE = 0
    CALLER = 1
    LOOP = 2


def released(*_args: Any, **_kwargs: Any) -> None:
    """What a settled task's ``fn`` becomes (`Task.release`)."""


class Task:
    """One call (or one map chunk) from submit to its settled future."""

    __slots__ = (
        "args",
        "bridged",
        "chunk_len",
        "enqueued",
        "fn",
        "future",
        "id",
        "owner",
        "packed",
        "reserved",
        "running_set",
        "sender",
        "started",
        "state",
        "submitted",
        "timeout",
        "timer",
        "worker",
    )

    def __init__(
        self,
        task_id: int,
        fn: Callable[..., Any],
        args: Any,
        packed: Packed,
        timeout: float | None,
        chunk_len: int,
    ) -> None:
        self.id = task_id
        self.fn = fn
        self.args = args
        self.packed = packed
        self.timeout = timeout
        self.chunk_len = chunk_len
        self.future: concurrent.futures.Future[Any] | asyncio.Future[Any] | None = None
        self.bridged = False
        self.running_set = False
        self.state = TaskState.QUEUED
        self.submitted = time.monotonic()
        self.started = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.worker: PoolWorker | None = None
        self.owner = Owner.LOOP
        # Holds one count of Pool._queued (its queue slot), given back exactly once
        # (`Pool._spend`); set and cleared with the count, under _count_lock.
        self.reserved = False
        self.enqueued = False  # the loop has seen it (`Pool._enqueue`)
        # The frame of the `_send_direct` call sending it, until its frame went.
        self.sender: Any = None

    def release(self) -> None:
        """Drop the callable and its arguments once the task has settled: a caller
        that dropped the future expects them freed now, not when the pool next
        looks at this task (CPython's test_no_stale_references)."""
        self.fn = released
        self.args = ((), {})

    def describe(self) -> str:
        if self.fn is released:
            return f"task {self.id}"
        name = getattr(self.fn, "__qualname__", None) or repr(self.fn)
        if self.chunk_len >= 0:
            return f"task {self.id} (map chunk of {self.chunk_len} items of {name})"
        args, kwargs = self.args
        parts = [reprlib.repr(a) for a in args] + [
            f"{k}={reprlib.repr(v)}" for k, v in kwargs.items()
        ]
        text = ", ".join(parts)
        if len(text) > 120:
            text = text[:117] + "..."
        return f"task {self.id} ({name}({text}))"


class PoolWorker:
    """One worker as the pool sees it: its handle, its state and the tasks it holds."""

    __slots__ = (
        "attached",
        "direct",
        "handle",
        "id",
        "idle_since",
        "inflight",
        "outbox",
        "row",
        "sent",
        "started_at",
        "state",
    )

    def __init__(self, worker_id: int, row: int) -> None:
        self.id = worker_id
        self.row = row
        self.handle: BackendWorker | None = None
        self.attached = False  # the loop has its channel (`Pool._attach`)
        # A task another thread sent to this worker (`Pool._send_direct`), until the
        # caller reads its reply or the loop adopts it into `inflight`.
        self.direct: Task | None = None
        self.state = WorkerState.STARTING
        self.inflight: dict[int, Task] = {}
        self.outbox: list[Packed] = []
        self.sent = 0
        self.started_at = time.monotonic()
        self.idle_since = 0.0
