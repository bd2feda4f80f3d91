"""asyncio first: run, async with, back-pressure, other loops, offload."""

from __future__ import annotations

import asyncio
import sys
import threading

import pytest

from allcores.pool import Pool, QueueFullError, get_default_pool, offload, set_default_pool
from tests.pool import helpers

pytestmark = pytest.mark.usefixtures("no_leftovers")


async def test_run_binds_to_the_running_loop() -> None:
    async with Pool(2) as pool:
        results = await asyncio.gather(*(pool.run(helpers.add, i, y=2) for i in range(200)))
        assert results == [i + 2 for i in range(200)]
        assert pool._engine._loop is asyncio.get_running_loop()
        assert pool._engine._private_thread is None


async def test_run_from_another_loop_is_bridged() -> None:
    async with Pool(1) as pool:
        answer: list[int] = []

        def other_thread() -> None:
            async def use() -> int:
                return await pool.run(helpers.add, 40, y=2)

            answer.append(asyncio.run(use()))

        thread = threading.Thread(target=other_thread)
        thread.start()
        await asyncio.get_running_loop().run_in_executor(None, thread.join)
        assert answer == [42]


async def test_queue_full_raises_and_wait_for_room_waits() -> None:
    async with Pool(1, max_queue=2) as pool:
        running = pool.submit_async(helpers.sleep_then, 0.3, "r")
        await asyncio.sleep(0.1)
        queued = [pool.submit_async(helpers.add, i) for i in range(2)]
        with pytest.raises(QueueFullError, match="max_queue=2"):
            pool.submit_async(helpers.add, 9)
        with pytest.raises(QueueFullError):
            pool.submit(helpers.add, 9)
        await pool.wait_for_room()
        late = pool.submit_async(helpers.add, 10)
        await pool.drain()
        assert pool.stats().queued == 0
        assert await running == "r"
        assert [await f for f in queued] == [1, 2]
        assert await late == 11


def test_wait_drained_sync() -> None:
    with Pool(1) as pool:
        futures = [pool.submit(helpers.sleep_then, 0.02, i) for i in range(5)]
        assert pool.wait_drained(timeout=30)
        assert [f.result(timeout=30) for f in futures] == list(range(5))


async def test_many_in_flight() -> None:
    async with Pool(2) as pool:
        semaphore = asyncio.Semaphore(64)

        async def one(i: int) -> int:
            async with semaphore:
                return await pool.run(helpers.add, i)

        assert await asyncio.gather(*(one(i) for i in range(3000))) == [i + 1 for i in range(3000)]


async def test_offload_uses_a_replaceable_default_pool() -> None:
    previous = set_default_pool(None)
    try:
        assert await offload(helpers.add, 1, y=2) == 3
        default = get_default_pool()
        mine = Pool(1)
        set_default_pool(mine)
        assert await offload(helpers.pid) in mine.worker_pids()
        await mine.aclose()
        await default.aclose()
    finally:
        set_default_pool(previous)


def test_offload_default_pool_survives_successive_event_loops() -> None:
    previous = set_default_pool(None)
    try:
        offload_module = sys.modules["allcores.pool.offload"]
        assert asyncio.run(offload(helpers.add, 1)) == 2
        first = offload_module._default
        assert asyncio.run(offload(helpers.add, 2)) == 3
        second = offload_module._default
        assert second is not first and first.closed
        second.shutdown()
    finally:
        set_default_pool(previous)
