"""Large `bytes` arguments copied by the worker straight out of the pool's memory.

Through a memfd, a 100 MiB argument is copied twice: the submitting thread writes
it into fresh shared pages (40 ms warm, 110-140 ms the first time in a process on
the dev VM), then the worker reads it into its new `bytes` object (65-75 ms, mostly
first-touch page faults). With ``process_vm_readv(2)`` the worker copies from the
caller's object into its own new one: one copy, done in the worker, and nothing at
all for the caller or the pool's loop (57 ms in all for 100 MiB, against 0.7 s for
ProcessPoolExecutor). No library wraps that call, hence ctypes here.

It needs the kernel to let a worker read its parent's memory. Without the Yama LSM,
or with ``kernel.yama.ptrace_scope`` 0, a process may read another of the same user;
with Yama's default of 1 (Ubuntu, Debian) only an ancestor may, and a worker is a
descendant, so the pool then keeps to the memfd. Each worker also tries a read at
start (`probe`) and reports it; a pool uses pulls only once a worker has succeeded,
and never again after one fails (a seccomp profile may deny the call). Once one has
succeeded in a process (`verified`), later pools with no initializer skip the probe.

The `bytes` object the worker builds is made with ``PyBytes_FromStringAndSize(NULL,
n)`` and filled before anything else sees it, which the C API allows; this needs
CPython (`AVAILABLE` is False elsewhere). Only `bytes` is pulled: immutable, so the
caller cannot change it while the worker reads, and kept alive by the task until its
reply (a pulled task is never skipped, see `Pool.schedule`).
"""

from __future__ import annotations

import ctypes
import os
import sys
from typing import Any


class _IoVec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


def _load() -> tuple[Any, Any, int] | None:
    if sys.implementation.name != "cpython" or not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        readv = libc.process_vm_readv
    except (OSError, AttributeError):
        return None
    readv.restype = ctypes.c_ssize_t
    readv.argtypes = [
        ctypes.c_int,
        ctypes.POINTER(_IoVec),
        ctypes.c_ulong,
        ctypes.POINTER(_IoVec),
        ctypes.c_ulong,
        ctypes.c_ulong,
    ]
    new_bytes = ctypes.pythonapi.PyBytes_FromStringAndSize
    new_bytes.restype = ctypes.py_object
    new_bytes.argtypes = [ctypes.c_void_p, ctypes.c_ssize_t]
    # Where a bytes object's data starts: its size less the trailing NUL. Checked.
    offset = sys.getsizeof(b"") - 1
    sample = b"allcores-pull-offset-check"
    if ctypes.string_at(id(sample) + offset, len(sample)) != sample:
        return None
    return readv, new_bytes, offset


_LOADED = _load()
AVAILABLE = _LOADED is not None


def address_of(data: bytes) -> int:
    """Where *data*'s bytes live in this process (CPython: inside the object)."""
    assert _LOADED is not None
    return id(data) + _LOADED[2]


def pull_bytes(pid: int, address: int, size: int) -> bytes:
    """A new `bytes` of *size* copied from *address* in process *pid* (worker side).

    This is what a pulled argument unpickles to. Raises OSError, naming the errno,
    when the kernel refuses or the memory is gone.
    """
    if _LOADED is None:
        raise OSError("process_vm_readv is not available here (CPython on Linux only)")
    readv, new_bytes, offset = _LOADED
    out: bytes = new_bytes(None, size)
    base = id(out) + offset
    done = 0
    while done < size:
        local = _IoVec(base + done, size - done)
        remote = _IoVec(address + done, size - done)
        got = readv(pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
        if got <= 0:
            errno = ctypes.get_errno()
            raise OSError(
                errno,
                f"could not copy a {size}-byte argument from the pool's process {pid} "
                f"({os.strerror(errno) if got < 0 else 'nothing read'})",
            )
        done += got
    return out


# Set in a pool's process once one of its workers could pull (`probe`).
verified = False


def probe(pid: int, address: int, expected: bytes) -> bool:
    """Whether this process may pull from *pid*: reads *expected* back from there."""
    try:
        return pull_bytes(pid, address, len(expected)) == expected
    except OSError:
        return False


def kernel_allows() -> bool:
    """False when Yama restricts reads to ancestors (a worker is a descendant)."""
    try:
        with open("/proc/sys/kernel/yama/ptrace_scope") as scope:
            return scope.read().strip() == "0"
    except OSError:
        return True  # no Yama: the usual same-user check applies
