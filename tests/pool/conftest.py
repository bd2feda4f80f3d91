"""Pool test helpers: the pool tests use `no_leftovers` (no process, no /dev/shm entry left)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import psutil
import pytest

from allcores.child import fds
from allcores.pool import Pool


def _is_helper(proc: psutil.Process) -> bool:
    # multiprocessing's forkserver and resource tracker live for the whole session.
    try:
        cmdline = " ".join(proc.cmdline())
    except psutil.Error:
        return True
    return "forkserver" in cmdline or "resource_tracker" in cmdline


def child_pids() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True) if not _is_helper(p)}


def shm_entries() -> set[str]:
    try:
        return set(os.listdir("/dev/shm"))
    except OSError:
        return set()


def wait_gone(pids: set[int] | list[int], timeout: float = 10.0) -> set[int]:
    """PIDs still alive (not zombies) after waiting up to *timeout* seconds."""
    deadline = time.monotonic() + timeout
    alive = set(pids)
    while alive and time.monotonic() < deadline:
        still = set()
        for pid in alive:
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    still.add(pid)
            except psutil.NoSuchProcess:
                pass
        alive = still
        if alive:
            time.sleep(0.02)
    return alive


@pytest.fixture
def no_leftovers() -> Iterator[None]:
    before_children = child_pids()
    before_shm = shm_entries()
    before_fds = fds.open_parent_ends()
    yield
    leftover = wait_gone(child_pids() - before_children, timeout=10.0)
    assert not leftover, f"processes left behind: {leftover}"
    new_shm = {
        n for n in shm_entries() - before_shm if "allcores" in n or n.startswith(("psm_", "mp-"))
    }
    assert not new_shm, f"/dev/shm entries left behind: {new_shm}"
    # Every worker's channel closed: an end left open is an fd leaked for good.
    registered = fds.open_parent_ends() - before_fds
    assert not registered, f"worker channel fds still registered: {registered}"


@pytest.fixture
def pool() -> Iterator[Pool]:
    p = Pool(2)
    try:
        yield p
    finally:
        p.shutdown(wait=True, cancel_futures=True)
