"""Worker: Node's worker_threads Worker as one process that exchanges messages."""

from __future__ import annotations

import asyncio
import gc
import multiprocessing.forkserver
import multiprocessing.resource_tracker
import os
import queue
import subprocess
import threading
import weakref
from typing import Any

import psutil
import pytest

from allcores.shm import SharedArray
from allcores.worker import RemoteTraceback, Worker, WorkerProcessError
from tests.conftest import Processes, wait_until
from tests.worker.worker_targets import (
    echo_until_stop,
    exit_with,
    fail,
    fill_array,
    post_from_grandchild,
    receive_and_double,
    sleep_forever,
    sum_to,
)


async def test_the_seed_pattern_reads_naturally() -> None:
    exited: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    events: list[tuple[str, Any]] = []

    worker = Worker(sum_to, worker_data={"num": 1000})
    worker.on("online", lambda: events.append(("online", None)))
    worker.on("message", lambda result: events.append(("message", result)))
    worker.on("error", lambda err: events.append(("error", err)))

    @worker.on("exit")
    def on_exit(code: int) -> None:
        events.append(("exit", code))
        exited.set_result(None)

    await exited
    assert events == [("online", None), ("message", sum(range(1000))), ("exit", 0)]
    assert worker.exit_code == 0


async def test_messages_round_trip_both_ways() -> None:
    worker = Worker(echo_until_stop)
    sent = [1, {"nested": [1.5, "two", None]}, "stop"]
    for message in sent:
        worker.post_message(message)
    replies = [reply async for reply in worker]
    assert replies == [("echo", message, worker.pid) for message in sent]
    assert worker.exit_code == 0


async def test_the_worker_can_block_on_receive() -> None:
    worker = Worker(receive_and_double)
    for number in (1, 2, 3, None):
        worker.post_message(number)
    assert [await worker.wait_message() for _ in range(3)] == [2, 4, 6]
    assert await worker.wait_exit() == 0


async def test_an_exception_in_the_worker_is_an_error_event_with_its_traceback() -> None:
    events: list[tuple[str, Any]] = []
    worker = Worker(fail, worker_data="x")
    worker.on("message", lambda message: events.append(("message", message)))
    worker.on("error", lambda err: events.append(("error", err)))
    worker.on("exit", lambda code: events.append(("exit", code)))
    assert await worker.wait_exit() == 1

    assert [kind for kind, _ in events] == ["message", "error", "exit"]
    error = events[1][1]
    assert isinstance(error, ValueError) and str(error) == "bad input: x"
    assert isinstance(error.__cause__, RemoteTraceback)
    assert "in fail" in str(error.__cause__)
    assert 'raise ValueError(f"bad input: {worker_data}")' in str(error.__cause__)


async def test_awaiting_a_failed_worker_raises_its_exception() -> None:
    worker = Worker(fail, worker_data="y")
    assert await worker.wait_message() == "about to fail"
    with pytest.raises(ValueError, match="bad input: y"):
        await worker.wait_message()
    with pytest.raises(ValueError, match="bad input: y"):
        [message async for message in worker]
    assert await worker.wait_exit() == 1


async def test_sys_exit_sets_the_exit_code_without_an_error() -> None:
    errors: list[BaseException] = []
    worker = Worker(exit_with, worker_data=3)
    worker.on("error", errors.append)
    with pytest.raises(WorkerProcessError, match="exited with code 3") as raised:
        await worker.wait_message()
    assert raised.value.exit_code == 3
    assert await worker.wait_exit() == 3
    assert errors == []


async def test_terminate_kills_the_worker_and_reports_the_signal() -> None:
    worker = Worker(sleep_forever)
    pid = await worker.wait_message()
    assert pid == worker.pid
    worker.terminate()
    assert await worker.wait_exit() == -9
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    worker.terminate()  # once exited, a no-op


async def test_shared_arrays_in_worker_data_and_messages_are_shared_not_copied() -> None:
    given, posted = SharedArray(3, "int64"), SharedArray(2, "float64")
    try:
        worker = Worker(fill_array, worker_data=given)
        assert await worker.wait_message() == "filled"
        assert given.numpy().tolist() == [7, 7, 7]
        posted.numpy()[:] = 0.5
        worker.post_message(posted)
        echoed = await worker.wait_message()
        echoed.numpy()[0] = 10
        assert posted.numpy().tolist() == [10.0, 1.5]
        echoed.close()
        assert await worker.wait_exit() == 0
    finally:
        given.close()
        posted.close()


async def test_lambdas_and_import_paths_are_targets() -> None:
    doubled = Worker(lambda port, data: port.post_message(data * 2), worker_data=21)
    by_path = Worker("tests.worker.worker_targets:sum_to", worker_data={"num": 5})
    assert await doubled.wait_message() == 42
    assert await by_path.wait_message() == 10
    assert (await doubled.wait_exit(), await by_path.wait_exit()) == (0, 0)


async def test_a_target_that_cannot_be_imported_is_an_error_event() -> None:
    worker = Worker("tests.pool.no_such_module:f")
    with pytest.raises(ModuleNotFoundError, match="no_such_module"):
        await worker.wait_message()
    assert await worker.wait_exit() == 1


async def test_bad_input_is_refused_with_what_to_do() -> None:
    with pytest.raises(WorkerProcessError, match="worker_data cannot be pickled"):
        Worker(sum_to, worker_data=threading.Lock())
    with pytest.raises(WorkerProcessError, match=r"'package\.module:function'"):
        Worker("sum_to")
    with pytest.raises(WorkerProcessError, match="a function or 'module:function'"):
        Worker(42)  # type: ignore[arg-type]
    worker = Worker(receive_and_double)
    with pytest.raises(WorkerProcessError, match="message cannot be pickled"):
        worker.post_message(lambda: None)
    with pytest.raises(WorkerProcessError, match="no 'close' event"):
        worker.on("close", print)  # type: ignore[arg-type]
    with pytest.raises(WorkerProcessError, match="wait_exit"):
        worker.join()
    worker.post_message(None)
    assert await worker.wait_exit() == 0


async def test_exit_waits_for_messages_still_on_their_way() -> None:
    # The worker has exited (its exit code is known) while a grandchild it forked
    # still holds its end of the channel and posts after that: wait_message() still
    # waits, and wait_exit() returns only once every message was delivered.
    worker = Worker(post_from_grandchild, worker_data=0.5)
    for _ in range(1_000):  # until the exit code is known: the grandchild still waits
        if "exited" in repr(worker):
            break
        await asyncio.sleep(0.005)
    assert await worker.wait_message() == "late"
    assert await worker.wait_exit() == 0
    with pytest.raises(WorkerProcessError, match="exited with code 0 before sending a message"):
        await worker.wait_message()


def _process_wide_fds() -> set[str]:
    """multiprocessing's forkserver and resource tracker pipes: opened by the first
    start through the forkserver (when another thread runs meanwhile), open for the
    life of the process."""
    fds = (
        getattr(multiprocessing.forkserver._forkserver, "_forkserver_alive_fd", None),
        getattr(multiprocessing.resource_tracker._resource_tracker, "_fd", None),
    )
    return {str(fd) for fd in fds if fd is not None}


async def test_a_finished_worker_leaves_no_fd_and_no_reference_behind() -> None:
    fds_before = set(os.listdir("/proc/self/fd"))
    finished = []
    for n in range(5):
        worker = Worker(sum_to, worker_data={"num": n})
        assert await worker.wait_message() == sum(range(n))
        assert await worker.wait_exit() == 0
        finished.append(weakref.ref(worker))
    del worker
    gc.collect()
    assert [ref() for ref in finished] == [None] * 5
    extra = set(os.listdir("/proc/self/fd")) - _process_wide_fds() - fds_before
    assert not extra, {fd: _fd_target(fd) for fd in extra}


def _fd_target(fd: str) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return "(closed meanwhile)"


def test_without_an_event_loop_callbacks_run_on_the_worker_event_thread() -> None:
    received: queue.Queue[tuple[Any, str]] = queue.Queue()
    worker = Worker(sum_to, worker_data={"num": 100})
    worker.on("message", lambda m: received.put((m, threading.current_thread().name)))
    assert worker.join(timeout=60) == 0
    assert received.get(timeout=10) == (4950, "allcores-worker-events")


PARENT = """
import asyncio, sys, threading, time
if sys.argv[1] == "threaded":  # a second thread: the Worker starts through forkserver
    threading.Thread(target=time.sleep, args=(1000,), daemon=True).start()
from allcores.worker import Worker

async def main():
    worker = Worker("tests.worker.worker_targets:sleep_forever")
    print(await worker.wait_message(), flush=True)
    await asyncio.sleep(1000)

if sys.argv[1] == "no-loop":  # forked before the private event thread starts
    worker = Worker("tests.worker.worker_targets:sleep_forever")
    worker.on("message", lambda pid: print(pid, flush=True))
    worker.join()
else:
    asyncio.run(main())
"""


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.parametrize("mode", ["single-threaded", "threaded", "no-loop"])
def test_sigkill_of_the_parent_leaves_no_worker(processes: Processes, mode: str) -> None:
    parent = processes.python("-c", PARENT, mode, stdout=subprocess.PIPE)
    assert parent.stdout is not None
    worker_pid = int(parent.stdout.readline())
    helpers = processes.remember_children(parent)
    processes.descendants.add(worker_pid)
    # Forked by the parent itself, threads or not: never by a forkserver.
    assert psutil.Process(worker_pid).ppid() == parent.pid

    parent.kill()
    assert parent.wait() == -9
    wait_until(lambda: all(_gone(pid) for pid in helpers | {worker_pid}), timeout=20)
