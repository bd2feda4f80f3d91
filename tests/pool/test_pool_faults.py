"""One task fails, never the pool: crashes, timeouts, cancellation, parent death."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from allcores.pool import Pool, TaskTimeoutError, WorkerCrashedError
from tests.pool import helpers
from tests.pool.conftest import wait_gone

pytestmark = pytest.mark.usefixtures("no_leftovers")


@pytest.mark.parametrize(
    ("crash", "exitcode"),
    [
        (helpers.exit_hard, 3),
        (helpers.kill_self, -signal.SIGKILL),
        (helpers.segfault, -signal.SIGSEGV),
    ],
)
def test_a_crash_fails_only_its_task(crash: object, exitcode: int) -> None:
    with Pool(2) as pool:
        others = [pool.submit(helpers.sleep_then, 0.05, i) for i in range(8)]
        crashed = pool.submit(crash)  # type: ignore[arg-type]
        more = [pool.submit(helpers.sleep_then, 0.01, i) for i in range(8, 12)]
        with pytest.raises(WorkerCrashedError) as info:
            crashed.result(timeout=60)
        assert [f.result(timeout=60) for f in others + more] == list(range(12))
        error = info.value
        assert error.exitcode == exitcode
        assert error.pid is not None and error.worker_id >= 1
        assert crash.__name__ in error.task  # type: ignore[attr-defined]
        assert error.pid not in pool.worker_pids()
        if exitcode < 0:
            assert error.signal_name == signal.Signals(-exitcode).name
            assert error.signal_name in str(error)
        stats = pool.stats()
        assert stats.crashed == 1 and stats.completed == 12
        assert pool.submit(helpers.add, 1).result(timeout=60) == 2
        assert pool.stats().workers == 2


def test_crash_while_others_run_in_the_other_worker() -> None:
    with Pool(2) as pool:
        long = pool.submit(helpers.sleep_then, 0.5, "long")
        time.sleep(0.1)
        with pytest.raises(WorkerCrashedError):
            pool.submit(helpers.exit_hard).result(timeout=60)
        assert long.result(timeout=60) == "long"


def test_timeout_kills_and_replaces_the_worker() -> None:
    with Pool(1) as pool:
        first = pool.submit(helpers.pid).result(timeout=30)
        slow = pool.schedule(helpers.sleep_pid, (30,), timeout=0.2)
        after = pool.submit(helpers.pid)
        with pytest.raises(TaskTimeoutError) as info:
            slow.result(timeout=30)
        assert isinstance(info.value, TimeoutError)
        assert info.value.limit == 0.2 and "replaced" in str(info.value)
        second = after.result(timeout=30)
        assert second != first
        assert not wait_gone([first], timeout=5)
        assert pool.stats().timed_out == 1


def test_default_task_timeout() -> None:
    with Pool(1, task_timeout=0.2) as pool:
        with pytest.raises(TaskTimeoutError):
            pool.submit(helpers.sleep_then, 30).result(timeout=30)
        assert pool.submit(helpers.add, 1).result(timeout=30) == 2


async def test_async_timeout() -> None:
    async with Pool(1) as pool:
        with pytest.raises(TaskTimeoutError):
            await pool.run(helpers.sleep_then, 30, timeout=0.2)
        assert await pool.run(helpers.add, 2) == 3


async def test_cancelling_await_kills_the_running_task() -> None:
    async with Pool(1) as pool:
        first = await pool.run(helpers.pid)
        task = asyncio.ensure_future(pool.run(helpers.sleep_pid, 30))
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await pool.run(helpers.pid) != first
        assert not wait_gone([first], timeout=5)


async def test_future_cancel_kills_the_running_task() -> None:
    async with Pool(1) as pool:
        first = await pool.run(helpers.pid)
        future = pool.submit_async(helpers.sleep_pid, 30)
        await asyncio.sleep(0.2)
        assert future.cancel()
        assert await pool.run(helpers.pid) != first
        assert pool.stats().cancelled == 1


async def test_cancelling_a_queued_task_only_drops_it() -> None:
    async with Pool(1) as pool:
        first = await pool.run(helpers.pid)
        running = pool.submit_async(helpers.sleep_pid, 0.3)
        queued = pool.submit_async(helpers.pid)
        await asyncio.sleep(0.05)
        queued.cancel()
        assert await running == first
        assert await pool.run(helpers.pid) == first  # the worker was not killed


async def test_cancelling_a_prefetched_task_only_drops_it() -> None:
    async with Pool(1) as pool:
        first = await pool.run(helpers.pid)
        for _ in range(20):  # short tasks seen: the pool now prefetches
            await pool.run(helpers.add, 1)
        running = pool.submit_async(helpers.sleep_pid, 0.3)
        prefetched = pool.submit_async(helpers.pid)
        await asyncio.sleep(0.05)
        prefetched.cancel()
        after = pool.submit_async(helpers.pid)
        assert await running == first
        assert await after == first
        assert pool.stats().cancelled == 1


def test_sigkill_of_the_parent_ends_the_workers(tmp_path: object) -> None:
    forkserver = "mp_context=multiprocessing.get_context('forkserver')"
    variants = [
        ("", "pass"),  # forked, no thread yet
        ("", "pool.submit(int).result()"),  # with the pool's loop thread
        # Started by the forkserver, which must not keep them alive (its "alive" fd):
        # a busy worker does not read its channel, only the parent-death signal ends it.
        (forkserver, "pool.submit(time.sleep, 60); time.sleep(0.5)"),
    ]
    for options, body in variants:
        script = textwrap.dedent(
            f"""
            import multiprocessing, sys, time
            from allcores.pool import Pool
            pool = Pool(2, {options})
            {body}
            pool.submit(int).result()
            print(" ".join(map(str, pool.worker_pids())), flush=True)
            time.sleep(60)
            """
        )
        parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        try:
            assert parent.stdout is not None
            pids = [int(p) for p in parent.stdout.readline().split()]
            assert len(pids) == 2
            os.kill(parent.pid, signal.SIGKILL)
            parent.wait(10)
            assert not wait_gone(pids, timeout=10)
        finally:
            if parent.poll() is None:
                parent.kill()
                parent.wait()
            if parent.stdout is not None:
                parent.stdout.close()


def test_exit_without_shutdown_leaves_nothing() -> None:
    script = textwrap.dedent(
        """
        import asyncio
        from allcores.pool import Pool
        sync_pool = Pool(2)
        print(sync_pool.submit(int, "5").result(), flush=True)
        async def main():
            pool = Pool(1)
            print(await pool.run(int, "6"), flush=True)
            return pool.worker_pids()
        pids = asyncio.run(main()) + sync_pool.worker_pids()
        print(" ".join(map(str, pids)), flush=True)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    lines = out.stdout.split("\n")
    assert lines[:2] == ["5", "6"]
    assert not wait_gone([int(p) for p in lines[2].split()], timeout=10)
    assert "Traceback" not in out.stderr, out.stderr
