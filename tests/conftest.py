"""Shared fixtures: free ports, processes that are always cleaned up, leak checks."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(predicate, timeout: float = 30.0, interval: float = 0.02):  # type: ignore[no-untyped-def]
    """Poll *predicate* until it returns something truthy; bounded by *timeout*."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s: {predicate}")
        time.sleep(interval)


def kill_tree(pid: int, seen: set[int]) -> None:
    """SIGKILL *pid* and every descendant we know of (only processes we started)."""
    with contextlib.suppress(psutil.Error):
        seen.update(child.pid for child in psutil.Process(pid).children(recursive=True))
    for target in [pid, *seen]:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(target, signal.SIGKILL)


# How long cleanup waits for processes to end on SIGTERM before it SIGKILLs them: a
# cluster of idle workers stops in well under a second; one still up after this waits on
# its graceful_timeout (a server it cannot close), and its test has already passed.
GRACEFUL_STOP_S = 2.0


class Processes:
    """Starts processes for a test and guarantees none outlives it."""

    def __init__(self) -> None:
        self.started: list[subprocess.Popen[bytes]] = []
        self.descendants: set[int] = set()

    def start(self, args: list[str], **kwargs) -> subprocess.Popen[bytes]:  # type: ignore[no-untyped-def]
        kwargs.setdefault("cwd", ROOT)
        proc = subprocess.Popen(args, **kwargs)
        self.started.append(proc)
        return proc

    def python(self, *args: str, **kwargs) -> subprocess.Popen[bytes]:  # type: ignore[no-untyped-def]
        return self.start([sys.executable, *args], **kwargs)

    def remember_children(self, proc: subprocess.Popen[bytes]) -> set[int]:
        with contextlib.suppress(psutil.Error):
            pids = {c.pid for c in psutil.Process(proc.pid).children(recursive=True)}
            self.descendants.update(pids)
            return pids
        return set()

    def cleanup(self) -> None:
        # SIGTERM first: a cluster primary stops its workers as in production, and a
        # process measured by coverage (./dev cover) saves its data, which SIGKILL loses.
        for proc in self.started:
            if proc.poll() is None:
                self.remember_children(proc)
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + GRACEFUL_STOP_S
        for proc in self.started:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(max(0.0, deadline - time.monotonic()))
        for proc in self.started:
            if proc.poll() is None:
                kill_tree(proc.pid, self.descendants)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(5)
            for stream in (proc.stdout, proc.stderr, proc.stdin):
                if stream is not None:
                    stream.close()
        for pid in self.descendants:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def processes() -> Iterator[Processes]:
    procs = Processes()
    try:
        yield procs
    finally:
        procs.cleanup()


# What Python's stack can leave in /dev/shm: multiprocessing.shared_memory segments
# (psm_, wnsm_), multiprocessing semaphores (sem.mp-), and anything named allcores.
# Other programs on the machine (a benchmark's loky, say) are not this suite's business.
_OURS = ("psm_", "wnsm_", "sem.mp-", "mp-")


def _shm_entries() -> set[str]:
    try:
        names = os.listdir("/dev/shm")
    except FileNotFoundError:
        return set()
    return {name for name in names if name.startswith(_OURS) or "allcores" in name}


@pytest.fixture(autouse=True)
def no_shm_leak() -> Iterator[None]:
    """Every test: nothing new may be left in /dev/shm."""
    before = _shm_entries()
    yield
    leaked = _shm_entries() - before
    assert not leaked, f"shared memory left in /dev/shm: {sorted(leaked)}"
