"""The functions every pool runs, in a module of their own.

Pool workers must import a task by name; a module on PYTHONPATH (the harness puts
benchmarks/ there) works for fork, spawn, loky's and anyio's worker processes alike,
where functions defined in ``__main__`` would not.
"""

from __future__ import annotations


def inc(x: int) -> int:
    """The tiny task: dispatch cost, nothing else."""
    return x + 1


def cpu_sum(n: int) -> int:
    """The CPU batch's unit of work: about 60 ms for n = 5,000,000 on this machine."""
    return sum(range(n))


def echo(data: bytes) -> bytes:
    """The payload round trip: the argument comes back unchanged."""
    return data
