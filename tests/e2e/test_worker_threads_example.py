"""examples/worker_threads_server.py (the seed's main.js + worker-task.js), as a user runs it."""

from __future__ import annotations

import http.client
import os
import signal
import subprocess
import threading

import psutil

from tests.conftest import ROOT, Processes, free_port, wait_until
from tests.e2e.test_cluster_example import Output

EXAMPLE = ROOT / "examples" / "worker_threads_server.py"
PLAIN = (200, "Hello from Main Thread (non-CPU path)!\n")
FAILED = (500, "Error processing request.\n")
# A loop this long would take minutes: such a request can only end by its process's death.
ENDLESS = 10**10


def get(port: int, path: str) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read().decode()
    finally:
        conn.close()


def start(
    processes: Processes, cpu_n: int, *args: str
) -> tuple[subprocess.Popen[bytes], int, Output]:
    port = free_port()
    env = dict(os.environ, PORT=str(port), CPU_N=str(cpu_n))
    proc = processes.python(
        str(EXAMPLE), *args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    out = Output(proc)
    wait_until(lambda: out.matching(rf"Server listening on port {port}"), timeout=30)
    assert out.matching(rf"Main thread {proc.pid} is running")
    processes.remember_children(proc)  # the pool's processes
    return proc, port, out


def children(proc: subprocess.Popen[bytes]) -> set[int]:
    """Every descendant: a pool's processes are its zygote's children."""
    return {child.pid for child in psutil.Process(proc.pid).children(recursive=True)}


def in_background(port: int, path: str) -> tuple[threading.Thread, list[tuple[int, str]]]:
    answers: list[tuple[int, str]] = []
    thread = threading.Thread(target=lambda: answers.append(get(port, path)), daemon=True)
    thread.start()
    return thread, answers


def test_every_route_answers_the_seeds_texts(processes: Processes) -> None:
    _proc, port, _out = start(processes, 100_000)
    cpu = (200, f"Hello from Main Thread! Sum: {sum(range(100_000))}\n")
    assert get(port, "/") == PLAIN
    assert get(port, "/cpu") == cpu
    assert get(port, "/cpu-pool") == cpu
    assert get(port, "/other") == PLAIN


def test_the_loop_answers_while_a_worker_computes_and_a_dead_worker_is_a_500(
    processes: Processes,
) -> None:
    proc, port, out = start(processes, ENDLESS)
    pool_processes = children(proc)
    requester, answers = in_background(port, "/cpu")
    worker = wait_until(lambda: children(proc) - pool_processes).pop()
    processes.descendants.add(worker)

    assert get(port, "/") == PLAIN
    assert answers == []  # / was answered while /cpu was still computing

    os.kill(worker, signal.SIGKILL)
    requester.join(timeout=60)
    assert answers == [FAILED]
    wait_until(lambda: out.matching(r"Worker stopped with exit code -9"))
    assert get(port, "/") == PLAIN


def test_with_pool_flag_cpu_runs_in_the_pool_and_a_killed_pool_process_is_a_500(
    processes: Processes,
) -> None:
    proc, port, _out = start(processes, ENDLESS, "--pool")
    pool_processes = children(proc)
    assert pool_processes
    idle = {pid: psutil.Process(pid).cpu_times().user for pid in pool_processes}
    requester, answers = in_background(port, "/cpu")

    def computing() -> list[int]:
        # An idle pool process uses no CPU; the one running the loop soon has used 0.5 s.
        return [pid for pid, t in idle.items() if psutil.Process(pid).cpu_times().user > t + 0.5]

    busy = wait_until(computing, timeout=60)  # /cpu runs in a process the pool started
    assert get(port, "/") == PLAIN
    assert answers == []

    os.kill(busy[0], signal.SIGKILL)
    requester.join(timeout=60)
    assert answers == [FAILED]
    assert get(port, "/") == PLAIN
