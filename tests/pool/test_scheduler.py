"""The scheduler without processes: chunk sizing, prefetch, fairness, batching,
timeouts, cancel and crashes, driven through a fake backend (`fake_backend.py`)
whose workers answer inside the test's event loop with run times the test picks.

These pin behaviour that a process test cannot see on a noisy machine: a map that
fell back to one item a chunk, or a prefetch that stopped, would still pass there.
"""

from __future__ import annotations

import asyncio

import pytest

from allcores.pool import Pool, TaskTimeoutError, WorkerCrashedError
from allcores.pool import _protocol as proto
from allcores.pool.chunking import CHUNK_GROWTH, MAX_CHUNKSIZE, TARGET_CHUNK_SECONDS, ChunkSizer
from allcores.pool.scheduler import PREFETCH, PREFETCH_TINY
from allcores.pool.state import PREFETCH_MAX_RUN_TIME
from tests.pool import helpers
from tests.pool.fake_backend import FakeBackend

# ── the chunk sizer, pure ───────────────────────────────────────────────────────


def test_a_given_chunksize_never_changes() -> None:
    sizer = ChunkSizer(7, workers=2)
    sizer.learn(7, 0.000001)
    assert [sizer.next_size() for _ in range(3)] == [7, 7, 7]


def test_auto_chunks_grow_by_at_most_chunk_growth_towards_the_target() -> None:
    sizer = ChunkSizer(None, workers=2)
    assert sizer.next_size() == 1  # nothing measured yet
    sizes = []
    for _ in range(8):
        size = sizer.next_size()
        sizes.append(size)
        sizer.learn(size, size * 1e-6)  # 1 µs an item
    assert sizes[:4] == [1, CHUNK_GROWTH, CHUNK_GROWTH**2, CHUNK_GROWTH**3]
    assert sizes[-1] == int(TARGET_CHUNK_SECONDS / 1e-6)  # 5,000 items of 1 µs: 5 ms


def test_auto_chunks_stop_at_max_chunksize() -> None:
    sizer = ChunkSizer(None, workers=1)
    for _ in range(10):
        sizer.learn(sizer.next_size(), 1e-12)
    assert sizer.next_size() == MAX_CHUNKSIZE


def test_slow_items_go_one_by_one() -> None:
    sizer = ChunkSizer(None, workers=2)
    sizer.learn(1, 0.1)
    assert sizer.next_size() == 1


def test_a_known_length_leaves_four_chunks_per_worker() -> None:
    sizer = ChunkSizer(None, workers=2, items_hint=800)
    sizer.learn(1, 1e-9)
    assert sizer.next_size() <= 800 // 8
    sizer.cut(700)
    assert sizer.next_size() <= -(-100 // 8)


def test_a_bad_chunksize_uses_concurrent_futures_words() -> None:
    with pytest.raises(ValueError, match=r"^chunksize must be >= 1\.$"):
        ChunkSizer(0, workers=1)


# ── the scheduler, through a fake backend ───────────────────────────────────────


async def warm_up(pool: Pool, tasks: int = 40) -> None:
    """Run short tasks until the pool has learnt that its tasks are tiny."""
    await asyncio.gather(*(pool.run(helpers.add, i) for i in range(tasks)))


async def settle(rounds: int = 5) -> None:
    for _ in range(rounds):
        await asyncio.sleep(0)


async def test_map_without_chunksize_sends_few_large_chunks() -> None:
    backend = FakeBackend(seconds_per_item=1e-6)
    async with Pool(2, backend=backend) as pool:
        results = await pool.map(helpers.square, range(20_000))
    assert results == [i * i for i in range(20_000)]
    chunks = [
        items for w in backend.workers for kind, _id, items in w.received if kind == proto.CHUNK
    ]
    assert sum(chunks) == 20_000
    # One item a chunk would be 20,000 chunks; learning 1 µs an item reaches
    # thousands of items a chunk within a few chunks.
    assert len(chunks) < 100, chunks
    assert max(chunks) >= 1_000


async def test_map_of_slow_items_keeps_one_item_a_chunk() -> None:
    backend = FakeBackend(seconds_per_item=0.05)
    async with Pool(2, backend=backend) as pool:
        assert await pool.map(helpers.square, range(30)) == [i * i for i in range(30)]
    assert all(items == 1 for w in backend.workers for _k, _i, items in w.received)


async def test_long_tasks_are_not_prefetched() -> None:
    backend = FakeBackend(seconds_per_item=PREFETCH_MAX_RUN_TIME * 10)
    async with Pool(2, backend=backend) as pool:
        await warm_up(pool)
        backend.hold()
        futures = [pool.submit_async(helpers.add, i) for i in range(10)]
        await settle()
        assert [len(w.backlog) for w in backend.live()] == [1, 1]
        assert pool.stats().queued == 8
        backend.release()
        assert await asyncio.gather(*futures) == [i + 1 for i in range(10)]


async def test_tiny_tasks_are_prefetched_deep_and_evenly() -> None:
    backend = FakeBackend(seconds_per_item=1e-6)
    async with Pool(2, backend=backend) as pool:
        await warm_up(pool)
        backend.hold()
        futures = [pool.submit_async(helpers.add, i) for i in range(100)]
        await settle()
        held = [len(w.backlog) for w in backend.live()]
        # Each worker runs one and holds PREFETCH_TINY more; the rest stay queued.
        assert held == [PREFETCH_TINY + 1, PREFETCH_TINY + 1]
        assert pool.stats().queued == 100 - 2 * (PREFETCH_TINY + 1)
        backend.release()
        assert await asyncio.gather(*futures) == [i + 1 for i in range(100)]


async def test_short_tasks_are_prefetched_prefetch_deep() -> None:
    backend = FakeBackend(seconds_per_item=PREFETCH_MAX_RUN_TIME / 4)
    async with Pool(1, backend=backend) as pool:
        await warm_up(pool)
        backend.hold()
        futures = [pool.submit_async(helpers.add, i) for i in range(10)]
        await settle()
        assert [len(w.backlog) for w in backend.live()] == [PREFETCH + 1]
        backend.release()
        await asyncio.gather(*futures)


async def test_tasks_start_in_the_order_they_came() -> None:
    backend = FakeBackend(seconds_per_item=1e-6)
    async with Pool(3, backend=backend) as pool:
        await warm_up(pool, 10)
        first = max(task_id for w in backend.workers for _k, task_id, _n in w.received)
        await asyncio.gather(*(pool.run(helpers.add, i) for i in range(300)))
    for worker in backend.workers:
        ids = [task_id for _k, task_id, _n in worker.received if task_id > first]
        assert ids == sorted(ids)  # each worker gets its tasks in submit order
    spread = [sum(1 for _k, i, _n in w.received if i > first) for w in backend.workers]
    assert min(spread) > 0, spread  # and every worker gets some


async def test_tasks_dispatched_together_share_a_frame() -> None:
    backend = FakeBackend(seconds_per_item=1e-6)
    async with Pool(1, backend=backend) as pool:
        await warm_up(pool)
        worker = backend.live()[0]
        frames, tasks = worker.frames, len(worker.received)
        await asyncio.gather(*(pool.run(helpers.add, i) for i in range(200)))
        assert len(worker.received) - tasks == 200
        assert worker.frames - frames < 100  # batched, not one frame per task


async def test_a_timeout_kills_the_worker_and_a_new_one_takes_the_queue() -> None:
    backend = FakeBackend()
    async with Pool(1, backend=backend) as pool:
        backend.hold()
        stuck = pool.submit_async(helpers.add, 1, timeout=0.05)
        waiting = pool.submit_async(helpers.add, 2)
        with pytest.raises(TaskTimeoutError):
            await stuck
        await settle()
        assert len(backend.workers) == 2  # the first was killed, one replaced it
        backend.release()
        assert await waiting == 3
        assert pool.stats().timed_out == 1


async def test_cancelling_a_queued_task_never_sends_it() -> None:
    backend = FakeBackend(seconds_per_item=PREFETCH_MAX_RUN_TIME * 10)
    async with Pool(1, backend=backend) as pool:
        backend.hold()
        running = pool.submit_async(helpers.add, 1)
        queued = pool.submit_async(helpers.add, 2)
        await settle()
        queued.cancel()
        await settle()
        backend.release()
        assert await running == 2
    sent = [task_id for w in backend.workers for _k, task_id, _n in w.received]
    assert len(sent) == 1
    assert pool.stats().cancelled == 1


async def test_cancelling_a_prefetched_task_skips_it() -> None:
    backend = FakeBackend(seconds_per_item=1e-6)
    async with Pool(1, backend=backend) as pool:
        await warm_up(pool)
        backend.hold()
        running = pool.submit_async(helpers.add, 1)
        prefetched = pool.submit_async(helpers.add, 2)
        await settle()
        worker = backend.live()[0]
        assert len(worker.backlog) == 2
        prefetched.cancel()
        await settle()
        assert worker.skipped and len(worker.backlog) == 1
        backend.release()
        assert await running == 2


async def test_a_crash_fails_the_running_task_and_requeues_the_prefetched() -> None:
    backend = FakeBackend(seconds_per_item=1e-6)
    async with Pool(1, backend=backend) as pool:
        await warm_up(pool)
        backend.hold()
        futures = [pool.submit_async(helpers.add, i) for i in range(5)]
        await settle()
        backend.live()[0].crash()
        with pytest.raises(WorkerCrashedError):
            await futures[0]
        backend.release()
        assert await asyncio.gather(*futures[1:]) == [2, 3, 4, 5]
        assert pool.stats().crashed == 1


async def test_a_full_queue_raises_and_room_comes_back() -> None:
    backend = FakeBackend(seconds_per_item=PREFETCH_MAX_RUN_TIME * 10)
    async with Pool(1, backend=backend, max_queue=3) as pool:
        backend.hold()
        futures = [pool.submit_async(helpers.add, i) for i in range(4)]  # 1 runs, 3 wait
        with pytest.raises(Exception, match="max_queue=3"):
            pool.submit_async(helpers.add, 99)
        backend.release()
        await pool.wait_for_room()
        assert await asyncio.gather(*futures) == [1, 2, 3, 4]
