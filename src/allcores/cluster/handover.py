"""The primary's listening sockets, and handing accepted connections to workers.

The primary binds every address a worker asks for and keeps the socket for the life
of the cluster (`allcores.cluster.listeners` says how each policy uses it). Under
`balanced` and `rr` it also accepts, and passes each connection's fd on::

    client ──TCP──► listening socket (primary)
                      │ readable: accept up to _ACCEPT_BATCH at a time
                      ▼
                    pick a worker (`allcores.cluster.balance`): least busy, or next
                      │
                      ├─ CONN {key} + fd over its channel ──────────────────► worker
                      └─ none can take it: held in `pending` (up to _PENDING_LIMIT),
                         retried every _RETRY_PENDING s and when a worker listens

    worker ── CONN_BACK {key} + fd ──► take_back: its server is closed; to another
    a dead worker's unread CONN frames ──► recover: to another worker

Under `shared` a worker gets the one socket and accepts itself; under `reuseport`
each scoreboard row has its own SO_REUSEPORT socket, which a respawn in that row
takes over with the connections queued on it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import logging
import os
import socket
from collections.abc import Callable, Collection
from typing import Any

from allcores.child.fds import register_parent_end
from allcores.cluster import messages
from allcores.cluster.balance import least_busy_worker, round_robin
from allcores.cluster.handle import Worker
from allcores.cluster.listeners import (
    DEFAULT_BACKLOG,
    UNIX_PREFIX,
    Address,
    BindError,
    bind_listener,
    bind_unix,
)
from allcores.cluster.settings import ClusterSettings
from allcores.ipc.frames import read_unread

__all__ = ["Handover"]

log = logging.getLogger("allcores.cluster")

# Accepts per wakeup of a listener under balanced/rr: a burst of new connections is
# drained in one go, yet a flood cannot keep the loop from reading worker channels.
_ACCEPT_BATCH = 64
# Connections accepted while no worker can take one wait here (then the listener
# stops accepting, and the kernel's backlog holds the rest).
_PENDING_LIMIT = 1024
# While accepted connections wait for a worker, the primary retries this often: soon
# enough that a worker back from a blocked loop gets them within a frame or two of
# a human's patience, rare enough to cost nothing.
_RETRY_PENDING = 0.05


class _Listener:
    """One address the primary listens on, and the workers serving it."""

    def __init__(self, key: tuple[str, int], policy: str, sock: socket.socket) -> None:
        self.key = key
        self.policy = policy
        self.sock = sock
        self.address = Address.of(sock)
        self.workers: list[Worker] = []
        self.next_index = 0
        self.pending: collections.deque[socket.socket] = collections.deque()
        self.reading = False
        self.per_row: dict[int, socket.socket] = {}
        self.retry: asyncio.TimerHandle | None = None

    def close(self) -> None:
        if self.retry is not None:
            self.retry.cancel()
            self.retry = None
        for conn in self.pending:
            conn.close()
        self.pending.clear()
        if self.sock.family == socket.AF_UNIX and self.sock.fileno() != -1:
            with contextlib.suppress(OSError):
                os.unlink(self.sock.getsockname())
        self.sock.close()
        for sock in self.per_row.values():
            sock.close()
        self.per_row.clear()


class Handover:
    """Every listener of one primary, and the path of a connection to a worker."""

    def __init__(
        self, loop: Callable[[], asyncio.AbstractEventLoop], settings: ClusterSettings
    ) -> None:
        # The primary's loop, asked for only when a socket is to be watched: the
        # primary makes its loop on first use, not when it is built.
        self._loop = loop
        self._settings = settings
        # By (host, port) as asked; a listener asked for on port 0 is also under the
        # port it got, so every worker that asks for "any" port shares it.
        self._listeners: dict[tuple[str, int], _Listener] = {}
        self._reuseport_warned = False

    # -- what the primary asks ------------------------------------------------------

    def listen(self, worker: Worker, request: dict[str, Any], *, refuse: bool) -> Address | None:
        """Answer a worker's LISTEN: bind (once per address), reply with LISTENING and
        the socket its policy gives, and route connections to it. Returns where it
        listens; None when refused (*refuse*: the cluster or the worker is stopping)
        or when the address cannot be bound (the reply says why)."""
        host = request.get("host") or "0.0.0.0"
        port = int(request.get("port") or 0)
        backlog = request.get("backlog") or DEFAULT_BACKLOG
        policy = self._settings.scheduling_policy
        reply: dict[str, Any] = {
            "t": messages.LISTENING,
            "req": request.get("req"),
            "policy": policy,
        }
        if refuse:
            reply["stopping"] = True
            worker._post(reply)
            return None
        try:
            listener = self._listener(host, port, backlog)
        except OSError as exc:
            reply["error"] = str(exc)
            worker._post(reply)
            return None
        address = listener.address
        reply["address"] = (address.address, address.port, address.address_type)
        reply["key"] = list(listener.key)
        fds: list[int] = []
        if policy == "shared":
            fds = [listener.sock.fileno()]
        elif policy == "reuseport":
            self._warn_reuseport()
            fds = [self._reuseport_socket(listener, worker.row, backlog).fileno()]
        if worker not in listener.workers:
            listener.workers.append(worker)
        worker._post(reply, fds)
        if policy in ("balanced", "rr"):
            self._flush_pending(listener)
            self._start_accepting(listener)
        return address

    def bind(self, host: str | None, port: int, backlog: int | None = None) -> Address:
        """Listen on (host, port) now, before any worker asks: a port that is taken
        fails here, in the primary, and port 0 gets its number. BindError if not."""
        return self._listener(host or "0.0.0.0", port, backlog or DEFAULT_BACKLOG).address

    def _listener(self, host: str, port: int, backlog: int) -> _Listener:
        listener = self._listeners.get((host, port))
        if listener is None and host.startswith(UNIX_PREFIX):
            if self._settings.scheduling_policy == "reuseport":
                raise BindError(
                    errno.EINVAL, "policy 'reuseport' needs TCP; a UNIX socket takes the others"
                )
            sock = bind_unix(host.removeprefix(UNIX_PREFIX), backlog=backlog)
            listener = _Listener((host, port), self._settings.scheduling_policy, sock)
            self._listeners[(host, port)] = listener
            register_parent_end(sock)
        if listener is None:
            policy = self._settings.scheduling_policy
            reuseport = policy == "reuseport"
            # Under reuseport the primary's own socket only holds the port (bound, not
            # listening, so the kernel sends it nothing); each worker row gets its own
            # listening socket.
            sock = bind_listener(
                host, port, backlog=backlog, reuseport=reuseport, listen=not reuseport
            )
            listener = _Listener((host, port), policy, sock)
            self._listeners[(host, port)] = listener
            # The primary's alone: no process it forks (a zygote, a pool) holds it.
            register_parent_end(sock)
            if port == 0:
                self._listeners[(host, listener.address.port)] = listener
        return listener

    def forget(self, worker: Worker) -> None:
        """Route no more connections to *worker*."""
        for listener in self._listeners.values():
            if worker in listener.workers:
                listener.workers.remove(worker)

    def take_back(self, worker: Worker, frame: dict[str, Any], fds: list[int]) -> None:
        """A worker returned a connection its closed server could not take."""
        for extra in fds[1:]:
            os.close(extra)
        if not fds:
            return
        conn = socket.socket(fileno=fds[0])
        listener = self._listener_of(frame)
        if listener is None:
            conn.close()
            return
        if worker in listener.workers:
            listener.workers.remove(worker)
        if not self._hand_over(listener, conn):
            listener.pending.append(conn)
            self._retry_pending_later(listener)

    def recover(self, worker: Worker) -> None:
        """Give the connections a dead worker never took to the others."""
        child_end, worker._child_end = worker._child_end, None
        if child_end is None:
            return
        recovered = 0
        for frame, fds in read_unread(child_end):
            listener = (
                self._listener_of(frame)
                if messages.kind_of(frame) == messages.CONN and fds
                else None
            )
            if listener is None:
                for fd in fds:
                    os.close(fd)
                continue
            for extra in fds[1:]:
                os.close(extra)
            conn = socket.socket(fileno=fds[0])
            recovered += 1
            if not self._hand_over(listener, conn):
                listener.pending.append(conn)
        child_end.close()
        if recovered:
            log.info(
                "allcores: %d connection(s) worker %d never took went to others",
                recovered,
                worker.id,
            )

    def close_row(self, row: int) -> None:
        """Close *row*'s reuseport socket: its worker drains and accepts no more."""
        for listener in self._listeners.values():
            sock = listener.per_row.pop(row, None)
            if sock is not None:
                sock.close()

    def keep_rows(self, rows: Collection[int]) -> None:
        """Close the reuseport sockets of every row but *rows*: a row no worker holds
        or will refill must not have the kernel send it connections nobody accepts."""
        for listener in self._listeners.values():
            for row in [row for row in listener.per_row if row not in rows]:
                listener.per_row.pop(row).close()

    def close(self) -> None:
        """Stop accepting and close every listening socket, and the connections waiting."""
        for listener in self._listeners.values():
            self._stop_accepting(listener)
            listener.close()
        self._listeners.clear()

    # -- listeners ------------------------------------------------------------------

    def _listener_of(self, frame: Any) -> _Listener | None:
        key = frame.get("key") if isinstance(frame, dict) else None
        if not isinstance(key, list | tuple) or len(key) != 2:
            return None
        return self._listeners.get((key[0], key[1]))

    def _reuseport_socket(self, listener: _Listener, row: int, backlog: int) -> socket.socket:
        """The SO_REUSEPORT socket of a scoreboard row: a respawned worker takes over
        its predecessor's socket, with the connections queued on it."""
        sock = listener.per_row.get(row)
        if sock is None:
            host = listener.key[0]
            sock = bind_listener(host, listener.address.port, backlog=backlog, reuseport=True)
            listener.per_row[row] = sock
            register_parent_end(sock)
        return sock

    def _warn_reuseport(self) -> None:
        if self._reuseport_warned:
            return
        self._reuseport_warned = True
        migrate = ""
        with contextlib.suppress(OSError), open("/proc/sys/net/ipv4/tcp_migrate_req") as f:
            migrate = f.read().strip()
        if migrate != "1":
            log.warning(
                "allcores: policy 'reuseport': connections queued on a worker's socket "
                "wait while that worker is replaced, and are lost if its socket is closed; "
                "set net.ipv4.tcp_migrate_req=1 to let the kernel move them"
            )

    # -- accepting and handing over (balanced, rr) ------------------------------------

    def _start_accepting(self, listener: _Listener) -> None:
        if not listener.reading and listener.workers:
            listener.reading = True
            self._loop().add_reader(listener.sock.fileno(), self._on_acceptable, listener)

    def _stop_accepting(self, listener: _Listener) -> None:
        if listener.reading:
            listener.reading = False
            self._loop().remove_reader(listener.sock.fileno())

    def _pick(self, listener: _Listener) -> Worker | None:
        candidates = [w for w in listener.workers if w.can_take_connections()]
        if not candidates:
            return None
        start = listener.next_index
        listener.next_index = (start + 1) % len(candidates)
        if listener.policy == "rr":
            return round_robin(candidates, start)
        return least_busy_worker(candidates, start, self._settings.heartbeat_stale)

    def _hand_over(self, listener: _Listener, conn: socket.socket) -> bool:
        for _attempt in range(len(listener.workers) + 1):
            worker = self._pick(listener)
            if worker is None:
                return False
            if worker._post({"t": messages.CONN, "key": list(listener.key)}, [conn.fileno()]):
                worker.connections_sent += 1
                conn.close()
                return True
            self.forget(worker)
        return False

    def _on_acceptable(self, listener: _Listener) -> None:
        for _ in range(_ACCEPT_BATCH):
            try:
                conn, _addr = listener.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.error("allcores: accept on %s failed: %s", listener.address, exc)
                return
            if conn.family in (socket.AF_INET, socket.AF_INET6):
                # Workers get the connection already made; set what an accepting event
                # loop would have set (asyncio and uvloop disable Nagle on TCP).
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if not self._hand_over(listener, conn):
                listener.pending.append(conn)
                if len(listener.pending) >= _PENDING_LIMIT or not listener.workers:
                    self._stop_accepting(listener)
                self._retry_pending_later(listener)
                return

    def _retry_pending_later(self, listener: _Listener) -> None:
        """Workers may be back (loops unblocked, channels drained): try again soon."""
        if listener.retry is None:
            listener.retry = self._loop().call_later(_RETRY_PENDING, self._retry_pending, listener)

    def _retry_pending(self, listener: _Listener) -> None:
        listener.retry = None
        if self._listeners.get(listener.key) is not listener:
            return  # closed since
        self._flush_pending(listener)
        if listener.pending:
            self._retry_pending_later(listener)
        else:
            self._start_accepting(listener)

    def _flush_pending(self, listener: _Listener) -> None:
        while listener.pending:
            conn = listener.pending.popleft()
            if not self._hand_over(listener, conn):
                listener.pending.appendleft(conn)
                return
