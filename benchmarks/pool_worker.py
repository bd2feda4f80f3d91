"""Measure one workload on one pool, in this interpreter, and print one JSON line.

The harness (bench_pool.py) runs this script once per (pool, workload, repeat), with
the anchors' venv for ProcessPoolExecutor, loky, pebble and anyio, and the project venv
for allcores, so each side runs its own pinned packages. A fresh process per
measurement keeps one pool's leftovers (threads, children, caches) out of the next.

    python pool_worker.py --pool ppe --workload one_by_one --params '{"n_tasks": 20000}'

Output: {"pool", "workload", "value", "unit", "extra", "error"}; ``value`` is None when
the pool does not support the workload or it failed (``error`` says why).
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import importlib
import json
import multiprocessing
import statistics
import sys
import time
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from concurrent.futures import Future
from typing import Any

from bench_tasks import cpu_sum, echo, inc
from pool_floor import measure_floor

# Every pool gets the same number of workers; 2 matches this machine's 2 cores, and
# ``workers`` in --params changes it (a larger machine, when one is lent).
WORKERS = 2
# Tasks sent before timing starts, so every worker is up and every import is done.
WARMUP_TASKS = 20
# Serial and pool runs of the CPU batch alternate this many times (`measure_cpu_batch`).
CPU_BATCH_ROUNDS = 3

SYNC_WORKLOADS = {"one_by_one", "submit_all", "map_cs1", "map_cs100", "map_auto"}
ASYNC_WORKLOADS = {"asyncio64", "asyncio64_uvloop"}


class Adapter:
    """One pool behind the few operations the workloads need."""

    name = ""
    workloads: frozenset[str] = frozenset()

    # What the pool's code needs imported; `prepare` imports it before any timing, so
    # that start-up compares starting pools, and the import is reported on its own.
    modules: tuple[str, ...] = ()

    def prepare(self) -> float:
        """Import the pool's modules; milliseconds it took (0 when already imported)."""
        start = time.perf_counter()
        for name in self.modules:
            importlib.import_module(name)
        return (time.perf_counter() - start) * 1e3

    def create(self) -> Any:
        raise NotImplementedError

    def submit(self, pool: Any, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        raise NotImplementedError

    def map(
        self, pool: Any, fn: Callable[..., Any], items: Iterable[Any], chunk: int | None
    ) -> list[Any]:
        raise NotImplementedError

    def run(self, pool: Any, fn: Callable[..., Any], *args: Any) -> Awaitable[Any]:
        raise NotImplementedError

    def shutdown(self, pool: Any) -> None:
        raise NotImplementedError

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Any]:
        """A pool made inside the running event loop, shut down on exit."""
        pool = self.create()
        try:
            yield pool
        finally:
            self.shutdown(pool)


class ExecutorAdapter(Adapter):
    """Any concurrent.futures.Executor; asyncio goes through loop.run_in_executor."""

    def submit(self, pool: Any, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        future: Future[Any] = pool.submit(fn, *args)
        return future

    def map(
        self, pool: Any, fn: Callable[..., Any], items: Iterable[Any], chunk: int | None
    ) -> list[Any]:
        if chunk is None:
            return list(pool.map(fn, items))
        return list(pool.map(fn, items, chunksize=chunk))

    def run(self, pool: Any, fn: Callable[..., Any], *args: Any) -> Awaitable[Any]:
        return asyncio.get_running_loop().run_in_executor(pool, fn, *args)

    def shutdown(self, pool: Any) -> None:
        pool.shutdown(wait=True)


ALL_BUT_AUTO = frozenset(
    {"one_by_one", "submit_all", "map_cs1", "map_cs100", "cpu_batch", "startup", "payload"}
    | ASYNC_WORKLOADS
)


class PPEAdapter(ExecutorAdapter):
    name = "ppe"
    workloads = ALL_BUT_AUTO
    modules = ("concurrent.futures.process",)

    def create(self) -> Any:
        return concurrent.futures.ProcessPoolExecutor(
            WORKERS, mp_context=multiprocessing.get_context("fork")
        )


class LokyAdapter(ExecutorAdapter):
    name = "loky"
    workloads = ALL_BUT_AUTO
    modules = ("loky",)

    def create(self) -> Any:
        from loky import get_reusable_executor

        return get_reusable_executor(max_workers=WORKERS)


class PebbleAdapter(Adapter):
    """pebble.ProcessPool is not an Executor: schedule() returns a ProcessFuture."""

    name = "pebble"
    workloads = ALL_BUT_AUTO
    modules = ("pebble",)

    def create(self) -> Any:
        from pebble import ProcessPool

        return ProcessPool(max_workers=WORKERS)

    def submit(self, pool: Any, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        future: Future[Any] = pool.schedule(fn, args=args)
        return future

    def map(
        self, pool: Any, fn: Callable[..., Any], items: Iterable[Any], chunk: int | None
    ) -> list[Any]:
        return list(pool.map(fn, items, chunksize=chunk or 1).result())

    def run(self, pool: Any, fn: Callable[..., Any], *args: Any) -> Awaitable[Any]:
        return asyncio.wrap_future(pool.schedule(fn, args=args))

    def shutdown(self, pool: Any) -> None:
        pool.close()
        pool.join()


class AnyioAdapter(Adapter):
    """anyio.to_process.run_sync: asyncio only; the 'pool' is a 2-process limiter."""

    name = "anyio"
    workloads = frozenset({"cpu_batch", "startup", "payload"} | ASYNC_WORKLOADS)
    modules = ("anyio", "anyio.to_process")

    def create(self) -> Any:
        import anyio

        return anyio.CapacityLimiter(WORKERS)

    def run(self, pool: Any, fn: Callable[..., Any], *args: Any) -> Awaitable[Any]:
        from anyio import to_process

        result: Awaitable[Any] = to_process.run_sync(fn, *args, limiter=pool)
        return result

    def shutdown(self, pool: Any) -> None:
        """anyio's worker processes end with the event loop that started them."""


class AllcoresAdapter(ExecutorAdapter):
    name = "allcores"
    workloads = ALL_BUT_AUTO | {"map_auto"}
    # uvloop: a pool used from sync code imports it when it starts its event loop.
    modules = ("allcores.pool", "uvloop")

    def create(self) -> Any:
        from allcores.pool import Pool

        return Pool(max_workers=WORKERS)

    def run(self, pool: Any, fn: Callable[..., Any], *args: Any) -> Awaitable[Any]:
        result: Awaitable[Any] = pool.run(fn, *args)
        return result

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Any]:
        from allcores.pool import Pool

        async with Pool(max_workers=WORKERS) as pool:
            yield pool


ADAPTERS: dict[str, Adapter] = {
    a.name: a
    for a in (PPEAdapter(), LokyAdapter(), PebbleAdapter(), AnyioAdapter(), AllcoresAdapter())
}


def _warm_sync(adapter: Adapter, pool: Any) -> None:
    futures = [adapter.submit(pool, inc, i) for i in range(WARMUP_TASKS)]
    for future in futures:
        future.result()


def measure_sync(
    adapter: Adapter, workload: str, params: dict[str, Any]
) -> tuple[float, str, dict[str, Any]]:
    """Dispatch workloads: µs per task of ``inc`` over n_tasks tasks."""
    n = int(params["n_tasks"])
    pool = adapter.create()
    try:
        _warm_sync(adapter, pool)
        start = time.perf_counter()
        if workload == "one_by_one":
            for i in range(n):
                adapter.submit(pool, inc, i).result()
        elif workload == "submit_all":
            futures = [adapter.submit(pool, inc, i) for i in range(n)]
            for future in futures:
                future.result()
        else:
            chunk = {"map_cs1": 1, "map_cs100": 100, "map_auto": None}[workload]
            results = adapter.map(pool, inc, range(n), chunk)
            if len(results) != n or results[-1] != n:
                raise RuntimeError(f"map returned {len(results)} results, expected {n}")
        elapsed = time.perf_counter() - start
    finally:
        adapter.shutdown(pool)
    return elapsed / n * 1e6, "us/task", {"n_tasks": n}


async def _drive(adapter: Adapter, pool: Any, n: int, in_flight: int) -> None:
    """Run n tasks with at most ``in_flight`` awaiting at once (one lane per slot)."""
    numbers = iter(range(n))

    async def lane() -> None:
        for i in numbers:
            await adapter.run(pool, inc, i)

    await asyncio.gather(*(lane() for _ in range(in_flight)))


def measure_async(
    adapter: Adapter, workload: str, params: dict[str, Any]
) -> tuple[float, str, dict[str, Any]]:
    """asyncio, ``in_flight`` tasks awaiting at once: tasks per second."""
    n = int(params["n_async"])
    in_flight = int(params["in_flight"])

    async def main() -> float:
        async with adapter.running() as pool:
            await _drive(adapter, pool, 2 * in_flight, in_flight)
            start = time.perf_counter()
            await _drive(adapter, pool, n, in_flight)
            return time.perf_counter() - start

    elapsed = _run_loop(main(), uvloop=workload.endswith("uvloop"))
    return n / elapsed, "tasks/s", {"n_tasks": n, "in_flight": in_flight}


def _run_loop(coro: Any, uvloop: bool) -> float:
    if uvloop:
        import uvloop as uvloop_module

        with asyncio.Runner(loop_factory=uvloop_module.new_event_loop) as runner:
            result: float = runner.run(coro)
            return result
    return float(asyncio.run(coro))


async def _warm_anyio(adapter: Adapter, limiter: Any) -> None:
    """Start all of anyio's workers: it spawns one only when none is idle, so keep each busy."""
    await asyncio.gather(*(adapter.run(limiter, cpu_sum, 200_000) for _ in range(WORKERS)))


def measure_cpu_batch(
    adapter: Adapter, params: dict[str, Any]
) -> tuple[float, str, dict[str, Any]]:
    """CPU batch: serial time / pool time for the same items (default map, no chunksize).

    Serial and pool runs alternate CPU_BATCH_ROUNDS times in one process and the
    median of the paired ratios is the figure: on a shared VM one serial run alone
    swung by up to 1.8x between back-to-back runs (ratios of 2.5 on 2 cores), and
    a single pair measured that swing more than the pool.
    """
    items = [int(params["cpu_n"])] * int(params["cpu_count"])
    expected: list[int] = []  # the sums, from the first serial run
    serials: list[float] = []
    parallels: list[float] = []

    def run_serial() -> None:
        start = time.perf_counter()
        sums = [cpu_sum(item) for item in items]
        serials.append(time.perf_counter() - start)
        expected[:] = expected or sums

    if isinstance(adapter, AnyioAdapter):

        async def main() -> None:
            limiter = adapter.create()
            await _warm_anyio(adapter, limiter)
            for _ in range(CPU_BATCH_ROUNDS):
                run_serial()
                t0 = time.perf_counter()
                results = await asyncio.gather(*(adapter.run(limiter, cpu_sum, i) for i in items))
                parallels.append(time.perf_counter() - t0)
                if list(results) != expected:
                    raise RuntimeError("the CPU batch returned wrong sums")

        asyncio.run(main())
    else:
        pool = adapter.create()
        try:
            _warm_sync(adapter, pool)
            for _ in range(CPU_BATCH_ROUNDS):
                run_serial()
                t0 = time.perf_counter()
                results = adapter.map(pool, cpu_sum, items, None)
                parallels.append(time.perf_counter() - t0)
                if results != expected:
                    raise RuntimeError("the CPU batch returned wrong sums")
        finally:
            adapter.shutdown(pool)
    ratio = statistics.median(s / p for s, p in zip(serials, parallels, strict=True))
    serial, parallel = statistics.median(serials), statistics.median(parallels)
    return (
        ratio,
        "x serial",
        {"serial_s": serial, "pool_s": parallel, "items": len(items)},
    )


def measure_startup(adapter: Adapter, params: dict[str, Any]) -> tuple[float, str, dict[str, Any]]:
    """Create the pool and get the first result: median over ``startup_cycles`` cycles, ms.

    The pool's modules are imported first (``import_ms`` in extra), so that the first
    cycle times the first pool of a process, not the import.
    """
    import_ms = adapter.prepare()
    times: list[float] = []
    for _ in range(int(params["startup_cycles"])):
        if isinstance(adapter, AnyioAdapter):

            async def first() -> float:
                t0 = time.perf_counter()
                await adapter.run(adapter.create(), inc, 1)
                return time.perf_counter() - t0

            times.append(asyncio.run(first()))
            continue
        t0 = time.perf_counter()
        pool = adapter.create()
        adapter.submit(pool, inc, 1).result()
        times.append(time.perf_counter() - t0)
        adapter.shutdown(pool)
    return (
        statistics.median(times) * 1e3,
        "ms",
        {"cycles_ms": [t * 1e3 for t in times], "import_ms": import_ms},
    )


def measure_payload(adapter: Adapter, params: dict[str, Any]) -> tuple[float, str, dict[str, Any]]:
    """A ``payload_mib`` MiB bytes argument sent to a worker and returned: seconds."""
    size = int(float(params["payload_mib"]) * 1024 * 1024)
    data = bytes(size)
    if isinstance(adapter, AnyioAdapter):

        async def main() -> tuple[float, int]:
            limiter = adapter.create()
            await _warm_anyio(adapter, limiter)
            t0 = time.perf_counter()
            back = await adapter.run(limiter, echo, data)
            return time.perf_counter() - t0, len(back)

        elapsed, length = asyncio.run(main())
    else:
        pool = adapter.create()
        try:
            _warm_sync(adapter, pool)
            t0 = time.perf_counter()
            back = adapter.submit(pool, echo, data).result()
            elapsed = time.perf_counter() - t0
            length = len(back)
        finally:
            adapter.shutdown(pool)
    if length != size:
        raise RuntimeError(f"the payload came back with {length} bytes, expected {size}")
    return elapsed, "s", {"bytes": size}


def measure(pool_name: str, workload: str, params: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"pool": pool_name, "workload": workload, "value": None, "unit": None}
    if pool_name == FLOOR:
        return _measure_floor(out, workload, params)
    adapter = ADAPTERS[pool_name]
    if workload not in adapter.workloads:
        out["error"] = "not supported by this pool"
        return out
    try:
        if workload in SYNC_WORKLOADS:
            value, unit, extra = measure_sync(adapter, workload, params)
        elif workload in ASYNC_WORKLOADS:
            value, unit, extra = measure_async(adapter, workload, params)
        elif workload == "cpu_batch":
            value, unit, extra = measure_cpu_batch(adapter, params)
        elif workload == "startup":
            value, unit, extra = measure_startup(adapter, params)
        elif workload == "payload":
            value, unit, extra = measure_payload(adapter, params)
        else:
            raise ValueError(f"unknown workload {workload!r}")
    except Exception as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
        out["traceback"] = traceback.format_exc(limit=5)
        return out
    out.update(value=value, unit=unit, extra=extra, error=None)
    return out


# Not a pool: the bare socketpair + pickle ping-pong under one by one (pool_floor.py).
FLOOR = "floor"


def _measure_floor(out: dict[str, Any], workload: str, params: dict[str, Any]) -> dict[str, Any]:
    if workload != "one_by_one":
        out["error"] = "the floor is measured for one_by_one only"
        return out
    n = int(params["n_tasks"])
    try:
        value = measure_floor(n, WARMUP_TASKS)
    except Exception as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
        out["traceback"] = traceback.format_exc(limit=5)
        return out
    out.update(value=value, unit="us/round trip", extra={"n_tasks": n}, error=None)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pool", required=True, choices=sorted([*ADAPTERS, FLOOR]))
    parser.add_argument("--workload", required=True)
    parser.add_argument("--params", required=True, help="JSON object of workload sizes")
    args = parser.parse_args()
    params = json.loads(args.params)
    global WORKERS
    WORKERS = int(params.get("workers", WORKERS))
    result = measure(args.pool, args.workload, params)
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
