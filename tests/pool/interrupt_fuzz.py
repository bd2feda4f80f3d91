"""Ctrl-C at random moments into a tight loop of direct round trips (a subprocess).

Run by ``test_pool_direct.py`` as ``python -m tests.pool.interrupt_fuzz SEED COUNT``.
A SIGALRM handler raises a BaseException, as Ctrl-C raises KeyboardInterrupt, every
0.5-3 ms into ``pool.submit(...).result()`` in the main thread, COUNT times. After
each interrupt the cut task must still end (its result, or ReplyLostError when the
cut lost its reply), the next task must run, and the pool must shut down. Exits 0
and prints ``OK`` then; prints what it found and exits 1 otherwise. Every wait is
bounded, so a hang shows as a failure, not as a stuck test.
"""

from __future__ import annotations

import random
import signal
import sys
import time
from typing import Any

from allcores.pool import Pool, ReplyLostError
from tests.pool import helpers

# Long enough for a loaded CI machine; a lost reply would wait forever.
HANG = 20.0


class Interrupted(BaseException):
    """What an interrupt raises, like KeyboardInterrupt (the alarm handler here, the
    tracer in `cut_sweep`)."""


# The alarm interrupts only while this is True: inside the loop's `try`, never in
# the test's own bookkeeping around it (an interrupt there would fail the test, not
# the pool). Set and cleared by single bytecodes, between which handlers run.
_armed = False


def _interrupt(_signum: int, _frame: Any) -> None:
    if _armed:
        raise Interrupted


def is_cut(exc: BaseException) -> bool:
    """An exception that the interrupt caused. CPython's Condition.wait, cut inside
    `_release_save`, raises RuntimeError from its own with-exit: a fragility of
    concurrent.futures' futures (ProcessPoolExecutor's too), not of the pool."""
    if isinstance(exc, Interrupted):
        return True
    return isinstance(exc, RuntimeError) and isinstance(exc.__context__, Interrupted)


def main(seed: int, count: int, seconds: float) -> int:
    global _armed
    rng = random.Random(seed)
    signal.signal(signal.SIGALRM, _interrupt)
    lost = 0
    cuts = 0
    deadline = time.monotonic() + seconds
    with Pool(1) as pool:
        for _ in range(50):
            pool.submit(helpers.add, 1).result(timeout=HANG)
        while cuts < count and time.monotonic() < deadline:
            last = None
            try:
                _armed = True
                signal.setitimer(signal.ITIMER_REAL, rng.uniform(0.0005, 0.003))
                # Bounded: a cut that lands in a weakref callback is swallowed
                # ("Exception ignored"), and then no interrupt comes.
                for _ in range(5_000):
                    last = pool.submit(helpers.add, 1)
                    last.result()
            except BaseException as exc:
                if not is_cut(exc):
                    raise
                cuts += 1
            finally:
                _armed = False
                signal.setitimer(signal.ITIMER_REAL, 0)
            try:
                if last is not None:
                    try:
                        assert last.result(timeout=HANG) == 2
                    except ReplyLostError:
                        lost += 1
                assert pool.submit(helpers.add, 1).result(timeout=HANG) == 2
            except BaseException as exc:
                print(f"FAILED after {cuts} interrupts: {type(exc).__name__}: {exc}")
                print(f"  the cut task: {last!r}; pool: {pool.stats()}")
                return 1
        stats = pool.stats()
    print(f"OK: {cuts} interrupts, {lost} replies lost, {stats.completed} tasks completed")
    return 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])))
