"""The entry point of a pool worker process (imported by forkserver's preload).

It stays small and imports little, so forkserver children start fast; the task loop
itself is `allcores.pool._protocol.serve`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket

from allcores._system import die_with_parent, release_forkserver
from allcores.ipc.channel import Channel
from allcores.pool._protocol import Initializer, serve


def main(
    sock: socket.socket, parent_pid: int | None, nice: int, initializer: Initializer | None
) -> None:
    """Serve the pool over *sock*; *parent_pid* is the process that started this one
    (the pool's zygote), or None when that is not known (forkserver, spawn)."""
    die_with_parent(parent_pid)
    release_forkserver()
    # Ctrl-C reaches the whole process group; the parent decides what stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if nice:
        with contextlib.suppress(OSError):
            os.nice(nice)
    channel = Channel(sock, raw=True)
    try:
        serve(channel, initializer)
    finally:
        channel.close()
