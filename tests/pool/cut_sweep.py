"""Ctrl-C at each point of a direct round trip in turn (a subprocess).

Run by ``test_pool_direct.py`` as ``python -m tests.pool.cut_sweep WORKERS MAX_TASKS
[first [STRIDE START]]``; with ``first``, each cut falls in the first round trip of a
new pool, which starts the pool's loop and goes to a worker still starting
(`Pool._send_early`). STRIDE and START walk every STRIDE-th point from START: a new
pool per point is the slow part of the suite, so two runs share the points.
Where `interrupt_fuzz` fires at random moments, this walks the moments: for k = 1,
2, ... it raises a BaseException (as Ctrl-C raises KeyboardInterrupt) at the k-th
point of ``pool.submit(fn).result()`` where CPython runs signal handlers (a function
entry, the return of a call, a backward jump), found with a tracer, until round
trips keep having fewer points than k (their count varies: the reply may come in the
first look or after some polling). After each cut the cut task must end (its result, or
ReplyLostError), the next task must run, and the pool must come back to rest (no
task queued or running, every worker idle); at the end it must shut down. Prints
``OK`` and exits 0, or prints the first failure and exits 1. Every wait is bounded.
"""

from __future__ import annotations

import concurrent.futures
import dis
import gc
import os
import sys
import threading
import time
from types import CodeType, FrameType
from typing import Any

from allcores.pool import Pool, ReplyLostError
from tests.pool import helpers
from tests.pool.interrupt_fuzz import Interrupted, is_cut

HANG = 20.0  # for a loaded CI machine; a lost reply would wait forever
_CALLS = ("CALL", "CALL_KW", "CALL_FUNCTION_EX")


_after_call: dict[CodeType, frozenset[int]] = {}


def _cut_points(code: CodeType) -> frozenset[int]:
    """Offsets in *code* where a signal handler may run: after a call, at a
    backward jump (function entries come as "call" events)."""
    points = _after_call.get(code)
    if points is None:
        found = set()
        previous = None
        for instruction in dis.get_instructions(code):
            if previous is not None and previous.opname in _CALLS:
                found.add(instruction.offset)
            if instruction.opname.startswith("JUMP_BACKWARD"):
                found.add(instruction.offset)
            previous = instruction
        points = _after_call[code] = frozenset(found)
    return points


_collecting = False


def _gc_phase(phase: str, _info: dict[str, int]) -> None:
    global _collecting
    _collecting = phase == "start"


def _weakref_callback(code: CodeType) -> bool:
    return code.co_filename.endswith(("_weakrefset.py", f"{os.sep}weakref.py"))


class Cutter:
    """Raises at the k-th cut point. Not in code that the garbage collector or a
    weakref callback runs meanwhile: CPython drops an exception raised there ("Exception
    ignored"), and on 3.11 tracing it has been seen to corrupt the tracer's state."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.seen = 0
        self.where: str | None = None

    def _tick(self, frame: FrameType) -> None:
        self.seen += 1
        if self.seen == self.k:
            self.where = f"{frame.f_code.co_name}:{frame.f_lineno}"
            raise Interrupted

    def trace(self, frame: FrameType, event: str, _arg: Any) -> Any:
        if self.where is not None or _collecting:
            return None  # cut already (the caller stops tracing), or in the collector
        if event == "call":
            if frame.f_code is _gc_phase.__code__ or _weakref_callback(frame.f_code):
                return None
            frame.f_trace_opcodes = True
            self._tick(frame)
        elif event == "opcode" and frame.f_lasti in _cut_points(frame.f_code):
            self._tick(frame)
        return self.trace


def _at_rest(pool: Pool) -> list[str]:
    stats = pool.stats()
    wrong = []
    if stats.queued:
        wrong.append(f"{stats.queued} queued")
    if stats.busy or stats.idle + stats.starting != stats.workers:
        wrong.append(f"{stats.busy} busy, {stats.idle} idle of {stats.workers}")
    if pool._engine._direct_live:
        wrong.append(f"{len(pool._engine._direct_live)} direct tasks outstanding")
    return wrong


def _shuts_down(pool: Pool) -> bool:
    closer = threading.Thread(target=pool.shutdown, daemon=True)
    closer.start()
    closer.join(HANG)
    return not closer.is_alive()


def main(workers: int, max_tasks: int, first: bool, stride: int = 1, start: int = 1) -> int:
    gc.callbacks.append(_gc_phase)
    settings: dict[str, Any] = {"max_tasks_per_child": max_tasks} if max_tasks else {}
    pool = Pool(workers, **settings)
    for _ in range(5):
        pool.submit(helpers.add, 1).result(timeout=HANG)
    lost = 0
    cuts = 0
    misses = 0
    for k in range(start, 1500, stride):
        if first:
            if not _shuts_down(pool):
                print(f"FAILED: shutdown hung after a cut at point {k - 1}")
                return 1
            pool = Pool(workers, **settings)
        cutter = Cutter(k)
        future = None
        sys.settrace(cutter.trace)
        try:
            future = pool.submit(helpers.add, 1)
            future.result(timeout=HANG)
        except BaseException as exc:
            if not is_cut(exc):  # the cut, or CPython's Condition turning it into an error
                raise
        finally:
            sys.settrace(None)
        if cutter.where is None:
            misses += 1
            if misses == 5:
                break  # round trips have fewer than k points: all done
            continue
        misses = 0
        cuts += 1
        problems = []
        if future is not None:
            try:
                if future.result(timeout=HANG) != 2:
                    problems.append("a wrong result")
            except ReplyLostError:
                lost += 1
            except concurrent.futures.TimeoutError:
                problems.append("the cut task never ended")
        try:
            pool.submit(helpers.add, 5).result(timeout=HANG)
        except concurrent.futures.TimeoutError:
            problems.append("the next task never ended")
        deadline = time.monotonic() + HANG
        while _at_rest(pool) and time.monotonic() < deadline:
            time.sleep(0.01)
        problems += _at_rest(pool)
        if problems:
            print(f"FAILED: a cut at point {k} ({cutter.where}): {'; '.join(problems)}")
            print(f"  shut down afterwards: {_shuts_down(pool)}")
            return 1
    if not _shuts_down(pool):
        print("FAILED: shutdown hung")
        return 1
    print(f"OK: {cuts} points cut, {lost} replies lost")
    return 0


if __name__ == "__main__":
    first = len(sys.argv) > 3 and sys.argv[3] == "first"
    stride, start = (int(sys.argv[4]), int(sys.argv[5])) if len(sys.argv) > 5 else (1, 1)
    sys.exit(main(int(sys.argv[1]), int(sys.argv[2]), first, stride, start))
