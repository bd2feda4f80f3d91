"""A Pool dropped without shutdown(): collected, as a ProcessPoolExecutor is, and shut
down once the work already given is done; its futures and maps still get results.

The `Pool` a user holds is a facade over its engine, and nothing the engine runs
refers back to the facade, so dropping the last reference collects it.
"""

from __future__ import annotations

import asyncio
import gc
import subprocess
import sys
import textwrap
import weakref

import pytest

from allcores.pool import Pool
from tests.conftest import wait_until
from tests.pool import helpers
from tests.pool.conftest import child_pids, wait_gone

pytestmark = pytest.mark.usefixtures("no_leftovers")


def _collected(ref: weakref.ref[Pool]) -> None:
    """The Pool behind *ref*, whose last strong reference the caller deleted, is gone."""
    gc.collect()
    assert ref() is None


def _started(before: set[int]) -> set[int]:
    """The new pool's zygote and two workers (the second may still be forking)."""
    return set(wait_until(lambda: len(child_pids() - before) == 3 and child_pids() - before))


def test_an_idle_pool_dropped_stops_its_processes() -> None:
    before = child_pids()
    pool = Pool(2)
    assert pool.submit(helpers.add, 1).result(timeout=30) == 2
    started = _started(before)
    ref = weakref.ref(pool)
    del pool
    _collected(ref)
    assert wait_gone(started, timeout=30) == set()


def test_a_pool_never_used_and_dropped_stops_its_processes() -> None:
    before = child_pids()
    pool = Pool(2)
    started = _started(before)
    ref = weakref.ref(pool)
    del pool
    _collected(ref)
    assert wait_gone(started, timeout=30) == set()


def test_work_given_before_the_drop_still_completes() -> None:
    before = child_pids()
    pool = Pool(2)
    running = pool.submit(helpers.sleep_then, 0.3, "done")
    queued = [pool.submit(helpers.add, i) for i in range(4)]
    results = pool.map(helpers.square, range(10))
    started = _started(before)
    ref = weakref.ref(pool)
    del pool
    _collected(ref)
    assert running.result(timeout=30) == "done"
    assert [f.result(timeout=30) for f in queued] == [1, 2, 3, 4]
    assert list(results) == [i * i for i in range(10)]
    assert wait_gone(started, timeout=30) == set()


async def test_a_pool_dropped_inside_a_running_loop_stops_its_processes() -> None:
    before = child_pids()
    pool = Pool(2)
    assert await pool.run(helpers.add, 1) == 2
    started = _started(before)
    ref = weakref.ref(pool)
    del pool
    _collected(ref)
    # The shutdown runs on this loop: it gets turns between the looks.
    for _ in range(300):
        if not wait_gone(started, timeout=0.05):
            break
        await asyncio.sleep(0.1)
    assert wait_gone(started, timeout=0.05) == set()


def test_a_script_making_a_pool_per_call_keeps_no_processes() -> None:
    """What a user writes when they forget shutdown(): a pool per call, never closed."""
    script = textwrap.dedent(
        """
        import allcores, gc, psutil, time

        seen = {}  # pid: creation time (this VM's pids wrap at 32768)

        def handle(x):
            pool = allcores.Pool(2)
            result = pool.submit(abs, -x).result()
            for child in psutil.Process().children(recursive=True):
                try:
                    seen[child.pid] = child.create_time()
                except psutil.Error:
                    pass
            return result

        assert [handle(i) for i in range(10)] == list(range(10))

        def alive(pid):
            try:
                process = psutil.Process(pid)
                return (process.create_time() == seen[pid]
                        and process.status() != psutil.STATUS_ZOMBIE
                        and "resource_tracker" not in " ".join(process.cmdline()))
            except psutil.Error:
                return False  # gone

        def describe(pid):
            try:
                process = psutil.Process(pid)
                return pid, process.ppid(), process.status(), process.cmdline()
            except psutil.Error:
                return pid, "gone"

        gc.collect()
        deadline = time.monotonic() + 30
        while True:  # one reading decides and is printed: a process exiting flickers
            left = [pid for pid in seen if alive(pid)]
            if not left or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        print([describe(pid) for pid in left])
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
