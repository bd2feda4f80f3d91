"""The conversation between the pool and a worker, whatever the backend.

::

    pool (parent)                                   worker (blocking loop, `serve`)
    SETUP {worker id, scoreboard} ──────────────►  attach scoreboard row, run initializer
                                               ◄──  READY {pid, pull} | INIT_FAILED (exc, tb)
    TASK  id (fn blob, args, kwargs)           ──►  fn(*args, **kwargs)
    CHUNK id (fn blob, [args, ...])            ──►  [fn(*args) for each]
    SKIP  id (a prefetched task was cancelled) ──►  drop it if it has not started
    BATCH [message, ...] (several dispatched in one loop iteration, one send)
                                               ◄──  RESULT id value | ERROR id (exc, traceback)
                                               ◄──  CHUNK_RESULT id (values, error or None)
    STOP (after the tasks sent before it)      ──►  the worker returns (exit code 0)
    end of the channel                         ──►  the same, if the pool died first

Every message is one frame packed by `_serialize.pack` (the task id and the run time
ride in its fixed head). A worker runs its tasks one at a time, in the order they
came; the pool may send it a few ahead (prefetch), so before starting a task that
waited in its buffer the worker looks for SKIP messages that arrived meanwhile.

The loop here only needs an endpoint with blocking ``recv_bytes``, non-blocking
``poll`` and ``send_bytes`` (`allcores.ipc.Channel`), so backends other than
processes can reuse it.
"""

from __future__ import annotations

import collections
import os
import time
import traceback
from collections.abc import Callable
from typing import Any, Protocol

from allcores.errors import ChannelClosed
from allcores.ipc.channel import MAX_FDS
from allcores.observe.scoreboard import Row, RowState, Scoreboard
from allcores.pool import _pull
from allcores.pool._serialize import (
    BATCH,
    OOB_THRESHOLD,
    Packed,
    SameAsArgument,
    large_bytes,
    load_function,
    pack,
    read_head,
    unpack,
    unpack_batch,
)

# Parent -> worker.
SETUP = 1
TASK = 2
CHUNK = 3
SKIP = 4
STOP = 7
# BATCH = 5 (`_serialize.BATCH`): several fd-less messages sent as one frame.
# Worker -> parent.
READY = 10
INIT_FAILED = 11
RESULT = 12
ERROR = 13
CHUNK_RESULT = 14


# How often a busy worker looks for SKIP messages between prefetched tasks. A
# cancelled task that starts anyway has its result dropped by the pool, so a late
# look wastes at most that task's run; looking before every task cost 3 syscalls
# per task, ~10 % of a tiny task's round trip.
SKIP_POLL_INTERVAL = 0.001
# A worker whose next task came within SPIN_GAP of its last reply (a caller sending
# tiny tasks one by one) polls for the next one this long before sleeping, yielding
# the CPU between looks. Being woken costs a cross-CPU wake-up (~10-20 µs on the dev
# VM); one by one fell from ~60 to ~43 µs a round trip. A worker whose tasks come
# further apart never spins, so an idle or sporadic pool burns nothing.
WORKER_SPIN = 50e-6
SPIN_GAP = 100e-6


# What a worker runs once before its first task: the pool's initializer and initargs.
Initializer = tuple[Callable[..., object], tuple[Any, ...]]


class Endpoint(Protocol):
    def recv_bytes(self, timeout: float | None = None) -> tuple[bytes | bytearray, list[int]]: ...
    def poll(self) -> bool: ...
    def readable(self) -> bool: ...
    def send_bytes(self, payload: bytes | bytearray | memoryview, fds: list[int] = ...) -> None: ...


def format_exception(exc: BaseException) -> str:
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))


def pack_error(kind: int, task_id: int, exc: BaseException, seconds: float = 0.0) -> Packed:
    """An error message for *exc*, which survives an exception that does not pickle."""
    tb = format_exception(exc)
    try:
        return pack(kind, task_id, (exc, tb), seconds)
    except Exception as pickling_error:
        stand_in = RuntimeError(
            f"{type(exc).__module__}.{type(exc).__qualname__}: {exc} "
            f"(the original exception could not be pickled: {pickling_error!r})"
        )
        return pack(kind, task_id, (stand_in, tb), seconds)


class RowWriter:
    """This worker's scoreboard row, or nothing when the pool keeps no scoreboard.

    It packs into the row's fields directly: through `Row.set` the seven writes per
    task cost ~3 µs, a third of a tiny task's time in the worker.
    """

    __slots__ = ("_beat", "_buf", "_d", "_q", "_state", "_tasks", "_total", "total")

    def __init__(self, row: Row | None) -> None:
        self._buf: memoryview | None = None
        self.total = 0
        if row is None:
            return
        self._buf, self._state, self._q = row.slot("state")
        self._tasks = row.slot("tasks")[1]
        self._total = row.slot("tasks_total")[1]
        _buf, self._beat, self._d = row.slot("heartbeat")
        self.total = int(row.get("tasks_total"))

    def start(self) -> None:
        buf = self._buf
        if buf is not None:
            pack_into = self._q.pack_into
            pack_into(buf, self._state, RowState.BUSY)
            pack_into(buf, self._tasks, 1)
            self._d.pack_into(buf, self._beat, time.monotonic())

    def finish(self) -> None:
        buf = self._buf
        if buf is not None:
            pack_into = self._q.pack_into
            self.total += 1
            pack_into(buf, self._tasks, 0)
            pack_into(buf, self._total, self.total)
            pack_into(buf, self._state, RowState.READY)
            self._d.pack_into(buf, self._beat, time.monotonic())


def pack_setup(setup: dict[str, Any]) -> Packed:
    """The SETUP frame, the first a worker reads."""
    return pack(SETUP, 0, setup)


def pack_stop() -> bytes | bytearray:
    """The STOP frame: it carries no fds."""
    return pack(STOP, 0, None).payload


def _setup(endpoint: Endpoint, initializer: Initializer | None) -> RowWriter | None:
    """Read SETUP, run the initializer; None when the worker must stop."""
    try:
        payload, fds = endpoint.recv_bytes()
    except ChannelClosed:
        return None
    setup: dict[str, Any] = unpack(payload, fds)
    row = None
    scoreboard = setup.get("scoreboard")
    if scoreboard is not None:
        board = Scoreboard(scoreboard, setup["scoreboard_rows"])
        row = board.row(setup["row"])
        row.set("pid", os.getpid())
        row.set("state", RowState.STARTING)
        row.set("started", time.monotonic())
        row.beat()
    if initializer is not None:
        try:
            fn, args = initializer
            fn(*args)
        except BaseException as exc:
            packed = pack_error(INIT_FAILED, 0, exc)
            endpoint.send_bytes(packed.payload, packed.fds)
            packed.close()
            return None
    if row is not None:
        row.set("state", RowState.READY)
        row.beat()
    # Can this worker copy large arguments straight from the pool (`_pull`)?
    probe = setup.get("pull_probe")
    pull = None if probe is None else _pull.probe(*probe)
    packed = pack(READY, 0, {"pid": os.getpid(), "pull": pull})
    endpoint.send_bytes(packed.payload, packed.fds)
    return RowWriter(row)


def run_task(
    kind: int, task_id: int, payload: bytes | bytearray, fds: list[int], keep: list[Any]
) -> Packed:
    """Run one task; its reply. The unpickled task goes into *keep*, so that the caller
    frees it (a large argument: ~5 ms per 100 MiB) after sending the reply."""
    try:
        message = unpack(payload, fds)
        keep.append(message)
        blob, *rest = message
        fn = load_function(blob)
    except BaseException as exc:
        exc.add_note("(while the worker unpickled the task)")
        return pack_error(ERROR, task_id, exc)
    if kind == TASK:
        args, kwargs = rest
        start = time.perf_counter()
        try:
            result = fn(*args, **kwargs)
        except BaseException as exc:
            return pack_error(ERROR, task_id, exc, time.perf_counter() - start)
        seconds = time.perf_counter() - start
        if type(result) is bytes and len(result) >= OOB_THRESHOLD:
            for index, arg in enumerate(args):
                if arg is result:
                    return pack(RESULT, task_id, SameAsArgument(index), seconds)
        try:
            return _fits(pack(RESULT, task_id, large_bytes(result), seconds))
        except BaseException as exc:
            exc.add_note(f"(while the worker pickled the result of {fn!r}: it was {type(result)})")
            return pack_error(ERROR, task_id, exc, seconds)
    (items,) = rest
    results: list[Any] = []
    error = None
    start = time.perf_counter()
    for item in items:
        try:
            results.append(fn(*item))
        except BaseException as exc:
            error = (exc, format_exception(exc))
            break
    seconds = time.perf_counter() - start
    try:
        return _fits(pack(CHUNK_RESULT, task_id, (results, error), seconds))
    except BaseException as exc:
        exc.add_note(f"(while the worker pickled the results of a map chunk of {fn!r})")
        return pack_error(ERROR, task_id, exc, seconds)


def _fits(packed: Packed) -> Packed:
    """*packed*, or ValueError when it carries more fds than one frame can: sent, it
    would end the channel, and the worker with it, instead of failing one task."""
    if len(packed.fds) <= MAX_FDS:
        return packed
    count = len(packed.fds)
    packed.close()
    raise ValueError(
        f"a result can carry at most {MAX_FDS} shared-memory blocks and large buffers, "
        f"this one has {count}; return fewer, or one larger SharedArray"
    )


def serve(endpoint: Endpoint, initializer: Initializer | None = None) -> None:
    """The worker's life: setup, then tasks until STOP or the channel's end.

    *initializer* (a function and its arguments) comes with the process's start, as
    ProcessPoolExecutor's does: inherited by fork, or pickled by multiprocessing for
    forkserver and spawn, which lets initargs hold a multiprocessing Queue or Lock."""
    try:
        row = _setup(endpoint, initializer)
    except ChannelClosed:
        return  # The pool shut down while this worker started.
    if row is None:
        return
    pending: collections.deque[tuple[bytes | bytearray, list[int]]] = collections.deque()
    skipped: set[int] = set()
    keep: list[Any] = []

    def take(frame: tuple[bytes | bytearray, list[int]]) -> None:
        kind = frame[0][0]
        if kind == SKIP:
            skipped.add(read_head(frame[0])[3])
        elif kind == BATCH:
            pending.extend((payload, []) for payload in unpack_batch(frame[0]))
        else:
            pending.append(frame)

    ran_since_read = False
    last_poll = 0.0
    replied_at = 0.0
    spin = False
    try:
        while True:
            if ran_since_read and pending:
                # Frames read before the last task ran: a SKIP for one of them may be
                # waiting in the socket. Read what is there before starting the next
                # (at most every SKIP_POLL_INTERVAL, since a look costs 3 syscalls).
                now = time.monotonic()
                if now - last_poll >= SKIP_POLL_INTERVAL:
                    last_poll = now
                    while endpoint.poll():
                        take(endpoint.recv_bytes())
            ran_since_read = False
            if not pending:
                if spin:
                    until = time.perf_counter() + WORKER_SPIN
                    while not endpoint.readable() and time.perf_counter() < until:
                        os.sched_yield()
                while not pending:
                    take(endpoint.recv_bytes())
                spin = time.perf_counter() - replied_at < SPIN_GAP
            payload, fds = pending.popleft()
            task_id = read_head(payload)[3]
            if payload[0] == STOP:
                return
            if task_id in skipped:
                skipped.discard(task_id)
                for fd in fds:
                    os.close(fd)
                continue
            row.start()
            packed = run_task(payload[0], task_id, payload, fds, keep)
            del payload
            row.finish()
            endpoint.send_bytes(packed.payload, packed.fds)
            replied_at = time.perf_counter()
            keep.clear()
            packed.close()
            ran_since_read = True
    except ChannelClosed:
        return
