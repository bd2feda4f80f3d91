"""A pool among the processes a real program has: no main guard, later forks, a Worker.

Each test pins a hang a new user met: a script without ``if __name__ == "__main__":``
ran itself again in every replacement worker; ``shutdown()`` waited for any process
forked after the pool (which held the pool's socket ends); a `Worker` started beside
a pool kept ``aclose()`` waiting until it ended.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest

from allcores.pool import Pool
from allcores.worker import Worker
from tests.conftest import Processes, wait_until
from tests.pool import helpers
from tests.worker.worker_targets import sleep_forever

pytestmark = pytest.mark.usefixtures("no_leftovers")

# Long enough for a loaded CI machine; the hangs these tests pin waited forever.
HANG = 30.0

NO_GUARD = """\
import os, allcores
print("script body runs in", os.getpid(), flush=True)

def die(x):
    if x == 3:
        os._exit(1)
    return x

with allcores.Pool(2) as pool:
    futures = [pool.submit(die, i) for i in range(10)]
    print([type(f.exception()).__name__ if f.exception() else f.result() for f in futures])
with allcores.Pool(1, max_tasks_per_child=1) as pool:
    print(sorted(pool.map(abs, range(-3, 0))))
"""


def test_a_script_with_no_main_guard_runs_once(tmp_path) -> None:  # type: ignore[no-untyped-def]
    script = tmp_path / "no_guard.py"
    script.write_text(NO_GUARD)
    out = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=HANG, check=True
    )
    lines = out.stdout.splitlines()
    assert sum(line.startswith("script body runs in") for line in lines) == 1, out.stdout
    assert lines[1:] == [
        "[0, 1, 2, 'WorkerCrashedError', 4, 5, 6, 7, 8, 9]",
        "[1, 2, 3]",
    ]


SIGTERMED = """\
import os, sys, time, allcores

def crash():
    os._exit(1)

pool = allcores.Pool(2)
pool.submit(crash).exception()   # a replacement comes
print(pool.submit(os.getpid).result(), flush=True)
time.sleep(60)
"""


def test_sigterm_of_the_parent_leaves_no_process(processes: Processes) -> None:
    parent = processes.python("-c", SIGTERMED, stdout=subprocess.PIPE)
    assert parent.stdout is not None
    worker = int(parent.stdout.readline())
    # The zygote and two workers, one of them a replacement.
    everyone = wait_until(lambda: len(found := processes.remember_children(parent)) >= 3 and found)
    assert worker in everyone
    parent.send_signal(signal.SIGTERM)
    assert parent.wait(timeout=HANG) == -signal.SIGTERM

    def all_gone() -> bool:
        for pid in everyone:
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    return False
            except psutil.NoSuchProcess:
                pass
        return True

    wait_until(all_gone, timeout=HANG)


def _shutdown_in_a_thread(pool: Pool) -> threading.Thread:
    closer = threading.Thread(target=pool.shutdown, daemon=True)
    closer.start()
    closer.join(HANG)
    return closer


def test_shutdown_ends_while_a_process_forked_later_lives() -> None:
    pool = Pool(2)
    assert pool.submit(abs, -1).result(timeout=HANG) == 1
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child sleeps until the test kills it
        time.sleep(HANG)
        os._exit(0)
    try:
        closer = _shutdown_in_a_thread(pool)
        assert not closer.is_alive(), "shutdown() waited for the forked child"
        assert psutil.pid_exists(pid)  # the child still holds whatever it inherited
        assert pool.worker_pids() == []
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


def _open_files() -> set[str]:
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(FileNotFoundError):  # listdir's own fd, closed by now
            found.add(os.readlink(f"/proc/self/fd/{fd}"))
    return found


def test_the_forked_child_holds_none_of_the_pools_sockets() -> None:
    with Pool(1) as pool:
        pool.submit(abs, -1).result(timeout=HANG)
        sockets = {link for link in _open_files() if link.startswith("socket:")}
        reader, writer = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - reports its sockets, then exits
            os.close(reader)
            os.write(writer, repr(sorted(_open_files() & sockets)).encode())
            os._exit(0)
        os.close(writer)
        with os.fdopen(reader) as pipe:
            inherited = pipe.read()
        os.waitpid(pid, 0)
    assert inherited == "[]"


def test_shutdown_ends_beside_a_process_pool_executor_started_later() -> None:
    pool = Pool(1)
    pool.submit(abs, -1).result(timeout=HANG)
    context = multiprocessing.get_context("fork")
    executor = concurrent.futures.ProcessPoolExecutor(1, mp_context=context)
    try:
        assert executor.submit(abs, -2).result(timeout=HANG) == 2
        # The pool first, then the executor: the order that deadlocked.
        closer = _shutdown_in_a_thread(pool)
        assert not closer.is_alive(), "shutdown() waited for the executor's worker"
    finally:
        executor.shutdown(wait=True)


def test_shutdown_ends_beside_a_multiprocessing_process_started_later() -> None:
    pool = Pool(1)
    pool.submit(abs, -1).result(timeout=HANG)
    child = multiprocessing.get_context("fork").Process(target=time.sleep, args=(HANG,))
    child.start()
    try:
        closer = _shutdown_in_a_thread(pool)
        assert not closer.is_alive(), "shutdown() waited for the multiprocessing child"
        assert child.is_alive()
    finally:
        child.kill()
        child.join()


async def test_aclose_ends_while_a_worker_started_beside_the_pool_lives() -> None:
    pool = Pool(1)
    assert await pool.run(helpers.add, 1) == 2
    worker = Worker(sleep_forever)
    try:
        await asyncio.wait_for(pool.aclose(), HANG)
        assert worker.exit_code is None  # still running
    finally:
        worker.terminate()
        assert await asyncio.wait_for(worker.wait_exit(), HANG) == -signal.SIGKILL
