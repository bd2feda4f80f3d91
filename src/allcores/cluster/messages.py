"""The messages between the primary and its workers, one name for each kind.

Every frame on a worker's channel (`allcores.ipc.channel`) is a dict whose ``"t"``
says what it is; file descriptors travel beside it (SCM_RIGHTS). Who sends what::

    primary (primary.py, handover.py)                    worker (worker.py)
    ─────────────────────────────────                    ──────────────────
    Popen(argv, pass_fds=channel, scoreboard) ─────────►  import allcores.cluster
            ◄─────────────────────────────── ONLINE ────   (sent at import)
            ◄──── LISTEN {host, port, backlog, req} ────   await cluster.start_server(...)
    bind once, keep forever
    LISTENING {req, policy, address, key} [+ fd] ──────►   shared / reuseport: accept itself
      (or {req, stopping} or {req, error})
    balanced / rr: accept() here, then
    CONN {key} + accepted fd ──────────────────────────►   connect_accepted_socket(protocol)
            ◄──────────────── CONN_BACK {key} + fd ─────   its server for key is closed
            ◄───────────────────── UNLISTEN {key} ──────   server.close()
    worker.send(obj, handle): MSG {data} [+ fd] ───────►   cluster.worker.on("message")
            ◄──────────────────── MSG {data} [+ fd] ────   cluster.worker.send(obj, handle)
    worker.disconnect(): DISCONNECT {timeout} ─────────►   stop taking connections, drain
            ◄────────────────────────── DISCONNECTING ──   cluster.worker.disconnect()
            ◄──────────────────────────────────── BYE ──   drained: closes its channel, exits

    scoreboard row ◄──── heartbeat, open/closed connection counts (no messages)
    DUMP_SIGNAL (a signal, not a frame) ───────────────►   faulthandler: every thread's
                                                          stack to stderr (watchdog)
"""

from __future__ import annotations

import signal
from typing import Any, Final

__all__ = [
    "BYE",
    "CONN",
    "CONN_BACK",
    "DISCONNECT",
    "DISCONNECTING",
    "DUMP_SIGNAL",
    "LISTEN",
    "LISTENING",
    "MSG",
    "ONLINE",
    "UNLISTEN",
    "kind_of",
]

ONLINE: Final = "online"
LISTEN: Final = "listen"
LISTENING: Final = "listening"
UNLISTEN: Final = "unlisten"
CONN: Final = "conn"
CONN_BACK: Final = "conn-back"
MSG: Final = "msg"
DISCONNECT: Final = "disconnect"
DISCONNECTING: Final = "disconnecting"
BYE: Final = "bye"

# What a worker's faulthandler dumps its stacks on, for the watchdog (health.py): the
# JVM's convention for a thread dump. Workers run in their own process group, so a
# terminal's Ctrl-\ never reaches them.
DUMP_SIGNAL: Final = signal.SIGQUIT


def kind_of(frame: Any) -> str | None:
    """The kind of a received frame; None for anything that is not a message dict."""
    kind = frame.get("t") if isinstance(frame, dict) else None
    return kind if isinstance(kind, str) else None
