"""The scoreboard: one shared-memory table, one row per child process.

::

    primary / pool owner                      child k (worker or pool worker)
    Scoreboard.create(rows) ── fd ─────────►  Scoreboard.attach(fd, rows)
    reads every row (balance, watchdog,        writes only row k: heartbeat, state,
    metrics) with no message traffic           in-flight counts, counters, loop lag

One writer per row, so no lock: each field is an aligned 8-byte word, and a reader
that sees a value half a heartbeat old is still right about what matters (is this
loop alive, how busy is it). The owner clears a row before handing it to a new child.

Times are ``time.monotonic()``, which on Linux is the system-wide CLOCK_MONOTONIC,
so a reader can compare a child's heartbeat with its own clock.
"""

from __future__ import annotations

import dataclasses
import struct
import time

from allcores.shm.segment import Segment

__all__ = ["LAG_BUCKETS_MS", "LATENCY_BUCKETS_S", "Row", "RowState", "Scoreboard"]


class RowState:
    """What a row's process is doing (the ``state`` field)."""

    FREE = 0
    STARTING = 1
    READY = 2
    BUSY = 3
    STOPPING = 4
    NAMES = ("free", "starting", "ready", "busy", "stopping")


# Upper bounds (ms) of the loop-lag histogram buckets; the last bucket is "more".
# They straddle what users feel: under 1 ms is healthy, 100 ms+ is a stalled loop.
LAG_BUCKETS_MS = (1.0, 5.0, 25.0, 100.0, 500.0, 2000.0)

# Upper bounds (s) of the request-duration buckets an HTTP worker fills (`allcores
# serve`); the last is "more". Prometheus' default buckets, which dashboards expect.
LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

_FIELDS: tuple[tuple[str, str], ...] = (
    ("pid", "q"),
    ("state", "q"),
    ("started", "d"),
    ("heartbeat", "d"),
    ("connections", "q"),
    ("connections_closed", "q"),
    ("tasks", "q"),  # in flight now: an HTTP worker's requests, a pool process's tasks
    ("requests_total", "q"),
    ("tasks_total", "q"),
    ("lag_ms", "d"),
    ("lag_max_ms", "d"),
    ("rss", "q"),
    ("latency_sum", "d"),  # a pool process: the run time of its tasks
    ("offloads", "q"),  # an HTTP worker's tasks in the shared pool (sent, not answered)
    ("wait_sum", "d"),  # a shared-pool process: its tasks' time in the queue
    *((f"lag_bucket_{i}", "q") for i in range(len(LAG_BUCKETS_MS) + 1)),
    *((f"latency_bucket_{i}", "q") for i in range(len(LATENCY_BUCKETS_S) + 1)),
    *((f"wait_bucket_{i}", "q") for i in range(len(LATENCY_BUCKETS_S) + 1)),
)
_SCALARS = 15  # the fields before the histograms
_ROW = struct.Struct("=" + "".join(kind for _name, kind in _FIELDS))
_OFFSETS = {}
_offset = 0
for _name, _kind in _FIELDS:
    _OFFSETS[_name] = (_offset, struct.Struct("=" + _kind))
    _offset += 8
ROW_SIZE = _ROW.size


@dataclasses.dataclass(frozen=True)
class RowSnapshot:
    index: int
    pid: int
    state: int
    started: float
    heartbeat: float
    connections: int
    connections_closed: int
    tasks: int
    requests_total: int
    tasks_total: int
    lag_ms: float
    lag_max_ms: float
    rss: int
    latency_sum: float
    offloads: int
    wait_sum: float
    lag_histogram: tuple[int, ...]
    latency_histogram: tuple[int, ...]
    wait_histogram: tuple[int, ...]

    @property
    def state_name(self) -> str:
        return RowState.NAMES[self.state] if 0 <= self.state < len(RowState.NAMES) else "?"

    def heartbeat_age(self, now: float | None = None) -> float:
        """Seconds since the row's loop last beat (inf if it never did)."""
        if self.heartbeat <= 0:
            return float("inf")
        return (time.monotonic() if now is None else now) - self.heartbeat


class Row:
    """The writer's handle on its own row."""

    __slots__ = ("_base", "_buf", "index")

    def __init__(self, buf: memoryview, index: int) -> None:
        self._buf = buf
        self._base = index * ROW_SIZE
        self.index = index

    def set(self, field: str, value: float) -> None:
        offset, fmt = _OFFSETS[field]
        fmt.pack_into(self._buf, self._base + offset, value)

    def slot(self, field: str) -> tuple[memoryview, int, struct.Struct]:
        """(buffer, byte position, format) of *field*, for a writer on a hot path
        that packs into it directly (`Row.set` costs ~1 µs, mostly the lookup)."""
        offset, fmt = _OFFSETS[field]
        return self._buf, self._base + offset, fmt

    def get(self, field: str) -> float:
        offset, fmt = _OFFSETS[field]
        value: float = fmt.unpack_from(self._buf, self._base + offset)[0]
        return value

    def add(self, field: str, delta: int) -> None:
        offset, fmt = _OFFSETS[field]
        pos = self._base + offset
        fmt.pack_into(self._buf, pos, fmt.unpack_from(self._buf, pos)[0] + delta)

    def beat(self, now: float | None = None) -> None:
        self.set("heartbeat", time.monotonic() if now is None else now)

    def record_lag(self, lag_ms: float) -> None:
        self.set("lag_ms", lag_ms)
        if lag_ms > self.get("lag_max_ms"):
            self.set("lag_max_ms", lag_ms)
        bucket = len(LAG_BUCKETS_MS)
        for i, bound in enumerate(LAG_BUCKETS_MS):
            if lag_ms <= bound:
                bucket = i
                break
        self.add(f"lag_bucket_{bucket}", 1)

    def observe(self, histogram: str, seconds: float) -> None:
        """One observation into the ``latency`` or ``wait`` histogram (LATENCY_BUCKETS_S)."""
        self.set(f"{histogram}_sum", self.get(f"{histogram}_sum") + seconds)
        bucket = len(LATENCY_BUCKETS_S)
        for i, bound in enumerate(LATENCY_BUCKETS_S):
            if seconds <= bound:
                bucket = i
                break
        self.add(f"{histogram}_bucket_{bucket}", 1)

    def clear(self, pid: int = 0, state: int = RowState.FREE) -> None:
        self._buf[self._base : self._base + ROW_SIZE] = bytes(ROW_SIZE)
        self.set("pid", pid)
        self.set("state", state)
        self.set("started", time.monotonic())


class Scoreboard:
    """The table. The owner creates it; children attach to the fd they were given."""

    def __init__(self, segment: Segment, rows: int) -> None:
        self.segment = segment
        self.rows = rows

    @classmethod
    def create(cls, rows: int) -> Scoreboard:
        if rows < 1:
            raise ValueError(f"a scoreboard needs at least one row, got {rows}")
        return cls(Segment.create(rows * ROW_SIZE, name="allcores-scoreboard"), rows)

    @classmethod
    def attach(cls, fd: int, rows: int) -> Scoreboard:
        return cls(Segment.attach(fd, rows * ROW_SIZE), rows)

    @property
    def fd(self) -> int:
        return self.segment.fd

    def row(self, index: int) -> Row:
        if not 0 <= index < self.rows:
            raise IndexError(f"scoreboard row {index} out of range 0..{self.rows - 1}")
        return Row(self.segment.buf, index)

    def read(self, index: int) -> RowSnapshot:
        values = _ROW.unpack_from(self.segment.buf, index * ROW_SIZE)
        names = (name for name, _kind in _FIELDS[:_SCALARS])
        fields = dict(zip(names, values[:_SCALARS], strict=True))
        lag_end = _SCALARS + len(LAG_BUCKETS_MS) + 1
        latency_end = lag_end + len(LATENCY_BUCKETS_S) + 1
        return RowSnapshot(
            index=index,
            lag_histogram=tuple(values[_SCALARS:lag_end]),
            latency_histogram=tuple(values[lag_end:latency_end]),
            wait_histogram=tuple(values[latency_end:]),
            **fields,
        )

    def snapshot(self) -> list[RowSnapshot]:
        return [self.read(i) for i in range(self.rows)]

    def close(self) -> None:
        self.segment.close()
