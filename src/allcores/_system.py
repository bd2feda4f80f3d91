"""Facts about the machine, and the process hygiene every child of allcores needs."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import os
import signal
import sys
from typing import Any

__all__ = [
    "available_cpus",
    "die_with_parent",
    "libc_prctl",
    "new_event_loop",
    "raise_fd_limit",
    "release_forkserver",
    "resident_bytes",
    "signal_name",
]

_PR_SET_PDEATHSIG = 1


def available_cpus() -> int:
    """CPUs this process may run on: its affinity mask (taskset, cgroups cpusets),
    not the machine's total, so a container limited to 2 of 64 cores gets 2."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def die_with_parent(parent_pid: int | None) -> None:
    """Have the kernel SIGKILL this process when its parent dies (Linux).

    Called first thing in every child allcores starts, so no worker outlives a
    SIGKILLed parent; elsewhere, EOF on the child's channel does the same job once
    the child reads it. If the parent died before the signal was armed, exit now.
    """
    prctl = libc_prctl()
    if prctl is not None:
        with contextlib.suppress(OSError):
            prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if parent_pid is not None and os.getppid() != parent_pid:
        os._exit(1)


@functools.cache
def libc_prctl() -> Any:
    """libc's ``prctl`` (None off Linux), looked up once per process.

    A parent calls it before forking, so that its children find it ready: the
    lookup (dlopen and a ctypes function object) costs a freshly forked child
    ~0.3 ms of copy-on-write faults, a tenth of its start.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def release_forkserver() -> None:
    """Drop the fd by which multiprocessing's forkserver learns that its parent is gone.

    Every child started through the forkserver (or forked from a process that runs
    one) inherits the write end of that pipe. While a child holds it, the forkserver
    outlives a SIGKILLed parent, and so does the child, whose parent is the
    forkserver. Nothing in a child needs it. Reaches into a private attribute of
    multiprocessing (checked on 3.11 to 3.13); if it is gone, this does nothing.
    """
    forkserver = sys.modules.get("multiprocessing.forkserver")
    server = getattr(forkserver, "_forkserver", None)
    alive_fd = getattr(server, "_forkserver_alive_fd", None)
    if isinstance(alive_fd, int):
        with contextlib.suppress(OSError):
            os.close(alive_fd)
        setattr(server, "_forkserver_alive_fd", None)  # noqa: B010


def raise_fd_limit() -> None:
    """Raise this process's soft limit on open files to its hard limit, as servers do:
    many distributions still start processes with a soft limit of 1,024."""
    try:
        import resource
    except ImportError:
        return
    with contextlib.suppress(ValueError, OSError):
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY or soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def resident_bytes(pid: int) -> int:
    """Resident memory of process *pid* in bytes; 0 if it cannot be read (gone)."""
    try:
        import psutil

        return int(psutil.Process(pid).memory_info().rss)
    except Exception:
        return 0


def signal_name(signum: int) -> str:
    """``"SIGKILL"`` for 9: how a child's death is reported to people."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def new_event_loop() -> asyncio.AbstractEventLoop:
    """A new event loop, uvloop's where it is installed: a loop that passes file
    descriptors or results between processes wakes once per item, and uvloop makes
    each wake-up cheaper."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop
