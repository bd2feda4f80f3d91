"""Which code blocks a worker's event loop: a thread that catches it in the act.

::

    the loop ── beats its row every 50 ms (looplag.py)
    this thread ── every `after / 2` s: the beat older than `after` + a beat?
        └─ yes, once per stall: the loop's thread stack (sys._current_frames),
           logged once per code site (its innermost frame), at most
           `_REPORTS_PER_MINUTE`: the line a user should move to `offload`

Only a thread inside the process can read a Python stack while the loop's own
thread is stuck in it; the primary sees only that the heartbeat stopped.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import threading
import time
import traceback

from allcores.observe.looplag import INTERVAL
from allcores.observe.scoreboard import Row

__all__ = ["StallReporter"]

log = logging.getLogger("allcores.server")

# A loop that blocks all the time must not flood the log: past this, stalls at new
# sites wait for the next minute.
_REPORTS_PER_MINUTE = 6


class StallReporter:
    """Logs the stack of the thread running *row*'s loop when it stalls past *after*."""

    def __init__(self, row: Row, after: float, label: str) -> None:
        self._row = row
        self._after = after
        self._label = label
        self._loop_thread = threading.get_ident()
        self._sites: set[tuple[str, int]] = set()
        self._minute = 0.0
        self._reports = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="allcores-stall", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        reported = False
        while not self._stop.wait(self._after / 2):
            beat = self._row.get("heartbeat")
            if beat <= 0:
                continue
            stalled = time.monotonic() - beat - INTERVAL
            if stalled < self._after:
                reported = False
            elif not reported:
                reported = True
                self._report(stalled)

    def _report(self, stalled: float) -> None:
        frame = sys._current_frames().get(self._loop_thread)
        if frame is None:
            return
        stack = _below_the_loop(traceback.extract_stack(frame))
        innermost = stack[-1]
        site = (innermost.filename, innermost.lineno or 0)
        now = time.monotonic()
        if now - self._minute > 60.0:
            self._minute, self._reports = now, 0
        if site in self._sites or self._reports >= _REPORTS_PER_MINUTE:
            return
        self._sites.add(site)
        self._reports += 1
        log.warning(
            "allcores: %s: event loop blocked for %.0f ms (so far) at %s:%d in %s; "
            "move that work off the loop (await allcores.offload(fn, ...)). "
            "Reported once per line. Stack:\n%s",
            self._label,
            stalled * 1000,
            innermost.filename,
            innermost.lineno,
            innermost.name,
            "".join(traceback.format_list(stack)).rstrip(),
        )


# Where the code that runs the loop lives (allcores, asyncio): not what blocked it.
_RUNNERS = (
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep,
    os.path.dirname(os.path.abspath(asyncio.__file__)) + os.sep,
)


def _below_the_loop(stack: traceback.StackSummary) -> list[traceback.FrameSummary]:
    """The frames the loop called; the frames that run the loop (runpy, allcores,
    asyncio's runner) say nothing about what blocked it."""
    for i in range(len(stack) - 1, -1, -1):
        if stack[i].filename.startswith(_RUNNERS):
            return list(stack[i + 1 :]) or list(stack)
    return list(stack)
