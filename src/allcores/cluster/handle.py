"""The primary's handle on one worker process: Node's `Worker`.

It holds what the primary knows of the worker (its process, channel, scoreboard row,
state, last lines of stderr) and offers Node's methods. What a method needs from the
rest of the cluster (stop routing connections to the worker, arm its kill timer) it
asks of its owner, the `Primary`, through the small `Owner` interface below, so this
module depends on nothing above it.
"""

from __future__ import annotations

import collections
import contextlib
import os
import signal
import socket
import subprocess
import time
from typing import TYPE_CHECKING, Any, Protocol

from allcores.cluster import messages
from allcores.cluster.spawn import OUTPUT_LINES, StderrTail
from allcores.errors import ChannelError
from allcores.events import EventEmitter
from allcores.ipc.async_channel import AsyncChannel
from allcores.observe.scoreboard import Row

if TYPE_CHECKING:
    from allcores.cluster.forking import Forked

__all__ = ["Owner", "Worker"]


class Owner(Protocol):
    """What a `Worker` asks of the primary that started it."""

    def _disconnect_worker(self, worker: Worker) -> None:
        """Route no more connections to *worker*, tell it to drain, kill it if it
        outlives the grace period."""

    def _forget_listening(self, worker: Worker) -> None:
        """Route no more connections to *worker*."""


class Worker(EventEmitter):
    """The primary's handle on one worker: Node's `Worker`.

    Events: ``online()``, ``listening(address)``, ``message(message, handle)``,
    ``disconnect()``, ``exit(code, signal)``, ``error(exc)``.
    """

    def __init__(self, owner: Owner, worker_id: int, row: int) -> None:
        super().__init__()
        self.id = worker_id
        self.row = row
        self._owner = owner
        self.process: subprocess.Popen[bytes] | Forked | None = None
        self.exited_after_disconnect = False
        self.state = "none"
        self.started = time.monotonic()
        self.listening_once = False
        self.candidate = False
        self.hung = False
        """The watchdog found its loop stuck, dumped its stack and killed it."""
        self.recycling = False
        """Its successor is being started (max_requests, max_rss, max_lifetime)."""
        """A reload's new worker that has not listened yet: if it fails, the reload
        stops; its exit is neither a crash nor respawned (`allcores.cluster.rolling`)."""
        self.connections_sent = 0
        self.exit_code: int | None = None
        self.signal_code: str | None = None
        self.output: collections.deque[str] = collections.deque(maxlen=OUTPUT_LINES)
        self._channel: AsyncChannel | None = None
        # The primary's own reference to the worker's end of the channel: if the
        # worker dies, the connections passed to it that it never read are still
        # queued there (see `Handover.recover`).
        self._child_end: socket.socket | None = None
        self._row: Row | None = None
        self._stderr: StderrTail | None = None

    @property
    def pid(self) -> int:
        return self.process.pid if self.process is not None else 0

    def __repr__(self) -> str:
        return f"<Worker {self.id} pid={self.pid} {self.state}>"

    # -- Node's API -------------------------------------------------------------

    def send(self, message: Any, handle: socket.socket | int | None = None) -> bool:
        """Send *message* (anything picklable), optionally with a socket or fd."""
        if self._channel is None or self._channel.closed:
            return False
        fds = [] if handle is None else [handle if isinstance(handle, int) else handle.fileno()]
        self._channel.send({"t": messages.MSG, "data": message}, fds)
        return True

    def disconnect(self) -> None:
        """Stop giving this worker connections; it finishes what is in flight, then exits."""
        self.exited_after_disconnect = True
        if self.state in ("disconnected", "dead"):
            return
        self.state = "disconnecting"
        self._owner._disconnect_worker(self)

    def kill(self, sig: int | str = signal.SIGTERM) -> None:
        """Send *sig* (default SIGTERM) to the worker; a planned exit, as in Node."""
        self.exited_after_disconnect = True
        signum = getattr(signal, sig) if isinstance(sig, str) else sig
        self._owner._forget_listening(self)
        if self.process is not None and self.state != "dead":
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.process.pid, signum)

    destroy = kill

    def is_connected(self) -> bool:
        return self._channel is not None and not self._channel.closed

    def is_dead(self) -> bool:
        return self.state == "dead"

    def serving(self) -> bool:
        """Serving and meant to go on: not draining, not dead, not a reload's
        candidate (`allcores.cluster.rolling`)."""
        return not (self.candidate or self.exited_after_disconnect or self.is_dead())

    # -- what the primary's hand-over reads and uses ------------------------------

    @property
    def open_connections(self) -> int:
        assert self._row is not None
        return self.connections_sent - int(self._row.get("connections_closed"))

    @property
    def requests_served(self) -> int:
        """Requests its app answered, as its row counts them (`allcores serve`)."""
        assert self._row is not None
        return int(self._row.get("requests_total"))

    @property
    def heartbeat_age(self) -> float:
        assert self._row is not None
        beat = self._row.get("heartbeat")
        return time.monotonic() - beat if beat > 0 else float("inf")

    def can_take_connections(self) -> bool:
        """Its channel is open and not backed up (a backed-up channel means its loop is
        not reading: more fds would only pile up in the primary)."""
        channel = self._channel
        return channel is not None and not channel.closed and not channel.pending_writes

    def _post(self, frame: dict[str, Any], fds: list[int] | None = None) -> bool:
        """Send a frame of the cluster's own; False when it could not be queued."""
        channel = self._channel
        if channel is None or channel.closed:
            return False
        try:
            channel.send(frame, fds or ())
        except (ChannelError, OSError):  # OSError: out of fds to queue the message with
            return False
        return True
