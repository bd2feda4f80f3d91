"""Keep the parent's ends of child channels out of every other child.

A socket end that a parent holds for one of its children must not be inherited by
any other process: a process forked later (by the user, by ProcessPoolExecutor, by
another pool) that holds the parent's end hides the parent's close from the child,
and a child that waits for EOF then never exits.

- exec: Python's sockets are close-on-exec already (PEP 446).
- fork: every end is registered here, and `os.register_at_fork` closes all of them
  in every child that any fork makes, right after the fork.
"""

from __future__ import annotations

import contextlib
import os

__all__ = ["forget_parent_end", "register_parent_end"]

# fd numbers of live parent ends in this process. Registered once the end exists,
# dropped *before* it is closed, so that a fork in between never closes a number
# that meanwhile names something else.
_PARENT_ENDS: set[int] = set()


def register_parent_end(fd: int) -> None:
    """Close *fd* in every child forked from now on (until `forget_parent_end`)."""
    _PARENT_ENDS.add(fd)


def forget_parent_end(fd: int) -> None:
    """Call before closing *fd*."""
    _PARENT_ENDS.discard(fd)


def _close_in_child() -> None:
    for fd in _PARENT_ENDS:
        with contextlib.suppress(OSError):
            os.close(fd)
    _PARENT_ENDS.clear()


os.register_at_fork(after_in_child=_close_in_child)
