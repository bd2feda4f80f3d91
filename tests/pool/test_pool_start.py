"""Start-up: the first task of a pool goes to a worker still starting, and workers
forked by the pool's zygote look like multiprocessing children."""

from __future__ import annotations

import concurrent.futures
import errno
import json
import multiprocessing.popen_fork
import os
import subprocess
import sys
import textwrap
import time

import pytest

from allcores.pool import InitializerError, Pool, WorkerCrashedError
from tests.pool import helpers

pytestmark = pytest.mark.usefixtures("no_leftovers")


def test_the_first_task_goes_to_a_starting_worker_and_the_pool_goes_on() -> None:
    with Pool(1) as pool:
        assert pool.submit(helpers.add, 1).result(timeout=30) == 2
        assert pool._engine._direct_sent == 1  # sent before READY, read by this thread
        # READY reached the loop: the worker takes the next tasks as any other.
        assert [pool.submit(helpers.add, i).result(timeout=30) for i in range(5)] == [
            1,
            2,
            3,
            4,
            5,
        ]
        stats = pool.stats()
        assert stats.workers == 1 and stats.completed == 6


def test_a_first_task_nobody_reads_completes() -> None:
    """Waited on by `concurrent.futures.wait` (no result()): the loop takes it over."""
    with Pool(1) as pool:
        first = pool.submit(helpers.add, 41)
        done, _ = concurrent.futures.wait([first], timeout=30)
        assert done == {first}
        assert first.result() == 42


def test_a_first_task_with_a_done_callback_completes() -> None:
    with Pool(1) as pool:
        seen: list[int] = []
        first = pool.submit(helpers.add, 1)
        first.add_done_callback(lambda f: seen.append(f.result()))
        concurrent.futures.wait([first], timeout=30)
        assert first.result(timeout=30) == 2
    assert seen == [2]


def test_shutdown_right_after_the_first_submit_still_runs_it() -> None:
    pool = Pool(1)
    first = pool.submit(helpers.add, 1)
    pool.shutdown(wait=True)
    assert first.result(timeout=0) == 2


def test_a_worker_crashing_in_the_first_task_fails_only_that_task() -> None:
    with Pool(1) as pool:
        with pytest.raises(WorkerCrashedError):
            pool.submit(helpers.exit_hard, 7).result(timeout=30)
        assert pool.submit(helpers.add, 1).result(timeout=30) == 2


def test_a_worker_dying_before_ready_never_ran_its_early_task() -> None:
    """It died before READY, so it never ran the task sent to it early: the task
    waits for the next worker, and since no worker ever started, the pool stops
    with its start error rather than a crash of the task's own. In a fresh process
    whose workers die in `_setup` (before READY, with no initializer)."""
    script = textwrap.dedent(
        """
        import os
        from allcores.pool import InitializerError, Pool, _protocol
        from tests.pool import helpers
        _protocol._setup = lambda endpoint: os._exit(3)  # the workers inherit it
        pool = Pool(1)
        try:
            pool.submit(helpers.add, 1).result(timeout=30)
        except InitializerError as exc:
            print("InitializerError", pool._engine._direct_sent, exc)
        finally:
            pool.shutdown()
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.startswith("InitializerError 1 "), out.stdout + out.stderr
    assert "cannot start" in out.stdout


def test_with_an_initializer_the_first_task_waits_for_a_ready_worker() -> None:
    """An initializer may be slow: the first task goes to whichever worker is
    READY first, not early to one of them."""
    with Pool(2, initializer=helpers.init_state, initargs=("ready",)) as pool:
        assert pool.submit(helpers.read_state).result(timeout=30) == "ready"
        assert pool._engine._direct_sent == 0


def test_a_worker_dying_in_its_initializer_stops_the_pool() -> None:
    pool = Pool(1, initializer=helpers.exit_in_init)
    try:
        with pytest.raises(InitializerError, match="cannot start"):
            pool.submit(helpers.add, 1).result(timeout=30)
    finally:
        pool.shutdown()


def test_max_tasks_per_child_counts_the_first_task() -> None:
    """READY of a worker whose first (early) task was its last retires it."""
    with Pool(1, max_tasks_per_child=1) as pool:
        pids = [pool.submit(helpers.pid).result(timeout=30) for _ in range(4)]
    assert len(set(pids)) == 4


def test_a_forked_worker_looks_like_a_multiprocessing_child() -> None:
    # In a fresh process, to know every process it has.
    script = textwrap.dedent(
        """
        import json, os
        from allcores.pool import Pool
        from tests.pool import helpers
        with Pool(1) as pool:
            seen = pool.submit(helpers.identity_in_worker).result(timeout=30)
            seen["worker_pid"] = pool.worker_pids()[0]
            seen["method"] = pool._engine._backend.start_method
            seen["zygote"] = pool._engine._backend._zygote.pid
        seen["parent"] = os.getpid()
        print(json.dumps(seen))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    seen = json.loads(out.stdout)
    assert seen["method"] == "fork"
    assert seen["name"].startswith("allcores-pool-")
    assert seen["pid"] == seen["worker_pid"]
    # Its parent is the pool's zygote, a child of the pool's process.
    assert seen["parent_pid"] == seen["zygote"] != seen["parent"]
    assert seen["stdin_line"] is None  # EOF: never the parent's terminal
    assert seen["fd0"] == os.devnull


def test_output_buffered_before_the_fork_is_written_once() -> None:
    script = textwrap.dedent(
        """
        import sys
        from allcores.pool import Pool
        sys.stdout.write("before")  # buffered: stdout is a pipe
        with Pool(1) as pool:
            pool.submit(print, "").result(timeout=30)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.count("before") == 1


def test_the_loop_thread_leaves_no_dummy_thread_behind() -> None:
    """The loop's thread is started by `_thread`; a worker it starts through
    run_in_executor (forkserver) made `threading` register it as a _DummyThread,
    which before 3.13 stayed in threading.enumerate() after the pool ended."""
    script = textwrap.dedent(
        """
        import threading, time
        from allcores.pool import Pool
        from tests.pool import helpers
        pool = Pool(1, start_method="forkserver")
        pool.submit(int, 1).result(timeout=30)
        # A crash: its replacement starts off the loop. Not os._exit itself, which
        # coverage's "_exit" patch (./dev cover) makes a closure that does not pickle.
        pool.submit(helpers.exit_hard, 3)
        assert pool.submit(int, 2).result(timeout=30) == 2
        pool.shutdown()
        deadline = time.monotonic() + 10  # the executor's thread ends on its own
        while threading.active_count() > 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        print(sorted(t.name for t in threading.enumerate()))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.strip() == "['MainThread']", out.stdout + out.stderr


def test_workers_the_zygote_cannot_fork_stop_the_pool_with_the_reason_logged(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Spawns do not wait for the fork: a fork that fails ends the worker during its
    start, as a worker dying before READY does, and the log says why."""

    def no_fork(self: object, process_obj: object) -> None:
        raise OSError(errno.EAGAIN, os.strerror(errno.EAGAIN))

    monkeypatch.setattr(multiprocessing.popen_fork.Popen, "_launch", no_fork)
    pool = Pool(2)  # its zygote is forked with the patch
    monkeypatch.undo()
    try:
        assert pool.worker_pids() == []  # no pid for a worker never forked
        with pytest.raises(InitializerError, match="cannot start"):
            pool.submit(helpers.add, 1).result(timeout=30)
    finally:
        pool.shutdown()
    assert "the zygote could not fork allcores-pool-1: BlockingIOError: [Errno 11]" in caplog.text


def test_a_worker_killed_before_its_pid_is_read_is_replaced() -> None:
    with Pool(2) as pool:
        assert pool.submit(helpers.add, 1).result(timeout=30) == 2
        worker = pool._engine._workers[max(pool._engine._workers)]
        handle = worker.handle
        assert handle is not None and not handle._child._spawned._answered  # type: ignore[attr-defined]
        pool._engine._call(pool._engine._kill, worker)  # killed by its spawn number
        deadline = time.monotonic() + 30
        while worker.id in pool._engine._workers and time.monotonic() < deadline:
            time.sleep(0.01)
        assert worker.id not in pool._engine._workers
        assert [pool.submit(helpers.add, i).result(timeout=30) for i in range(4)] == [1, 2, 3, 4]
        assert handle.pid is not None and handle.pid not in pool.worker_pids()
        # The replacement is started by the loop's thread while this one goes on:
        # it may not be listed yet (worker_pids lists workers with a handle).
        while len(pool.worker_pids()) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(pool.worker_pids()) == 2
