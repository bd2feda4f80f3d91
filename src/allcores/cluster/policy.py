"""When a worker's exit is a crash loop, and how long to wait before replacing it.

Pure bookkeeping: no processes, no clock, no randomness of its own. The supervision
loop (`allcores.cluster.primary`) hands it the facts of each exit, with times read
from `time.monotonic()`, and acts on the answers. The settings are read at each call,
so `cluster.setup_primary(...)` applies to the next exit.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
from collections.abc import Iterable

from allcores.cluster.settings import ClusterSettings

__all__ = ["Exit", "RespawnPolicy", "Verdict"]

# The respawn delay varies by up to half of itself either way, so that workers that
# crashed together do not all come back in the same instant (and crash together again).
_JITTER = 0.5


@dataclasses.dataclass(frozen=True)
class Exit:
    """What the supervision loop knows about one worker's exit."""

    worker_id: int
    pid: int
    code: int | None
    """Its exit code; None when a signal killed it."""
    signal: str | None
    """The name of the signal that killed it (``"SIGKILL"``)."""
    row: int
    """Its scoreboard row: the slot a respawn refills."""
    started: float
    """When the worker was started (monotonic seconds)."""
    ended: float
    """When its exit was seen (monotonic seconds)."""
    listened: bool
    """It got as far as listening on an address at least once."""
    planned: bool = False
    """It was asked to go (disconnect, kill, stop): never a crash."""


class Verdict(enum.Enum):
    PLANNED = "planned"
    """Asked for: not counted, not respawned."""
    CRASH = "crash"
    """Unplanned: the respawn rule decides whether the row is refilled."""
    CRASH_LOOP = "crash loop"
    """The crash that reached `crash_loop_limit` within `crash_loop_window`: stop."""


class RespawnPolicy:
    """Counts crashes across the cluster and consecutive crashes per row."""

    def __init__(self, settings: ClusterSettings) -> None:
        self.settings = settings
        self._crash_times: collections.deque[float] = collections.deque()
        self._streaks: dict[int, int] = {}

    def judge(self, worker_exit: Exit) -> Verdict:
        """Record an exit: a crash counts towards the crash loop for `crash_loop_window`."""
        if worker_exit.planned:
            return Verdict.PLANNED
        window = self.settings.crash_loop_window
        self._crash_times.append(worker_exit.ended)
        while self._crash_times and worker_exit.ended - self._crash_times[0] > window:
            self._crash_times.popleft()
        if len(self._crash_times) >= self.settings.crash_loop_limit:
            return Verdict.CRASH_LOOP
        return Verdict.CRASH

    def booting(self, worker_exit: Exit) -> bool:
        """It died before it ever listened, within `boot_period` of its start: it
        failed while booting (a bad config, a missing module), not while serving."""
        lived = worker_exit.ended - worker_exit.started
        return not worker_exit.listened and lived < self.settings.boot_period

    def describe(self, worker_exit: Exit) -> str:
        """``worker 3 (pid 1234) failed while booting: exit code 3``."""
        code, sig = worker_exit.code, worker_exit.signal
        how = f"killed by {sig}" if sig else f"exit code {code}"
        when = "failed while booting" if self.booting(worker_exit) else "crashed"
        return f"worker {worker_exit.worker_id} (pid {worker_exit.pid}) {when}: {how}"

    def crash_loop_report(
        self, worker_exit: Exit, output: Iterable[str], *, shown_above: bool = False
    ) -> str:
        """What the primary prints when *worker_exit* made a crash loop; *output* is
        the last lines the worker wrote to stderr (not repeated if *shown_above*)."""
        settings = self.settings
        if shown_above:
            shown = "  (shown above)"
        else:
            shown = "\n".join(f"  | {line}" for line in output) or "  (no output)"
        return (
            f"allcores: {self.describe(worker_exit)}; {len(self._crash_times)} unplanned "
            f"worker exits within {settings.crash_loop_window:g} s "
            f"(crash_loop_limit={settings.crash_loop_limit}): stopping the cluster.\n"
            f"Last output of worker {worker_exit.worker_id}:\n{shown}"
        )

    def respawn_delay(self, worker_exit: Exit, jitter: float) -> float:
        """Seconds to wait before refilling the crashed worker's row; *jitter* is a
        random number in [0, 1).

        `respawn_delay`, doubled for each earlier crash of the same row in a row, up
        to `respawn_delay_max`, then ± 50 %. The streak starts over only when a
        worker stayed up longer than `boot_period`: listening is not enough, or a
        worker that dies a second after it starts serving would be replaced every
        0.1 s until the crash-loop limit stops the cluster.
        """
        settings = self.settings
        lived = worker_exit.ended - worker_exit.started
        row = worker_exit.row
        streak = 0 if lived > settings.boot_period else self._streaks.get(row, 0)
        delay = settings.respawn_delay * 2.0**streak
        if delay < settings.respawn_delay_max:
            # Past the cap the streak stops growing: 2**streak would only get larger
            # until it no longer converts to a float.
            self._streaks[row] = streak + 1
        else:
            delay = settings.respawn_delay_max
            self._streaks[row] = streak
        return delay * (1 - _JITTER + 2 * _JITTER * jitter)
