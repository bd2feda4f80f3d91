"""Task functions the workers import by reference (tests/pool is on sys.path via rootdir)."""

from __future__ import annotations

import ctypes
import os
import signal
import time
from typing import Any

STATE: dict[str, Any] = {}


def add(x: int, y: int = 1) -> int:
    return x + y


def square(x: int) -> int:
    return x * x


def identity(x: Any) -> Any:
    return x


def pid() -> int:
    return os.getpid()


def sleep_then(seconds: float, value: Any = None) -> Any:
    time.sleep(seconds)
    return value


def sleep_pid(seconds: float) -> int:
    time.sleep(seconds)
    return os.getpid()


def exit_hard(code: int = 3) -> None:
    os._exit(code)


def kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def die_leaving_a_grandchild(pid_file: str) -> None:
    """Fork a child that outlives this worker (holding its inherited fds), then die."""
    child = os.fork()
    if child == 0:
        time.sleep(60)
        os._exit(0)
    with open(pid_file, "w") as f:
        f.write(str(child))
    os.kill(os.getpid(), signal.SIGKILL)


def segfault() -> None:
    ctypes.string_at(0)


def raise_value_error(message: str) -> None:
    raise ValueError(message)


def return_unpicklable() -> Any:
    import threading

    return threading.Lock()


def init_state(value: Any) -> None:
    STATE["value"] = value


def read_state(_ignored: Any = None) -> Any:
    return STATE.get("value")


def init_report(queue: Any, lock: Any) -> None:
    """An initializer whose initargs are a multiprocessing queue and lock."""
    with lock:
        queue.put(os.getpid())


def failing_init() -> None:
    raise RuntimeError("initializer says no")


def niceness() -> int:
    return os.nice(0)


def fail_on(x: int, bad: int) -> int:
    if x == bad:
        raise ValueError(f"bad item {x}")
    return x


def nbytes(data: Any) -> int:
    return len(data)


def many_segments(count: int) -> list[Any]:
    """*count* small shared-memory blocks, each of which travels as an fd."""
    from allcores.shm.segment import Segment

    return [Segment.create(16) for _ in range(count)]


def sha256(data: bytes) -> str:
    """The digest of what the worker received (identity() would hand back the
    caller's own object, proving nothing about the copy)."""
    import hashlib

    return hashlib.sha256(data).hexdigest()


def reverse(data: bytes) -> bytes:
    """A new large result, which travels back through a memfd."""
    return data[::-1]


def exit_in_init() -> None:
    """An initializer that kills its worker before READY."""
    os._exit(5)


def identity_in_worker() -> dict[str, Any]:
    """What a task sees of its process: multiprocessing's view, and stdin."""
    import multiprocessing

    parent = multiprocessing.parent_process()
    try:
        line: str | None = input()
    except EOFError:
        line = None
    return {
        "name": multiprocessing.current_process().name,
        "pid": multiprocessing.current_process().pid,
        "parent_pid": None if parent is None else parent.pid,
        "stdin_line": line,
        "fd0": os.readlink("/proc/self/fd/0"),
    }
