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
    wait_until(lambda: out.matching(rf"Server listening on port {port}"))
    assert out.matching(rf"Main thread {proc.pid} is running")
    return proc, port, out


def test_cpu_is_computed_in_a_worker_and_plain_requests_are_answered(
    processes: Processes,
) -> None:
    _proc, port, _out = start(processes, 100_000)
    assert get(port, "/") == (200, "Hello from Main Thread (non-CPU path)!\n")
    assert get(port, "/cpu") == (200, f"Hello from Main Thread! Sum: {sum(range(100_000))}\n")
    assert get(port, "/other") == (200, "Hello from Main Thread (non-CPU path)!\n")


def test_the_loop_answers_while_a_worker_computes_and_a_dead_worker_is_a_500(
    processes: Processes,
) -> None:
    # A loop of 10**10 additions would take minutes: /cpu can only end by its worker's death.
    proc, port, out = start(processes, 10**10)
    slow: list[tuple[int, str]] = []
    requester = threading.Thread(target=lambda: slow.append(get(port, "/cpu")), daemon=True)
    requester.start()
    worker = wait_until(lambda: psutil.Process(proc.pid).children())[0]
    processes.descendants.add(worker.pid)

    assert get(port, "/") == (200, "Hello from Main Thread (non-CPU path)!\n")
    assert slow == []  # / was answered while /cpu was still computing

    os.kill(worker.pid, signal.SIGKILL)
    requester.join(timeout=60)
    assert slow == [(500, "Error processing request.\n")]
    wait_until(lambda: out.matching(r"Worker stopped with exit code -9"))
    assert get(port, "/") == (200, "Hello from Main Thread (non-CPU path)!\n")
