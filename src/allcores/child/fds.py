"""Keep the parent's ends of child channels out of every other child.

A socket end that a parent holds for one of its children must not be inherited by
any other process: a process forked later (by the user, by ProcessPoolExecutor, by
another pool) that holds the parent's end hides the parent's close from the child,
and a child that waits for EOF then never exits.

- exec: Python's sockets are close-on-exec already (PEP 446).
- fork: every end is registered here, and `os.register_at_fork` closes all of them
  in every child that any fork makes, right after the fork.

The registry holds the socket objects, weakly, not their numbers: a socket closed
in the parent reports no number (-1) and is skipped, so a child never closes a
number that meanwhile names something else, and nothing has to be unregistered.
"""

from __future__ import annotations

import contextlib
import os
import socket
import weakref

__all__ = ["open_parent_ends", "register_parent_end"]

_PARENT_ENDS: weakref.WeakSet[socket.socket] = weakref.WeakSet()


def register_parent_end(sock: socket.socket) -> None:
    """Close *sock* in every child forked from now on, while it is open here."""
    _PARENT_ENDS.add(sock)


def open_parent_ends() -> set[int]:
    """The fd numbers of the registered ends still open (for leak checks)."""
    return {fd for fd in (sock.fileno() for sock in list(_PARENT_ENDS)) if fd >= 0}


def _close_in_child() -> None:
    for sock in list(_PARENT_ENDS):
        if sock.fileno() >= 0:
            # detach(): the child's copy of the object forgets the number, so it
            # never closes it again when collected.
            with contextlib.suppress(OSError):
                os.close(sock.detach())
    _PARENT_ENDS.clear()


os.register_at_fork(after_in_child=_close_in_child)
