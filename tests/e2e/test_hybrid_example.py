"""examples/hybrid_server.py: a cluster whose workers offload /cpu to their own pools."""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path

import psutil

from tests.cluster.conftest import http_get
from tests.conftest import ROOT, Processes, free_port, wait_until
from tests.e2e.test_cluster_example import start


def _tree(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def test_hybrid_server_offloads_cpu_and_leaves_nothing(processes: Processes) -> None:
    port = free_port()
    proc, out = start(
        processes,
        [sys.executable, str(ROOT / "examples/hybrid_server.py")],
        port,
    )
    wait_until(lambda: out.matching(r"Worker (\d+) started"))
    workers = {int(m.group(1)) for m in out.matching(r"Worker (\d+) started")}
    assert http_get(port).startswith("Hello from Worker")

    slow: list[str] = []
    thread = threading.Thread(target=lambda: slow.append(http_get(port, "/cpu", timeout=60)))
    thread.start()
    # While the sum runs in a pool process, the worker's own loop answers /.
    pool_busy = wait_until(
        lambda: [p for p in _tree(proc.pid) if p.pid not in workers and p.cpu_times().user > 0.3]
    )
    during = http_get(port)
    still_running = thread.is_alive()
    thread.join(60)
    assert still_running, "the /cpu request ended before / was asked; raise CPU_N"
    assert during.startswith("Hello from Worker")
    assert slow[0].endswith("Sum: 449999985000000\n")
    # A pool process is a child of its pool's zygote, a child of the cluster worker.
    assert all(p.parent().ppid() in workers for p in pool_busy)

    everything = [p.pid for p in _tree(proc.pid)]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    wait_until(lambda: not [pid for pid in everything if _alive(pid)])


def test_sigkill_of_the_primary_takes_workers_and_pools_down(processes: Processes) -> None:
    port = free_port()
    proc, out = start(processes, [sys.executable, str(ROOT / "examples/hybrid_server.py")], port)
    wait_until(lambda: out.matching(r"Worker (\d+) started"))
    assert "Sum" in http_get(port, "/cpu", timeout=60)  # the pool has started
    everything = [p.pid for p in _tree(proc.pid)]
    assert len(everything) >= 2
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    wait_until(lambda: not [pid for pid in everything if _alive(pid)])


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def test_demo_serves_the_demo_app_with_offload(processes: Processes) -> None:
    port = free_port()
    allcores = Path(sys.executable).with_name("allcores")
    proc, out = start(processes, [str(allcores), "demo", "--port", str(port)], port)
    wait_until(lambda: _answers(port))
    assert out.matching(r"allcores demo: allcores serve allcores.server.demo_app:app")
    assert http_get(port, "/").startswith("Hello from Worker ")
    assert f"Sum: {sum(range(30_000_000))}" in http_get(port, "/cpu", timeout=60)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(30) == 0


def test_demo_runs_the_hybrid_example_when_asked(processes: Processes) -> None:
    port = free_port()
    allcores = Path(sys.executable).with_name("allcores")
    argv = [str(allcores), "demo", "--example", "hybrid", "--port", str(port)]
    proc, out = start(processes, argv, port)
    wait_until(lambda: out.matching(r"Worker (\d+) started"))
    assert out.matching(r"running examples/hybrid_server.py")
    proc.send_signal(signal.SIGINT)
    assert proc.wait(30) == 0


def _answers(port: int) -> bool:
    try:
        return http_get(port, "/", timeout=2).startswith("Hello")
    except OSError:
        return False
