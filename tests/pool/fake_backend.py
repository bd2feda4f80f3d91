"""A backend without processes, for testing the pool's scheduler on its own.

Each `FakeWorker` speaks the pool's protocol (`allcores.pool._protocol`) from inside
the test's event loop: it answers READY, runs each task it is sent by calling the
function right here, and replies with the run time the test chose
(`FakeBackend.seconds_per_item`), so that chunk sizing and prefetch see the timings
a test wants, on any machine. After `hold()` it keeps what it is sent unanswered
until `release()`, so a test can look at what each worker holds; a hold ends by
itself after HOLD_LIMIT, so a failing assertion cannot leave the pool's shutdown
waiting for ever on a held task.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from allcores.pool import _protocol as proto
from allcores.pool._serialize import BATCH, load_function, pack, read_head, unpack, unpack_batch
from allcores.pool.backends.base import (
    Backend,
    BackendWorker,
    Capabilities,
    OnExit,
    OnMessage,
    WorkerExit,
)

# A hold ends by itself after this many seconds (see `FakeBackend.hold`).
HOLD_LIMIT = 10.0


class FakeWorker(BackendWorker):
    def __init__(self, backend: FakeBackend, worker_id: int) -> None:
        self.backend = backend
        self.worker_id = worker_id
        self.pid = 100_000 + worker_id
        self.frames = 0  # frames sent to it (a BATCH counts once)
        self.received: list[tuple[int, int, int]] = []  # (kind, task id, items), in order
        self.skipped: list[int] = []
        self.backlog: list[tuple[int, int, Any]] = []  # (kind, task id, message) not run yet
        self.ended = False
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._on_message: OnMessage | None = None
        self._on_exit: OnExit | None = None

    def attach(
        self, loop: asyncio.AbstractEventLoop, on_message: OnMessage, on_exit: OnExit
    ) -> None:
        self._loop, self._on_message, self._on_exit = loop, on_message, on_exit
        loop.call_soon(self._reply, pack(proto.READY, 0, {"pull": None}).payload)

    def send(self, payload: bytes | bytearray | memoryview, fds: Sequence[int] = ()) -> None:
        assert not fds, "the fake backend's tests send no shared memory"
        self.frames += 1
        payload = bytes(payload)
        messages = unpack_batch(payload) if payload[0] == BATCH else [payload]
        for message in messages:
            kind, _nbuf, _nuser, task_id, _seconds = read_head(message)
            if kind == proto.SKIP:
                self.skipped.append(task_id)
                self.backlog = [job for job in self.backlog if job[1] != task_id]
                continue
            if kind == proto.STOP:
                self._stopping = True
                continue
            body = unpack(message, [])
            items = len(body[1]) if kind == proto.CHUNK else 1
            self.received.append((kind, task_id, items))
            self.backlog.append((kind, task_id, body))
        self._schedule()

    def _schedule(self) -> None:
        assert self._loop is not None
        if not self.backend.holding:
            self._loop.call_soon(self.run_all)
        elif self._stopping and not self.backlog:
            self._loop.call_soon(self._end, 0)

    def run_all(self) -> None:
        """Answer everything sent so far, in order."""
        while self.backlog and not self.ended:
            kind, task_id, body = self.backlog.pop(0)
            blob, *rest = body
            fn = load_function(blob)
            per_item = self.backend.seconds_per_item
            if kind == proto.TASK:
                args, kwargs = rest
                try:
                    reply = pack(proto.RESULT, task_id, fn(*args, **kwargs), per_item)
                except Exception as exc:
                    reply = proto.pack_error(proto.ERROR, task_id, exc, per_item)
            else:
                (items,) = rest
                results = [fn(*item) for item in items]
                reply = pack(proto.CHUNK_RESULT, task_id, (results, None), per_item * len(items))
            self._reply(reply.payload)
        if self._stopping and not self.backlog:
            self._end(0)

    def _reply(self, payload: bytes | bytearray) -> None:
        if not self.ended and self._on_message is not None:
            self._on_message(payload, [])

    def _end(self, code: int) -> None:
        if self.ended:
            return
        self.ended = True
        self.backlog.clear()
        if self._on_exit is not None:
            self._on_exit(WorkerExit(code))

    def crash(self) -> None:
        """Die now, as a process killed by SIGSEGV would."""
        assert self._loop is not None
        self._loop.call_soon(self._end, -11)

    def stop(self) -> None:
        self._stopping = True
        self._schedule()

    def kill(self) -> None:
        assert self._loop is not None
        self._loop.call_soon(self._end, -9)

    def terminate_now(self) -> None:
        self.ended = True


class FakeBackend(Backend):
    name = "fake"
    capabilities = Capabilities(
        cancel_running=True, enforce_timeout=True, shared_memory=False, crash_isolation=True
    )

    def __init__(self, seconds_per_item: float = 1e-6) -> None:
        self.seconds_per_item = seconds_per_item
        self.holding = False
        self.workers: list[FakeWorker] = []

    def start_worker(self, worker_id: int, setup: dict[str, Any]) -> FakeWorker:
        worker = FakeWorker(self, worker_id)
        self.workers.append(worker)
        return worker

    def live(self) -> list[FakeWorker]:
        return [worker for worker in self.workers if not worker.ended]

    def hold(self) -> None:
        """Keep every task unanswered until `release()` (at most HOLD_LIMIT)."""
        self.holding = True
        asyncio.get_running_loop().call_later(HOLD_LIMIT, self.release)

    def release(self) -> None:
        """Stop holding: every worker answers what it holds, and what comes next."""
        self.holding = False
        for worker in self.live():
            worker.run_all()
