"""What `allcores serve --preload` saves: memory per worker, and the time a killed
worker takes to come back. A standalone script (not yet a `run.py` part):

    .venv-3.11/bin/python benchmarks/bench_preload.py [--rounds 2]

    memory: apps/fastapi_pid.py with 4 workers, 200 requests, then each worker's PSS
            (psutil memory_full_info), with and without --preload
    respawn: 2 workers; 4 times (5 in 30 s would be a crash loop), 1 s apart: SIGKILL
            a worker, then time until a new worker process exists, and until a fresh
            connection is answered by a worker that was not there before
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

APPS = Path(__file__).resolve().parent / "apps"
# Run with the project's interpreter: `allcores` sits beside it.
CLI = str(Path(sys.executable).parent / "allcores")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait(condition: Callable[[], Any], limit: float = 30.0) -> Any:
    end = time.monotonic() + limit
    while time.monotonic() < end:
        value = condition()
        if value:
            return value
        time.sleep(0.001)
    raise RuntimeError("timed out")


def pid_of_answer(port: int) -> int | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1) as response:
            return int(json.loads(response.read())["pid"])
    except OSError:
        return None


def workers_of(primary: psutil.Process) -> set[int]:
    found = set()
    for child in primary.children(recursive=True):
        try:
            if child.status() == psutil.STATUS_ZOMBIE or "zygote" in " ".join(child.cmdline()):
                continue
        except psutil.Error:
            continue
        found.add(child.pid)
    return found


def start(workers: int, preload: bool) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    argv = [CLI, "serve", "fastapi_pid:app", "--workers", str(workers), "--port", str(port)]
    argv += ["--no-access-log"] + (["--preload"] if preload else [])
    proc = subprocess.Popen(argv, cwd=APPS, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return proc, port


def memory(preload: bool, workers: int = 4) -> str:
    proc, port = start(workers, preload)
    try:
        pids: set[int] = set()
        wait(lambda: pids.add(pid_of_answer(port) or 0) or len(pids - {0}) >= workers)
        for _ in range(200):
            pid_of_answer(port)
        time.sleep(1)
        pss = [psutil.Process(pid).memory_full_info().pss for pid in pids - {0}]
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        total = sum(member.memory_full_info().pss for member in tree)
        return (
            f"preload={preload!s:5}  PSS per worker {statistics.mean(pss) / 2**20:5.1f} MiB, "
            f"every process {total / 2**20:5.1f} MiB ({len(tree)} processes)"
        )
    finally:
        proc.terminate()
        proc.wait(30)


def respawn(preload: bool, kills: int = 4) -> str:
    proc, port = start(2, preload)
    try:
        primary = psutil.Process(proc.pid)
        wait(lambda: len(workers_of(primary)) >= 2)
        time.sleep(1.5)
        new_pid, answering = [], []
        for _ in range(kills):
            before = workers_of(primary)
            began = time.monotonic()
            os.kill(min(before), signal.SIGKILL)
            wait(lambda before=before: workers_of(primary) - before)
            new_pid.append(time.monotonic() - began)
            wait(lambda before=before: (pid_of_answer(port) or 0) not in before | {0})
            answering.append(time.monotonic() - began)
            time.sleep(1.0)
        return (
            f"preload={preload!s:5}  new pid median {statistics.median(new_pid) * 1000:3.0f} ms "
            f"(max {max(new_pid) * 1000:3.0f}); answering median "
            f"{statistics.median(answering) * 1000:3.0f} ms (max {max(answering) * 1000:3.0f})"
        )
    finally:
        proc.terminate()
        proc.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=2)
    rounds = parser.parse_args().rounds
    for _ in range(rounds):
        for preload in (False, True):
            print(memory(preload), flush=True)
    for _ in range(rounds):
        for preload in (False, True):
            print(respawn(preload), flush=True)


if __name__ == "__main__":
    main()
