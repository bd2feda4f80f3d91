"""The entry point of a pool worker process (imported by forkserver's preload).

It stays small and imports little, so forkserver children start fast; the task loop
itself is `allcores.pool._protocol.serve`.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket

from allcores.ipc.channel import Channel
from allcores.pool._protocol import serve

_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent_pid: int | None) -> None:
    """SIGKILL this process when the process (thread) that started it dies."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        return  # Not Linux: end of the channel still stops the worker.
    # The parent may have died before prctl took effect.
    if parent_pid is not None and os.getppid() != parent_pid:
        os._exit(0)


def main(sock: socket.socket, nice: int, close_fds: list[int], parent_pid: int | None) -> None:
    for fd in close_fds:
        # Forked children inherit the parent's ends of other workers' channels;
        # holding them would hide the parent's death from those workers.
        with contextlib.suppress(OSError):
            os.close(fd)
    _die_with_parent(parent_pid)
    # Ctrl-C reaches the whole process group; the parent decides what stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if nice:
        with contextlib.suppress(OSError):
            os.nice(nice)
    channel = Channel(sock, raw=True)
    try:
        serve(channel)
    finally:
        channel.close()
