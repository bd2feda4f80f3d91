"""`MapIterator`: the results of `Pool.map`, `imap` and `imap_unordered`.

::

    inputs ──(islice, ChunkSizer.next_size)──► chunk ──► pool queue ──► a worker
                       ▲                                                 │
                       └── ChunkSizer.learn(items, seconds) ◄── CHUNK_RESULT
    results ◄── ordered (by chunk) or as chunks complete ◄───────────────┘

Inputs are pulled lazily, at most ``MAP_INFLIGHT_PER_WORKER x max_workers`` chunks
ahead, so an endless generator runs in bounded memory. The same object iterates,
async-iterates, or is awaited for a list.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import itertools
import operator
import sys
import time
from collections.abc import AsyncIterator, Callable, Generator, Iterable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

from allcores.pool.chunking import ChunkSizer

if TYPE_CHECKING:
    from allcores.pool.shutdown import PoolEngine

__all__ = ["MAP_INFLIGHT_PER_WORKER", "MapIterator"]

R = TypeVar("R")

# Chunks in flight per worker: one running, two waiting, as with the scheduler's
# PREFETCH.
MAP_INFLIGHT_PER_WORKER = 3


class MapIterator(Iterator[R], AsyncIterator[R]):
    """The results of `Pool.map` / `imap` / `imap_unordered`: iterate, async-iterate, or await."""

    def __init__(
        self,
        pool: PoolEngine,
        fn: Callable[..., R],
        iterables: tuple[Iterable[Any], ...],
        *,
        chunksize: int | None,
        ordered: bool,
        timeout: float | None,
    ) -> None:
        self._closed = True  # until set up: __del__ then has nothing to close
        if not iterables:
            raise TypeError("map() needs at least one iterable")
        hint = operator.length_hint(iterables[0]) if len(iterables) == 1 else 0
        self._sizer = ChunkSizer(chunksize, workers=pool._settings.max_workers, items_hint=hint)
        self._pool = pool
        self._fn = fn
        self._items: Iterator[tuple[Any, ...]] = zip(*iterables, strict=False)
        self._ordered = ordered
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self._max_inflight = MAP_INFLIGHT_PER_WORKER * pool._settings.max_workers
        self._inflight: collections.deque[concurrent.futures.Future[Any]] = collections.deque()
        self._ready: collections.deque[R] = collections.deque()
        self._error: BaseException | None = None
        self._exhausted = False
        self._input_error: Exception | None = None  # the inputs raised in `submit_rest`
        self._closed = False
        self._fill()
        pool._maps.add(self)

    def _fill(self) -> None:
        while not self._exhausted and not self._closed and len(self._inflight) < self._max_inflight:
            size = self._sizer.next_size()
            chunk = list(itertools.islice(self._items, size))
            if not chunk:
                self._exhausted = True
                return
            self._sizer.cut(len(chunk))
            self._inflight.append(self._pool._submit_chunk(self._fn, chunk))
            if len(chunk) < size:
                self._exhausted = True

    def submit_rest(self) -> None:
        """Send every input left now: the pool shuts down. ProcessPoolExecutor's map
        submits all its inputs at once, so code that reads a map's results after
        ``with`` ends works there; it works here too. (An endless input then never
        ends, as it never returns from ProcessPoolExecutor's map.)"""
        if self._closed or self._exhausted:
            return
        self._max_inflight = sys.maxsize
        try:
            self._fill()
        except Exception as exc:  # raised once the results before it are read
            self._exhausted = True
            self._input_error = exc

    def _take(self, future: concurrent.futures.Future[Any]) -> None:
        self._inflight.remove(future)
        results, error, seconds = future.result()
        self._sizer.learn(len(results) + (error is not None), seconds)
        self._ready.extend(results)
        if error is not None:
            self._error = error

    def _remaining(self) -> float | None:
        if self._deadline is None:
            return None
        return max(0.0, self._deadline - time.monotonic())

    def __iter__(self) -> MapIterator[R]:
        return self

    def _advance(self) -> bool | None:
        """True: a result is ready; False: one must be waited for; None: the map is done.

        Raises the map's error (after the results before it). Shared by the sync and
        async iterators, which differ only in how they wait.
        """
        if self._ready:
            return True
        if self._error is not None:
            self.close()
            error, self._error = self._error, None
            raise error
        self._fill()
        if not self._inflight:
            self.close()
            if self._input_error is not None:
                error, self._input_error = self._input_error, None
                raise error
            return None
        return False

    def __next__(self) -> R:
        while True:
            state = self._advance()
            if state:
                return self._ready.popleft()
            if state is None:
                raise StopIteration
            if self._pool._on_loop_thread():
                self.close()
                raise RuntimeError(
                    "iterating a pool's map synchronously on the pool's own event loop would "
                    "deadlock; use `async for` (or `await pool.map(...)`)"
                )
            try:
                if self._ordered:
                    head = self._inflight[0]
                    head.result(self._remaining())
                    self._take(head)
                else:
                    done, _ = concurrent.futures.wait(
                        list(self._inflight),
                        timeout=self._remaining(),
                        return_when=concurrent.futures.FIRST_COMPLETED,
                    )
                    if not done:
                        raise TimeoutError
                    for future in done:
                        self._take(future)
            except BaseException:
                self.close()
                raise

    def __aiter__(self) -> MapIterator[R]:
        return self

    async def __anext__(self) -> R:
        while True:
            state = self._advance()
            if state:
                return self._ready.popleft()
            if state is None:
                raise StopAsyncIteration
            try:
                if self._ordered:
                    head = self._inflight[0]
                    await asyncio.wait_for(
                        asyncio.shield(asyncio.wrap_future(head)), self._remaining()
                    )
                    self._take(head)
                else:
                    waiting = {asyncio.wrap_future(f): f for f in self._inflight}
                    done, _ = await asyncio.wait(
                        waiting, timeout=self._remaining(), return_when=asyncio.FIRST_COMPLETED
                    )
                    if not done:
                        raise TimeoutError
                    for wrapped in done:
                        self._take(waiting[wrapped])
            except BaseException:
                self.close()
                raise

    def __await__(self) -> Generator[Any, None, list[R]]:
        return self._collect().__await__()

    async def _collect(self) -> list[R]:
        return [item async for item in self]

    def close(self) -> None:
        """Stop: queued chunks are dropped (chunks already running finish unseen)."""
        if self._closed:
            return
        self._closed = True
        for future in self._inflight:
            future.cancel()
        self._inflight.clear()

    def __del__(self) -> None:
        self.close()
