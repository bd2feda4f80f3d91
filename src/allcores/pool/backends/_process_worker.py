"""The entry point of a pool worker process (imported by forkserver's preload).

It stays small and imports little, so forkserver children start fast; the task loop
itself is `allcores.pool._protocol.serve`.
"""

from __future__ import annotations

import _signal  # type: ignore[import-not-found]  # CPython's C module, no stubs
import contextlib
import os
import socket
from typing import Any

from allcores._system import die_with_parent, release_forkserver
from allcores.ipc.channel import Channel
from allcores.pool._protocol import serve


def main(
    sock: socket.socket,
    nice: int,
    close_fds: list[int],
    parent_pid: int | None,
    setup: dict[str, Any] | None,
) -> None:
    """Serve the pool over *sock*; *setup* is given to a forked worker, else it
    comes as the first frame."""
    own = sock.fileno()
    for fd in close_fds:
        # Forked children inherit the parent's ends of other workers' channels;
        # holding them would hide the parent's death from those workers. A number
        # the parent forgot to drop may since name this worker's own socket: keep it.
        if fd == own:
            continue
        with contextlib.suppress(OSError):
            os.close(fd)
    die_with_parent(parent_pid)
    release_forkserver()
    # Ctrl-C reaches the whole process group; the parent decides what stops.
    # `_signal`, the C module under `signal`: its wrapper's enum conversions cost a
    # freshly forked worker ~0.2 ms of copy-on-write faults, against ~0.03 ms.
    _signal.signal(_signal.SIGINT, _signal.SIG_IGN)
    if nice:
        with contextlib.suppress(OSError):
            os.nice(nice)
    channel = Channel(sock, raw=True)
    try:
        serve(channel, setup)
    finally:
        channel.close()
