"""Facts about the machine that several layers need."""

from __future__ import annotations

import os

__all__ = ["available_cpus"]


def available_cpus() -> int:
    """CPUs this process may run on: its affinity mask (taskset, cgroups cpusets),
    not the machine's total, so a container limited to 2 of 64 cores gets 2."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)
