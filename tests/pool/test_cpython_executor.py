"""CPython's `concurrent.futures` executor tests, run against `allcores.Pool`.

The tests themselves are CPython's, copied into cpython_executor_cases.py. Here each
family is bound to `Pool` and a start method, and every test that does not pass as it
is says why, in one of two ways:

- an override marked "Adapted": Pool differs by design, and the override checks Pool's
  side of the same behaviour (the error a crashed task gets, say);
- `by_design(reason)`: the test reads ProcessPoolExecutor's internals, or pins
  behaviour Pool replaces on purpose; skipped.

Every other test passes as it is.

docs/pool.md ("CPython's executor tests") lists the differences by design.

Start methods: fork for every family; forkserver too where a family builds pools
(its server starts once per session, then a worker costs about what a fork does);
spawn only for the initializer tests, as a spawned pool of 5 costs ~0.7 s to start.
The failing initializer runs with fork only: under forkserver the test's own
multiprocessing Queue has named semaphores, which stay in /dev/shm until the test
case object goes, after this suite's leak check (it passes there otherwise).
The wait and as_completed families test `concurrent.futures.wait` over Pool's
futures, whose start method does not matter, and sleep for ~10 s: fork only.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import traceback
import unittest
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import BrokenExecutor
from pickle import PicklingError, UnpicklingError
from typing import Any

import pytest

from allcores.pool import Pool, RemoteTraceback, WorkerCrashedError
from tests.pool import cpython_executor_cases as cases
from tests.pool.conftest import wait_gone

pytestmark = pytest.mark.usefixtures("no_leftovers")


def by_design(reason: str) -> Callable[[Any], None]:
    """A CPython test that does not apply to Pool: skipped, saying why."""

    @unittest.skip(f"differs by design: {reason}")
    def test(self: Any) -> None:
        pass

    return test


def keep_pool_until_cleanup(case: unittest.TestCase, pool: Pool) -> None:
    """Shut *pool* down after the test if the test's own shutdown did not happen, by a
    weak reference, so that the test's drop of its last reference still counts."""
    ref = weakref.ref(pool)

    def shutdown() -> None:
        leftover = ref()
        if leftover is not None:
            leftover.shutdown(wait=True, cancel_futures=True)

    case.addCleanup(shutdown)


class PoolFork:
    executor_type = Pool
    ctx = "fork"


class PoolForkserver:
    executor_type = Pool
    ctx = "forkserver"


class PoolSpawn:
    executor_type = Pool
    ctx = "spawn"


# ── ExecutorTest + ProcessPoolExecutorTest ────────────────────────────────────


class PoolExecutorTest(cases.ProcessPoolExecutorTest, cases.ExecutorMixin):
    # Adapted: the worker's traceback comes as Pool's public RemoteTraceback
    # (CPython's is the private concurrent.futures.process._RemoteTraceback).
    remote_traceback_type = RemoteTraceback
    test_killed_child = by_design(
        "a killed worker fails only its task (WorkerCrashedError) and is replaced; "
        "the pool does not break (BrokenProcessPool); and it reads _processes"
    )
    test_saturation = by_design(
        "reads _processes and _max_workers; Pool starts all max_workers ahead "
        "(min_workers), and a multiprocessing Semaphore argument raises at submit"
    )
    test_idle_process_reuse_one = by_design(
        "reads _processes; Pool starts min_workers (default: all) ahead, not on demand"
    )
    test_idle_process_reuse_multiple = test_idle_process_reuse_one
    test_max_tasks_per_child_defaults_to_spawn_context = by_design(
        "reads _mp_context; Pool's default is fork while the process has one thread, "
        "else forkserver, with max_tasks_per_child too"
    )

    def test_max_tasks_per_child(self) -> None:
        # Adapted: Pool takes max_tasks_per_child with fork too (ProcessPoolExecutor
        # raises ValueError), and has no _processes: worker_pids() stands for it.
        executor = self.executor_type(1, mp_context=self.get_context(), max_tasks_per_child=3)
        self.addCleanup(executor.shutdown)
        original_pid = executor.submit(os.getpid).result()
        self.assertEqual(executor.submit(os.getpid).result(), original_pid)
        self.assertEqual(executor.worker_pids(), [original_pid])
        self.assertEqual(executor.submit(os.getpid).result(), original_pid)

        new_pid = executor.submit(os.getpid).result()
        self.assertNotEqual(original_pid, new_pid)
        self.assertEqual(executor.worker_pids(), [new_pid])

    def test_max_tasks_early_shutdown(self) -> None:
        # Adapted: also with fork (ProcessPoolExecutor refuses max_tasks_per_child there).
        executor = self.executor_type(3, mp_context=self.get_context(), max_tasks_per_child=1)
        futures = [executor.submit(cases.mul, i, i) for i in range(6)]
        executor.shutdown()
        for i, future in enumerate(futures):
            self.assertEqual(future.result(), cases.mul(i, i))


class PoolForkExecutorTest(PoolFork, PoolExecutorTest, cases.BaseTestCase):
    pass


class PoolForkserverExecutorTest(PoolForkserver, PoolExecutorTest, cases.BaseTestCase):
    pass


# ── ExecutorShutdownTest + ProcessPoolShutdownTest ────────────────────────────


class PoolShutdownTest(cases.ProcessPoolShutdownTest, cases.ExecutorMixin):
    # Adapted: Pool raises PoolClosedError (a RuntimeError) with its own words.
    after_shutdown_error = "PoolClosedError: cannot schedule new tasks after shutdown"

    test_processes_terminate = by_design(
        "reads _processes, and passes a multiprocessing Semaphore, which raises at "
        "submit in Pool (arguments are pickled in the caller)"
    )

    # CPython's next three build a ProcessPoolExecutor whatever the executor under
    # test and join its manager thread, processes and call queue. Adapted: they build
    # the executor under test, and its workers' pids stand for those internals.

    def test_context_manager_shutdown(self) -> None:
        with self.executor_type(max_workers=5, mp_context=self.get_context()) as e:
            pids = e.worker_pids()
            self.assertEqual(list(e.map(abs, range(-5, 5))), [5, 4, 3, 2, 1, 0, 1, 2, 3, 4])
        self.assertEqual(wait_gone(pids), set())

    def test_del_shutdown(self) -> None:
        executor = self.executor_type(max_workers=5, mp_context=self.get_context())
        keep_pool_until_cleanup(self, executor)
        res = executor.map(abs, range(-5, 5))
        pids = executor.worker_pids()
        executor_ref = weakref.ref(executor)
        del executor
        cases.support.gc_collect()
        # Checked first: a pool that outlived its last reference would never shut
        # down, and waiting for its workers would only time out.
        self.assertIsNone(executor_ref())
        self.assertEqual(wait_gone(pids), set())
        assert all(r == abs(v) for r, v in zip(res, range(-5, 5), strict=True))

    def test_shutdown_no_wait(self) -> None:
        executor = self.executor_type(max_workers=5, mp_context=self.get_context())
        res = executor.map(abs, range(-5, 5))
        pids = executor.worker_pids()
        executor.shutdown(wait=False)
        self.assertEqual(wait_gone(pids), set())
        assert all(r == abs(v) for r, v in zip(res, range(-5, 5), strict=True))


class PoolForkShutdownTest(PoolFork, PoolShutdownTest, cases.BaseTestCase):
    pass


class PoolForkserverShutdownTest(PoolForkserver, PoolShutdownTest, cases.BaseTestCase):
    pass


# ── WaitTests, AsCompletedTests ───────────────────────────────────────────────


class PoolForkWaitTest(PoolFork, cases.WaitTests, cases.ExecutorMixin, cases.BaseTestCase):
    pass


class PoolForkAsCompletedTest(
    PoolFork, cases.AsCompletedTests, cases.ExecutorMixin, cases.BaseTestCase
):
    pass


# ── ExecutorDeadlockTest ──────────────────────────────────────────────────────


class PoolDeadlockTest(cases.ExecutorDeadlockTest, cases.ExecutorMixin):
    # Where ProcessPoolExecutor breaks for good (BrokenProcessPool) because a worker
    # died or a task's frame could not be unpickled, Pool fails that one task with
    # what happened to it (WorkerCrashedError, or the unpickling's own exception) and
    # carries on: `_check_crash` checks that too. Adapted accordingly.

    def _fail_on_deadlock(self, executor: Pool) -> None:
        # Adapted: kills the workers by pid (CPython: terminates _processes).
        tb = "".join(traceback.format_stack())
        for pid in executor.worker_pids():
            os.kill(pid, signal.SIGKILL)
        executor.shutdown(wait=True)
        self.fail(f"Executor deadlock:\n\n{tb}")

    def _check_crash(
        self, error: type[BaseException], func: Any, *args: Any, ignore_stderr: bool = False
    ) -> None:
        self.executor.shutdown(wait=True)

        executor = self.executor_type(max_workers=2, mp_context=self.get_context())
        self.executor = executor  # shut down by tearDown
        res = executor.submit(func, *args)
        cm = cases.support.captured_stderr() if ignore_stderr else contextlib.nullcontext()
        try:
            with self.assertRaises(error), cm:
                res.result(timeout=self.TIMEOUT)
        except TimeoutError:
            self._fail_on_deadlock(executor)
        # Adapted: and the pool still runs tasks.
        self.assertEqual(executor.submit(pow, 2, 8).result(timeout=self.TIMEOUT), 256)

    def test_error_at_task_pickle(self) -> None:
        # Adapted: Pool pickles a task's arguments in submit(), which raises.
        self.executor.shutdown(wait=True)
        with self.executor_type(max_workers=2, mp_context=self.get_context()) as executor:
            self.executor = executor
            with self.assertRaises(PicklingError):
                executor.submit(id, cases.ErrorAtPickle())
            self.assertEqual(executor.submit(pow, 2, 8).result(timeout=self.TIMEOUT), 256)

    def test_exit_at_task_unpickle(self) -> None:
        self._check_crash(SystemExit, id, cases.ExitAtUnpickle())

    def test_error_at_task_unpickle(self) -> None:
        self.addCleanup(setattr, cases.sys, "stderr", sys.stderr)
        self._check_crash(UnpicklingError, id, cases.ErrorAtUnpickle())

    def test_crash_at_task_unpickle(self) -> None:
        self._check_crash(WorkerCrashedError, id, cases.CrashAtUnpickle())

    def test_crash_during_func_exec_on_worker(self) -> None:
        self._check_crash(WorkerCrashedError, cases._crash)

    def test_crash_during_result_pickle_on_worker(self) -> None:
        self._check_crash(WorkerCrashedError, cases._return_instance, cases.CrashAtPickle)

    def test_error_during_result_unpickle_in_result_handler(self) -> None:
        self.addCleanup(setattr, cases.sys, "stderr", sys.stderr)
        self._check_crash(
            UnpicklingError, cases._return_instance, cases.ErrorAtUnpickle, ignore_stderr=True
        )

    def test_exit_during_result_unpickle_in_result_handler(self) -> None:
        self._check_crash(SystemExit, cases._return_instance, cases.ExitAtUnpickle)

    def test_shutdown_deadlock(self) -> None:
        self.executor.shutdown(wait=True)
        with self.executor_type(max_workers=2, mp_context=self.get_context()) as executor:
            self.executor = executor
            f = executor.submit(cases._crash, delay=0.1)
            executor.shutdown(wait=True)
            with self.assertRaises(WorkerCrashedError):
                f.result()

    test_shutdown_deadlock_pickle = by_design(
        "reads _executor_manager_thread; the unpicklable argument raises at submit, "
        "which test_error_at_task_pickle checks"
    )

    def test_crash_big_data(self) -> None:
        self.executor.shutdown(wait=True)
        data = "a" * cases.support.PIPE_MAX_SIZE
        with self.executor_type(max_workers=2, mp_context=self.get_context()) as executor:
            self.executor = executor
            with self.assertRaises(WorkerCrashedError):
                list(executor.map(cases._crash_with_data, [data] * 10))


class PoolForkDeadlockTest(PoolFork, PoolDeadlockTest, cases.BaseTestCase):
    pass


class PoolForkserverDeadlockTest(PoolForkserver, PoolDeadlockTest, cases.BaseTestCase):
    pass


# ── InitializerMixin, FailingInitializerMixin ─────────────────────────────────


class PoolForkInitializerTest(PoolFork, cases.InitializerMixin, cases.BaseTestCase):
    pass


class PoolForkserverInitializerTest(PoolForkserver, cases.InitializerMixin, cases.BaseTestCase):
    pass


class PoolSpawnInitializerTest(PoolSpawn, cases.InitializerMixin, cases.BaseTestCase):
    pass


class PoolFailingInitializer(cases.FailingInitializerMixin):
    @contextlib.contextmanager
    def _assert_logged(self, msg: str) -> Iterator[None]:
        # Adapted: Pool does not log the initializer's exception (to the
        # concurrent.futures logger, in the worker); it is the __cause__ of the
        # InitializerError (a BrokenExecutor) that pending and later tasks get.
        yield
        broken = self.executor._engine._broken
        self.assertIsInstance(broken, BrokenExecutor)
        self.assertIn(msg, "".join(traceback.format_exception(broken)))


class PoolForkFailingInitializerTest(PoolFork, PoolFailingInitializer, cases.BaseTestCase):
    pass
