"""The CPU pool that every worker of `allcores serve` shares (`--pool`), end to end:
real servers, real requests, and the pool's processes looked at from outside."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import psutil

from tests.conftest import free_port, wait_until
from tests.server.conftest import ALLCORES, get


def _status(control: Path) -> dict:  # type: ignore[type-arg]
    done = subprocess.run(
        [ALLCORES, "status", "--json", "--control", str(control)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)  # type: ignore[no-any-return]


def _pool_pids(primary: int) -> set[int]:
    """The primary's pool processes, found by their process titles."""
    found = set()
    for child in psutil.Process(primary).children(recursive=True):
        try:
            if child.cmdline()[0].startswith("allcores: pool "):
                found.add(child.pid)
        except (psutil.Error, IndexError):
            pass
    return found


def test_offload_runs_in_one_niced_pool_for_the_whole_server(serve, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    control = tmp_path / "ctl.sock"
    admin = str(free_port())
    server = serve(
        "pool_app:app",
        "--workers",
        "2",
        "--pool",
        "2",
        "--pool-nice",
        "3",
        "--control",
        str(control),
        "--admin",
        admin,
    )
    workers = server.wait_ready(2)
    seen = set()
    for _ in range(40):
        status, body = get(server.port, "/offload?fn=whoami")
        assert status == 200, body
        pid, parent, nice, title = body.split(" ", 3)
        # Run by a process of the primary's, not of the worker that took the request.
        assert int(parent) == server.proc.pid
        assert int(pid) not in workers
        assert int(nice) == os.nice(0) + 3
        assert title.startswith("allcores: pool ") and title.endswith(" pool_app:app")
        seen.add(int(pid))
    pool = _pool_pids(server.proc.pid)
    assert len(pool) == 2 and seen <= pool, (seen, pool)
    report = _status(control)["pool"]
    assert report["size"] == 2 and {p["pid"] for p in report["processes"]} == pool
    assert report["tasks"] >= 40 and report["run_ms"]["p99"] is not None
    metrics = get(int(admin), "/metrics")[1]
    assert "allcores_pool_processes 2.0" in metrics
    assert "allcores_pool_run_seconds_bucket" in metrics


def test_a_crash_a_timeout_and_a_cancel_each_fail_one_task_and_are_replaced(  # type: ignore[no-untyped-def]
    serve, tmp_path: Path
) -> None:
    control = tmp_path / "ctl.sock"
    server = serve("pool_app:app", "--workers", "1", "--pool", "1", "--control", str(control))
    server.wait_ready(1)
    first = _pool_pids(server.proc.pid)

    status, body = get(server.port, "/offload?fn=crash")
    assert status == 500 and body.startswith("WorkerCrashedError: a pool process"), body
    second = wait_until(lambda: _pool_pids(server.proc.pid) - first)

    started = time.monotonic()
    status, body = get(server.port, "/offload?fn=sleep&s=30&timeout=0.5")
    assert status == 500 and body.startswith("TaskTimeoutError"), (body, server.output)
    assert time.monotonic() - started < 10
    third = wait_until(lambda: _pool_pids(server.proc.pid) - first - second)

    # asyncio.wait_for gives up: the running task's process dies with it.
    status, body = get(server.port, "/cancel?s=30&after=0.3")
    assert (status, body) == (200, "cancelled")
    wait_until(lambda: _pool_pids(server.proc.pid) - first - second - third)

    # An exception is the task's alone, with the pool process's traceback.
    status, body = get(server.port, "/offload?fn=raise")
    assert status == 500 and body.startswith("ValueError: raised in the pool process"), body
    assert "in fail_here" in body

    status, body = get(server.port, "/offload?fn=sleep&s=0.01")
    assert (status, body) == (200, "0.01")
    restarts = wait_until(lambda: (r := _status(control)["pool"]["restarts"]).get("cancel") and r)
    assert restarts == {"crash": 1, "timeout": 1, "cancel": 1}


def test_the_queue_is_bounded_and_says_so(serve) -> None:  # type: ignore[no-untyped-def]
    server = serve("pool_app:app", "--workers", "1", "--pool", "1", "--pool-queue", "2")
    server.wait_ready(1)
    # One runs, two wait, two more find the queue full.
    status, body = get(server.port, "/flood?n=5&s=0.5")
    assert (status, body) == (200, "3 2")


def test_sigterm_lets_an_offloaded_request_finish(serve, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    control = tmp_path / "ctl.sock"
    server = serve("pool_app:app", "--workers", "1", "--pool", "1", "--control", str(control))
    server.wait_ready(1)
    answers: list[tuple[int, str]] = []
    thread = threading.Thread(
        target=lambda: answers.append(get(server.port, "/offload?fn=sleep&s=1.5"))
    )
    thread.start()
    wait_until(lambda: _status(control)["pool"]["busy"] == 1)
    server.proc.send_signal(signal.SIGTERM)
    thread.join(30)
    assert answers == [(200, "1.5")]
    assert server.wait_exit() == 0


def test_preload_forks_the_pool_from_the_loaded_app_and_a_killed_primary_takes_it_down(  # type: ignore[no-untyped-def]
    serve,
) -> None:
    server = serve("pool_app:app", "--workers", "1", "--pool", "2", "--preload")
    server.wait_ready(1)
    status, body = get(server.port, "/offload?fn=whoami")
    assert status == 200, body
    zygote = psutil.Process(int(body.split()[1]))
    assert zygote.cmdline()[0] == "allcores: zygote pool_app:app"
    pool = wait_until(lambda: len(p := _pool_pids(server.proc.pid)) == 2 and p)
    server.proc.kill()
    server.proc.wait(10)
    wait_until(lambda: not [pid for pid in pool if psutil.pid_exists(pid)], timeout=5)


def test_pool_0_keeps_a_local_pool_per_worker(serve) -> None:  # type: ignore[no-untyped-def]
    server = serve("pool_app:app", "--workers", "1", "--pool", "0")
    (worker,) = server.wait_ready(1)
    assert not _pool_pids(server.proc.pid)
    status, body = get(server.port, "/offload?fn=whoami")
    assert status == 200, body
    # The worker's own pool: its zygote is the worker's child.
    assert psutil.Process(int(body.split()[1])).ppid() == worker
