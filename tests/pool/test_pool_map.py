"""map / imap / imap_unordered: order, auto-chunking, laziness, errors, async forms."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest

from allcores.pool import Pool
from allcores.pool.chunking import MAX_CHUNKSIZE
from allcores.pool.map import MAP_INFLIGHT_PER_WORKER
from tests.pool import helpers

pytestmark = pytest.mark.usefixtures("no_leftovers")


def test_auto_chunking_gives_the_same_results_in_the_same_order(pool: Pool) -> None:
    items = list(range(20_000))
    expected = [x * x for x in items]
    assert list(pool.map(helpers.square, items)) == expected
    assert list(pool.map(helpers.square, iter(items))) == expected  # no length known
    assert list(pool.map(helpers.square, items, chunksize=1000)) == expected
    assert list(pool.imap(helpers.square, items)) == expected


def test_imap_unordered_yields_every_result(pool: Pool) -> None:
    items = range(5_000)
    assert sorted(pool.imap_unordered(helpers.square, items)) == [x * x for x in items]


def test_empty_input(pool: Pool) -> None:
    assert list(pool.map(helpers.square, [])) == []


def test_an_endless_generator_runs_in_bounded_memory(pool: Pool) -> None:
    consumed = 0

    def endless() -> itertools.count[int]:
        nonlocal consumed
        for i in itertools.count():
            consumed = i + 1
            yield i

    results = pool.imap(helpers.square, endless())
    taken = list(itertools.islice(results, 30_000))
    assert taken == [x * x for x in range(30_000)]
    bound = MAP_INFLIGHT_PER_WORKER * pool.settings.max_workers * MAX_CHUNKSIZE
    assert consumed - 30_000 <= bound
    results.close()


def test_an_error_raises_after_the_results_before_it(pool: Pool) -> None:
    seen = []
    with pytest.raises(ValueError, match="bad item 37"):
        for value in pool.map(helpers.fail_on, range(100), itertools.repeat(37)):
            seen.append(value)
    assert seen == list(range(37))


def test_map_timeout(pool: Pool) -> None:
    with pytest.raises(TimeoutError):
        list(pool.map(helpers.sleep_then, [1, 1], timeout=0.2))


async def test_async_for_and_await(pool: Pool) -> None:
    got = [x async for x in pool.imap(helpers.square, range(1000))]
    assert got == [x * x for x in range(1000)]
    assert await pool.map(helpers.square, range(10)) == [x * x for x in range(10)]
    unordered = [x async for x in pool.imap_unordered(helpers.square, range(500))]
    assert sorted(unordered) == [x * x for x in range(500)]


async def test_async_map_on_a_loop_bound_pool() -> None:
    async with Pool(2) as pool:
        assert await pool.map(helpers.add, range(2000)) == [x + 1 for x in range(2000)]
        with pytest.raises(RuntimeError, match="deadlock"):
            list(pool.map(helpers.add, range(10)))


def test_map_results_can_be_read_after_the_with_block() -> None:
    # ProcessPoolExecutor's map submits every input at once, so this common code
    # works there; a lazy map must send the rest of its inputs at shutdown.
    with Pool(2) as pool:
        squares = pool.map(helpers.square, range(3_000))
        first = next(squares)
        unordered = pool.imap_unordered(helpers.square, iter(range(500)), chunksize=7)
    assert [first, *squares] == [i * i for i in range(3_000)]
    assert sorted(unordered) == [i * i for i in range(500)]


def test_an_input_error_at_shutdown_comes_after_the_results_before_it() -> None:
    def inputs() -> Iterator[int]:
        yield from range(2_000)
        raise LookupError("the inputs broke")

    with Pool(2) as pool:
        results = pool.map(helpers.square, inputs())
    got = []
    with pytest.raises(LookupError, match="the inputs broke"):
        got.extend(results)
    assert got == [i * i for i in range(2_000)]


def test_a_with_block_that_fails_stops_its_maps() -> None:
    sent: list[int] = []

    def inputs() -> Iterator[int]:
        for i in range(1_000_000):
            sent.append(i)
            yield i

    with pytest.raises(KeyError), Pool(2) as pool:
        results = pool.map(helpers.square, inputs())
        assert next(results) == 0
        raise KeyError("the block failed")
    assert len(sent) < 1_000_000  # the rest was never read, nor sent
