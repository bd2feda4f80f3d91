"""The Executor contract, sizing, settings and insight, with real worker processes."""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import multiprocessing
import os
import subprocess
import sys
import textwrap
import threading
import time

import psutil
import pytest

from allcores.observe.scoreboard import RowState
from allcores.pool import (
    InitializerError,
    Pool,
    PoolClosedError,
    RemoteTraceback,
    WorkerCrashedError,
)
from allcores.pool.scheduler import PREFETCH
from tests.pool import helpers
from tests.pool.conftest import wait_gone
from tests.pool.fake_backend import FakeBackend

pytestmark = pytest.mark.usefixtures("no_leftovers")


def test_submit_returns_the_result(pool: Pool) -> None:
    assert pool.submit(helpers.add, 1, y=41).result(timeout=30) == 42


def test_map_keeps_input_order(pool: Pool) -> None:
    assert list(pool.map(helpers.square, range(50))) == [x * x for x in range(50)]


def test_map_zips_several_iterables(pool: Pool) -> None:
    assert list(pool.map(helpers.add, [1, 2, 3], [10, 20, 30])) == [11, 22, 33]


def test_lambdas_and_closures_travel_by_value(pool: Pool) -> None:
    offset = 7
    assert pool.submit(lambda x: x + offset, 1).result(timeout=30) == 8

    def local(x: int) -> int:
        return x * offset

    assert list(pool.map(local, [1, 2])) == [7, 14]


def test_functions_of_main_work_even_if_defined_after_the_pool() -> None:
    """A REPL or notebook defines functions after the workers exist."""
    script = textwrap.dedent(
        """
        from allcores.pool import Pool
        pool = Pool(1)
        def later(x):
            return x * 3
        print(pool.submit(later, 5).result(timeout=30))
        pool.shutdown()
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == "15"


def test_exceptions_carry_the_remote_traceback(pool: Pool) -> None:
    with pytest.raises(ValueError, match="no good") as info:
        pool.submit(helpers.raise_value_error, "no good").result(timeout=30)
    assert isinstance(info.value.__cause__, RemoteTraceback)
    assert "raise_value_error" in str(info.value.__cause__)


def test_unpicklable_argument_fails_at_submit_without_a_worker(pool: Pool) -> None:
    before = pool.stats().submitted
    with pytest.raises((TypeError, Exception), match="pickle"):
        pool.submit(helpers.identity, threading.Lock())
    assert pool.stats().submitted == before


def test_unpicklable_result_fails_the_task_and_the_worker_carries_on() -> None:
    with Pool(1) as pool:
        pid = pool.submit(helpers.pid).result(timeout=30)
        with pytest.raises(TypeError, match="pickle"):
            pool.submit(helpers.return_unpicklable).result(timeout=30)
        assert pool.submit(helpers.pid).result(timeout=30) == pid


def test_initializer_runs_in_every_worker() -> None:
    with Pool(2, initializer=helpers.init_state, initargs=("ready",)) as pool:
        assert set(pool.map(helpers.read_state, range(4), chunksize=1)) in ({"ready"},)


@pytest.mark.parametrize("start_method", ["fork", "forkserver"])
def test_initargs_may_hold_a_multiprocessing_queue_and_lock(start_method: str) -> None:
    """As with ProcessPoolExecutor: initargs go with each worker's start (inherited, or
    pickled by multiprocessing), never pickled on their own, which such objects refuse."""
    context = multiprocessing.get_context(start_method)
    # SimpleQueue: put() writes at once, where a Queue's feeder thread could still
    # hold the report when the worker dies (os._exit) in its first task.
    queue, lock = context.SimpleQueue(), context.Lock()
    try:
        with Pool(
            2, mp_context=context, initializer=helpers.init_report, initargs=(queue, lock)
        ) as pool:
            first = set(pool.worker_pids())
            assert pool.submit(helpers.add, 1).result(timeout=30) == 2
            # A replacement runs the initializer too, with the same queue.
            with pytest.raises(WorkerCrashedError):
                pool.submit(helpers.exit_hard, 3).result(timeout=30)
            assert pool.submit(helpers.add, 2).result(timeout=30) == 3
            reported = set()
            for _ in range(3):
                deadline = time.monotonic() + 30
                while queue.empty() and time.monotonic() < deadline:
                    time.sleep(0.01)
                assert not queue.empty(), f"reports so far: {reported}"
                reported.add(queue.get())
            assert first < reported and len(reported) == 3
    finally:
        queue.close()
        # Named semaphores (forkserver) go with their objects: before the leak check.
        del queue, lock
        gc.collect()


def test_a_lambda_initializer_is_inherited_by_forked_workers() -> None:
    with Pool(1, initializer=lambda: helpers.init_state("from a lambda")) as pool:
        assert pool.submit(helpers.read_state).result(timeout=30) == "from a lambda"


def test_an_initializer_spawn_cannot_pickle_says_what_to_do() -> None:
    with pytest.raises(Exception, match="pickle") as info:
        Pool(1, start_method="spawn", initializer=lambda: None)
    assert "module-level function" in "".join(getattr(info.value, "__notes__", []))


def test_a_given_backend_takes_no_initializer() -> None:
    with pytest.raises(ValueError, match="give it to the backend"):
        Pool(1, backend=FakeBackend(), initializer=helpers.init_state, initargs=("x",))


def test_failing_initializer_stops_the_pool_instead_of_respawning() -> None:
    pool = Pool(2, initializer=helpers.failing_init)
    try:
        with pytest.raises(InitializerError) as info:
            pool.submit(helpers.add, 1).result(timeout=30)
        assert "initializer says no" in str(info.value)
        with pytest.raises(InitializerError):
            pool.submit(helpers.add, 1)
    finally:
        pool.shutdown()


async def test_failing_initializer_fails_async_with() -> None:
    with pytest.raises(InitializerError, match="initializer says no"):
        async with Pool(1, initializer=helpers.failing_init):
            pass


def test_max_tasks_per_child_replaces_workers() -> None:
    with Pool(1, max_tasks_per_child=2) as pool:
        pids = [pool.submit(helpers.pid).result(timeout=30) for _ in range(6)]
    assert len(set(pids)) == 3
    assert pids[0] == pids[1] and pids[2] == pids[3]


def test_shutdown_cancel_futures_drops_queued_tasks() -> None:
    pool = Pool(1)
    pool.submit(helpers.add, 0).result(timeout=30)  # the worker is ready
    running = pool.submit(helpers.sleep_then, 0.5, "done")
    time.sleep(0.1)  # and has taken the task
    queued = [pool.submit(helpers.add, i) for i in range(5)]
    pool.shutdown(wait=True, cancel_futures=True)
    assert running.result() == "done"
    # Up to PREFETCH tasks may already sit in the worker's pipe (like
    # ProcessPoolExecutor's EXTRA_QUEUED_CALLS); those complete, the rest are dropped.
    kept = [f for f in queued if not f.cancelled()]
    assert len(kept) <= PREFETCH
    assert [f.result() for f in kept] == [helpers.add(i) for i in range(len(kept))]


def test_shutdown_waits_for_queued_work() -> None:
    pool = Pool(1)
    futures = [pool.submit(helpers.sleep_then, 0.05, i) for i in range(4)]
    pool.shutdown(wait=True)
    assert [f.result() for f in futures] == [0, 1, 2, 3]


def test_a_submit_racing_shutdown_from_another_thread_still_runs() -> None:
    # The submit passed its "not shut down" check, then shutdown() began on the loop
    # and retired the idle worker before the task reached the queue. The task must
    # still run (nothing lost) and shutdown(wait=True) must return.
    pool = Pool(1)
    pool.submit(helpers.add, 0).result(timeout=30)  # the worker is ready and idle
    gate = threading.Event()
    pool._engine._call(gate.wait, 30)  # hold the loop: what follows queues up behind it
    pool.shutdown(wait=False)  # shutdown begins first...
    late = pool.schedule(helpers.add, (41,), timeout=60)  # ...then the task (not direct)
    gate.set()
    assert late.result(timeout=30) == 42
    closer = threading.Thread(target=pool.shutdown, kwargs={"wait": True})
    closer.start()
    closer.join(timeout=30)
    assert not closer.is_alive(), "shutdown(wait=True) hung"


def test_submit_after_shutdown_raises(pool: Pool) -> None:
    pool.shutdown()
    with pytest.raises(PoolClosedError):
        pool.submit(helpers.add, 1)
    assert isinstance(PoolClosedError("x"), RuntimeError)  # like ProcessPoolExecutor


def test_stats_and_scoreboard(pool: Pool) -> None:
    for future in [pool.submit(helpers.add, i) for i in range(20)]:
        future.result(timeout=30)
    deadline = time.monotonic() + 30
    while pool.stats().starting and time.monotonic() < deadline:
        time.sleep(0.01)
    with pytest.raises(ValueError):
        pool.submit(helpers.raise_value_error, "x").result(timeout=30)
    stats = pool.stats()
    assert stats.workers == 2
    assert stats.completed == 20 and stats.failed == 1 and stats.crashed == 0
    assert stats.queued == 0 and stats.busy == 0 and stats.idle == 2
    assert stats.run_time.count == 21 and stats.run_time.p50 <= stats.run_time.max
    assert stats.wait_time.count == 21
    rows = [pool.scoreboard.read(i) for i in range(pool.scoreboard.rows)]
    assert {r.pid for r in rows} == set(pool.worker_pids())
    assert sum(r.tasks_total for r in rows) == 21
    assert {r.state for r in rows} == {RowState.READY}


def test_workers_run_at_lower_priority() -> None:
    with Pool(1, nice=3) as pool:
        assert pool.submit(helpers.niceness).result(timeout=30) == os.nice(0) + 3
    with Pool(1, nice=0) as pool:
        assert pool.submit(helpers.niceness).result(timeout=30) == os.nice(0)


def test_default_size_is_usable_cpus() -> None:
    with Pool() as pool:
        assert pool.settings.max_workers == len(os.sched_getaffinity(0))


def test_grows_under_load_and_shrinks_when_idle() -> None:
    with Pool(2, min_workers=0, idle_timeout=0.3) as pool:
        assert pool.worker_pids() == []
        pids = set(pool.map(helpers.sleep_pid, [0.2] * 4, chunksize=1))
        assert 1 <= len(pids) <= 2
        deadline = time.monotonic() + 10
        while pool.stats().workers and time.monotonic() < deadline:
            time.sleep(0.05)
        assert pool.stats().workers == 0
        assert not wait_gone(pids, timeout=5)
        assert pool.submit(helpers.add, 1).result(timeout=30) == 2


def test_forced_start_methods() -> None:
    for method in ("forkserver", "spawn"):
        with Pool(1, start_method=method) as pool:
            assert pool.submit(helpers.add, 2).result(timeout=60) == 3


def test_mp_context_forces_the_start_method() -> None:
    import multiprocessing

    with Pool(1, mp_context=multiprocessing.get_context("forkserver")) as pool:
        assert pool.submit(lambda: 5).result(timeout=60) == 5
        assert pool._engine._backend.start_method == "forkserver"  # type: ignore[attr-defined]


def test_fork_by_default_with_no_warning() -> None:
    script = textwrap.dedent(
        """
        from allcores.pool import Pool
        pool = Pool(1)
        print(pool._engine._backend.start_method)
        pool.shutdown()
        """
    )
    out = subprocess.run(
        [sys.executable, "-W", "error", "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert out.stdout.strip() == "fork"
    assert "fork" not in out.stderr.lower()


async def test_run_in_executor() -> None:
    loop = asyncio.get_running_loop()
    pool = Pool(2)
    try:
        results = await asyncio.gather(
            *(loop.run_in_executor(pool, helpers.square, i) for i in range(10))
        )
        assert results == [i * i for i in range(10)]
        assert pool._engine._private_thread is None  # the running loop reads the workers itself
    finally:
        await pool.aclose()


def test_executor_wait_and_as_completed(pool: Pool) -> None:
    futures = [pool.submit(helpers.sleep_then, 0.01 * (5 - i), i) for i in range(5)]
    done, _ = concurrent.futures.wait(futures, timeout=30)
    assert len(done) == 5
    assert sorted(f.result() for f in concurrent.futures.as_completed(futures)) == list(range(5))


def test_workers_are_children_until_shutdown(pool: Pool) -> None:
    pool.submit(helpers.add, 1).result(timeout=30)
    pids = pool.worker_pids()
    children = {p.pid for p in psutil.Process().children(recursive=True)}
    assert set(pids) <= children
    pool.shutdown()
    assert not wait_gone(pids)


def test_two_pools_shut_down_independently() -> None:
    """A worker of the second pool must not hold the first pool's channels open."""
    first, second = Pool(1), Pool(1)
    try:
        assert first.submit(helpers.add, 1).result(timeout=30) == 2
        assert second.submit(helpers.add, 2).result(timeout=30) == 3
        closer = threading.Thread(target=first.shutdown, daemon=True)
        closer.start()
        closer.join(30)
        assert not closer.is_alive()
        assert second.submit(helpers.add, 3).result(timeout=30) == 4
    finally:
        second.shutdown()
        first.shutdown()
