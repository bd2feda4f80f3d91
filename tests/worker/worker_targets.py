"""Worker targets for tests/worker: importable, so a target given by path is found."""

from __future__ import annotations

import os
import sys
import time
from typing import Any

from allcores.worker import ParentPort


def sum_to(parent_port: ParentPort, worker_data: dict[str, int]) -> None:
    """The seed's worker-task.js."""
    total = 0
    for i in range(worker_data["num"]):
        total += i
    parent_port.post_message(total)


def echo_until_stop(parent_port: ParentPort, worker_data: Any) -> None:
    """Answer each message with ("echo", msg, pid) from a listener; stop on "stop"."""

    @parent_port.on("message")
    def answer(message: Any) -> None:
        parent_port.post_message(("echo", message, os.getpid()))
        if message == "stop":
            parent_port.close()


def receive_and_double(parent_port: ParentPort, worker_data: Any) -> None:
    """Blocking receive(): double numbers until None arrives."""
    while (number := parent_port.receive()) is not None:
        parent_port.post_message(number * 2)


def fail(parent_port: ParentPort, worker_data: str) -> None:
    parent_port.post_message("about to fail")
    raise ValueError(f"bad input: {worker_data}")


def exit_with(parent_port: ParentPort, worker_data: int) -> None:
    sys.exit(worker_data)


def sleep_forever(parent_port: ParentPort, worker_data: Any) -> None:
    parent_port.post_message(os.getpid())
    while True:
        time.sleep(1)


def fill_array(parent_port: ParentPort, worker_data: Any) -> None:
    """Write into the SharedArray we were given, then into the one the parent posts."""
    worker_data.numpy()[:] = 7
    parent_port.post_message("filled")
    posted = parent_port.receive()
    posted.numpy()[:] += 1
    parent_port.post_message(posted)


def post_from_grandchild(parent_port: ParentPort, worker_data: float) -> None:
    """Return at once, leaving a forked grandchild that holds the channel, waits
    *worker_data* seconds, posts "late" and exits.

    The grandchild closes every other fd it inherited, among them the one by which
    the parent learns that the worker has exited: the parent knows the exit code
    while the channel is still open.
    """
    if os.fork() == 0:
        try:
            keep = parent_port._channel.fileno()
            os.closerange(3, keep)
            os.closerange(keep + 1, 65536)
            time.sleep(worker_data)
            parent_port.post_message("late")
        finally:
            os._exit(0)
