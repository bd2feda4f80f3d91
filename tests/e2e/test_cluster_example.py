"""examples/cluster_server.py (the seed's server.js) and `allcores demo`, as a user runs them."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from tests.cluster.conftest import http_get
from tests.conftest import ROOT, Processes, free_port, wait_until


class Output:
    """Collects a process's stdout lines in a thread."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.lines: list[str] = []
        threading.Thread(target=self._read, args=(proc,), daemon=True).start()

    def _read(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            self.lines.append(line.decode(errors="replace").rstrip("\n"))

    def matching(self, pattern: str) -> list[re.Match[str]]:
        # Search the whole text, not line by line: the primary and its workers share
        # stdout, and two processes' prints may land on one line.
        return list(re.finditer(pattern, "\n".join(self.lines)))


def start(
    processes: Processes, args: list[str], port: int
) -> tuple[subprocess.Popen[bytes], Output]:
    env = dict(os.environ, PORT=str(port), CPU_N="30000000")
    proc = processes.start(
        args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    return proc, Output(proc)


def test_seed_cluster_server(processes: Processes) -> None:
    port = free_port()
    proc, out = start(processes, [sys.executable, str(ROOT / "examples/cluster_server.py")], port)
    primary = wait_until(lambda: out.matching(r"Primary (\d+) is running"))
    assert int(primary[0].group(1)) == proc.pid
    cpus = len(os.sched_getaffinity(0))
    started = wait_until(
        lambda: (
            len(out.matching(r"Worker (\d+) started")) >= cpus
            and out.matching(r"Worker (\d+) started")
        )
    )
    workers = {int(m.group(1)) for m in started}

    answers = {http_get(port) for _ in range(3 * cpus)}
    assert answers == {f"Hello from Worker {pid}!\n" for pid in workers} or cpus == 1

    # /cpu keeps one worker busy; / is still answered, by another worker.
    slow: list[str] = []
    thread = threading.Thread(target=lambda: slow.append(http_get(port, "/cpu", timeout=60)))
    thread.start()
    time.sleep(0.2)  # let the /cpu request reach a worker; the assertions do not depend on it
    quick = http_get(port)
    thread.join(60)
    assert re.fullmatch(r"Hello from Worker \d+!\n", quick)
    assert re.fullmatch(r"Hello from Worker \d+! Sum: 449999985000000\n", slow[0])

    # A worker killed by signal is reported as in the seed, and replaced.
    victim = sorted(workers)[0]
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: out.matching(rf"Worker {victim} died"))
    wait_until(lambda: len(out.matching(r"Worker (\d+) started")) >= len(workers) + 1)
    assert http_get(port).startswith("Hello from Worker")

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 0


def test_allcores_demo_runs_the_example_and_says_what_to_try(processes: Processes) -> None:
    port = free_port()
    allcores = Path(sys.executable).with_name("allcores")
    proc, out = start(
        processes, [str(allcores), "demo", "--example", "cluster", "--port", str(port)], port
    )
    wait_until(lambda: out.matching(r"Worker (\d+) started"))
    assert out.matching(rf"  curl localhost:{port}/cpu .*")
    assert http_get(port).startswith("Hello from Worker")
    proc.send_signal(signal.SIGINT)
    assert proc.wait(20) == 0
