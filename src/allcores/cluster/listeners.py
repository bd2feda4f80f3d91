"""Listening sockets, all owned by the primary.

The primary binds every address a worker asks for and keeps the socket for the life
of the cluster, so a worker's exit or respawn never closes the port:

- `balanced` / `rr`: the primary accepts and passes each connection's fd;
- `shared`: each worker gets a duplicate of the one socket and accepts on it;
- `reuseport`: one SO_REUSEPORT socket per worker slot, kept by the primary and
  handed to whichever worker fills that slot next.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import socket

from allcores.errors import AllcoresError

__all__ = ["UNIX_PREFIX", "Address", "BindError", "bind_listener", "bind_unix", "who_holds_port"]

# A worker asks for a UNIX socket by giving "unix:/path" as the host (and port 0).
UNIX_PREFIX = "unix:"

# 2048: the kernel caps it at net.core.somaxconn (4096 on current Linux); a deep queue
# absorbs a burst while workers are busy or being replaced, which is what the primary
# owning the socket is for.
DEFAULT_BACKLOG = 2048


class BindError(AllcoresError, OSError):
    """The primary could not listen on an address."""


@dataclasses.dataclass(frozen=True)
class Address:
    """Node's address object: where a worker listens."""

    address: str
    port: int
    address_type: int  # 4 or 6, as in Node; -1 for a UNIX socket (its path in address)

    @classmethod
    def of(cls, sock: socket.socket) -> Address:
        if sock.family == socket.AF_UNIX:
            return cls(UNIX_PREFIX + sock.getsockname(), 0, -1)
        host, port = sock.getsockname()[:2]
        return cls(host, port, 6 if sock.family == socket.AF_INET6 else 4)


def who_holds_port(port: int) -> str:
    """'pid 123 (python)' for the process listening on *port*, or '' if unknown."""
    try:
        import psutil

        for conn in psutil.net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port:
                if conn.pid is None:
                    return "another process"
                try:
                    name = psutil.Process(conn.pid).name()
                except psutil.Error:
                    name = "?"
                return f"pid {conn.pid} ({name})"
    except Exception:
        return ""
    return ""


def bind_listener(
    host: str | None,
    port: int,
    *,
    backlog: int = DEFAULT_BACKLOG,
    reuseport: bool = False,
    listen: bool = True,
) -> socket.socket:
    """A non-blocking TCP socket listening on (host, port); host None means all IPv4.

    ``listen=False`` only binds: the socket holds the port without taking connections.
    """
    bind_host = host if host not in (None, "") else "0.0.0.0"
    try:
        infos = socket.getaddrinfo(
            bind_host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        raise BindError(f"cannot resolve listen address {bind_host!r}: {exc}") from exc
    family, type_, proto, _canon, sockaddr = infos[0]
    sock = socket.socket(family, type_, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuseport:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(sockaddr)
        if listen:
            sock.listen(backlog)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        where = f"{bind_host}:{port}"
        if exc.errno == errno.EADDRINUSE:
            holder = who_holds_port(port)
            held = f", held by {holder}" if holder else ""
            raise BindError(
                exc.errno,
                f"cannot listen on {where}: address already in use{held}; "
                "stop that process or choose another port",
            ) from exc
        raise BindError(exc.errno, f"cannot listen on {where}: {exc.strerror}") from exc
    return sock


def bind_unix(path: str, *, backlog: int = DEFAULT_BACKLOG) -> socket.socket:
    """A non-blocking UNIX socket listening at *path*, readable and writable by every
    user (as uvicorn's ``--uds``: the proxy in front often runs as another user). A
    file left there by a server that was killed is replaced; one in use is an error."""
    if os.path.exists(path):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(path)
            except OSError:
                os.unlink(path)  # nobody answers: left by a server that died
            else:
                raise BindError(
                    errno.EADDRINUSE,
                    f"cannot listen on unix:{path}: another server answers there; "
                    "stop it or choose another path",
                )
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        os.chmod(path, 0o666)
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise BindError(exc.errno, f"cannot listen on unix:{path}: {exc.strerror}") from exc
    return sock
