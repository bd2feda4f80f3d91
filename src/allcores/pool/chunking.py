"""How big a `Pool.map` chunk is, learned from how long chunks take to run.

Pure: no clock, no pool, no I/O, so tests drive it with made-up timings. The map
(`allcores.pool.map`) asks `next_size()` before it cuts a chunk, and reports each
finished chunk's item count and run seconds (measured in the worker) to `learn()`.
"""

from __future__ import annotations

__all__ = ["CHUNK_GROWTH", "MAX_CHUNKSIZE", "TARGET_CHUNK_SECONDS", "ChunkSizer"]

# Chunks aim to run this long: per-chunk overhead (~50 µs round trip, pickling)
# stays ~1 %, and the last chunks end within ~5 ms of each other.
TARGET_CHUNK_SECONDS = 0.005
# Auto chunks never exceed this many items, which bounds the memory an endless
# input holds in flight (the map's chunks in flight x this).
MAX_CHUNKSIZE = 16_384
# A chunk grows at most this much per measurement, so one noisy (fast) first chunk
# cannot make the next one huge.
CHUNK_GROWTH = 8
# Each finished chunk moves the per-item estimate this far towards its own figure.
LEARNING_RATE = 0.5


class ChunkSizer:
    """Chunk sizes for one map: fixed when the caller gave *chunksize*, else learned.

    *items_hint* is how many inputs the map expects (0: unknown, an iterator);
    with it, the sizer leaves at least four chunks per worker of what is left, so
    every worker gets a share of the end of the map.
    """

    def __init__(self, chunksize: int | None, *, workers: int, items_hint: int = 0) -> None:
        if chunksize is not None and chunksize < 1:
            raise ValueError("chunksize must be >= 1.")  # concurrent.futures' words
        self.auto = chunksize is None
        self.size = chunksize or 1
        self.workers = workers
        self.items_left = items_hint
        self.per_item: float | None = None  # seconds an item takes, once measured

    def next_size(self) -> int:
        """The size of the next chunk: 1 until a chunk has been measured."""
        if not self.auto or self.per_item is None:
            return self.size
        target = TARGET_CHUNK_SECONDS / max(self.per_item, 1e-8)
        size = int(min(target, self.size * CHUNK_GROWTH, MAX_CHUNKSIZE))
        if self.items_left:
            size = min(size, -(-self.items_left // (4 * self.workers)))
        self.size = max(1, size)
        return self.size

    def cut(self, items: int) -> None:
        """A chunk of *items* inputs was cut (and sent)."""
        if self.items_left:
            self.items_left = max(0, self.items_left - items)

    def learn(self, items: int, seconds: float) -> None:
        """A chunk of *items* inputs ran in *seconds* (in the worker)."""
        if not self.auto or items <= 0:
            return
        per_item = seconds / items
        if self.per_item is None:
            self.per_item = per_item
        else:
            self.per_item += (per_item - self.per_item) * LEARNING_RATE
