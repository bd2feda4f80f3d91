"""asyncio, 64 in flight: a pool bound to the awaiting loop, one first used from sync code.

Both against ProcessPoolExecutor (fork) with run_in_executor, interleaved, 3 repeats,
median tasks/s. Run: ``.venv-3.11/bin/python benchmarks/bench_asyncio_after_sync.py``.
"""

import asyncio
import concurrent.futures as cf
import multiprocessing
import statistics
import time

import allcores

N = 5000


def inc(x):
    return x + 1


async def flight(run):
    sem = asyncio.Semaphore(64)

    async def one(i):
        async with sem:
            return await run(i)

    t = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(N)))
    return N / (time.perf_counter() - t)


def ppe():
    with cf.ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("fork")) as ex:
        ex.submit(inc, 1).result()

        async def main():
            loop = asyncio.get_running_loop()
            return await flight(lambda i: loop.run_in_executor(ex, inc, i))

        return asyncio.run(main())


def bound():
    async def main():
        async with allcores.Pool(2) as p:
            await p.run(inc, 1)
            return await flight(lambda i: p.run(inc, i))

    return asyncio.run(main())


def sync_first():
    with allcores.Pool(2) as p:
        p.submit(inc, 1).result()

        async def main():
            return await flight(lambda i: p.run(inc, i))

        return asyncio.run(main())


def main() -> None:
    rates: dict[str, list[float]] = {"ppe": [], "bound": [], "sync_first": []}
    for _ in range(3):
        for name, measure in (("ppe", ppe), ("bound", bound), ("sync_first", sync_first)):
            rates[name].append(measure())
    median = {name: statistics.median(values) for name, values in rates.items()}
    for name, rate in median.items():
        print(f"{name:10} {rate:8.0f} tasks/s  {rate / median['ppe']:.2f}x ProcessPoolExecutor")


if __name__ == "__main__":
    main()
