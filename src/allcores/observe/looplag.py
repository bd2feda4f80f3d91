"""The heartbeat an event loop writes into its scoreboard row.

Every `INTERVAL` seconds the loop runs `_tick`: it stamps the row's heartbeat and
records how late the tick ran (the loop lag). A loop blocked by CPU-bound work stops
beating, which is how the primary tells a busy worker from a hung one and stops
sending it connections.
"""

from __future__ import annotations

import asyncio
import time

from allcores.observe.scoreboard import Row

__all__ = ["INTERVAL", "LoopMonitor"]

# 50 ms: a blocked loop is noticed within one or two beats (the balancer's staleness
# limit is a few beats), while the tick itself costs about 5 µs, i.e. 0.01 % of a core.
INTERVAL = 0.05


class LoopMonitor:
    def __init__(
        self, row: Row, loop: asyncio.AbstractEventLoop | None = None, interval: float = INTERVAL
    ) -> None:
        self._row = row
        self._loop = loop or asyncio.get_running_loop()
        self._interval = interval
        self._handle: asyncio.TimerHandle | None = None
        self._expected = 0.0

    def start(self) -> None:
        self._row.beat()
        self._schedule()

    def _schedule(self) -> None:
        self._expected = time.monotonic() + self._interval
        self._handle = self._loop.call_later(self._interval, self._tick)

    def _tick(self) -> None:
        now = time.monotonic()
        self._row.beat(now)
        self._row.record_lag(max(0.0, (now - self._expected) * 1000.0))
        self._schedule()

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
