"""The blocking end of a channel, and the socketpair both ends are made from.

Who sends what to whom::

    parent process                                      child process
    ──────────────                                      ─────────────
    channel_pair() -> (parent end, child end)
    child end ── fork / pass_fds ──────────────────►  Channel(child end)
    AsyncChannel.send(obj, fds) ──► frame ──────────►  Channel.recv() -> (obj, fds)
                                                         (blocking: the child has
                                                          nothing else to do)
    AsyncChannel on_message(obj, fds) ◄── frame ◄───  Channel.send(obj, fds)
                                                         (sendmsg, then sendall for
                                                          what the socket did not take)

`Channel` blocks the thread that calls it; the parent's end is usually the event
loop's `allcores.ipc.async_channel.AsyncChannel`, though two `Channel` ends talk too.
The frame format and the reader that both ends share live in `allcores.ipc.frames`.

At EOF `recv` raises `ChannelClosed`; a stream that ends mid-frame or a corrupt frame
closes the channel with a `ChannelError` that says which. A well-framed payload that
does not unpickle loses only that message: `recv` raises `ChannelError`, and the
channel goes on.

Written by hand rather than with `multiprocessing.connection`: that module has no
fd passing, no event-loop side, and its `recv` on a corrupt stream can block forever.
"""

from __future__ import annotations

import collections
import select
import socket
from collections.abc import Sequence
from typing import Any

from allcores.errors import ChannelClosed, ChannelError
from allcores.ipc.async_channel import AsyncChannel
from allcores.ipc.frames import (
    MAX_FDS,
    FrameReader,
    close_fds,
    decode,
    encode,
    fds_ancillary,
    frame_header,
    poller_for,
    read_unread,
)

# AsyncChannel, MAX_FDS and read_unread have their own modules; they are named here
# too because code written before the split imports them from here.
__all__ = ["MAX_FDS", "AsyncChannel", "Channel", "channel_pair", "read_unread"]


def channel_pair() -> tuple[socket.socket, socket.socket]:
    """Return a connected (parent, child) pair of AF_UNIX stream sockets.

    Both ends are close-on-exec (Python makes every socket non-inheritable): a child
    started with `subprocess` gets its end through ``pass_fds``, a forked child
    inherits it, and no other program the parent starts holds either end open.
    """
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    return parent, child


class Channel:
    """The blocking end of a channel, for a child process with nothing else to do.

    ``raw=True`` makes `recv` return the payload bytes as they came, for callers that
    decode frames themselves (the pool does, to read out-of-band buffers).
    """

    def __init__(self, sock: socket.socket, *, raw: bool = False) -> None:
        self._poller: select.poll | None = None
        self._sock = sock
        self._sock.setblocking(True)
        self._reader = FrameReader()
        self._ready: collections.deque[tuple[bytes | bytearray, list[int]]] = collections.deque()
        self._raw = raw
        self._closed = False

    @property
    def sock(self) -> socket.socket:
        return self._sock

    def fileno(self) -> int:
        return self._sock.fileno()

    def send(self, obj: Any, fds: Sequence[int] = ()) -> None:
        self.send_bytes(encode(obj), fds)

    def send_bytes(self, payload: bytes | bytearray | memoryview, fds: Sequence[int] = ()) -> None:
        if self._closed:
            raise ChannelClosed("channel is closed")
        header = frame_header(len(payload), len(fds))
        try:
            if len(payload) < 64 * 1024:
                data = header + bytes(payload)
                sent = self._sock.sendmsg([data], fds_ancillary(fds))
                if sent < len(data):
                    self._sock.sendall(memoryview(data)[sent:])
            else:
                sent = self._sock.sendmsg([header], fds_ancillary(fds))
                if sent < len(header):
                    self._sock.sendall(header[sent:])
                self._sock.sendall(payload)
        except OSError as exc:
            raise ChannelClosed(f"peer closed the channel ({exc})") from exc

    def recv(self, timeout: float | None = None) -> tuple[Any, list[int]]:
        """Block for the next message; raises ChannelClosed at EOF, ChannelError if corrupt."""
        payload, fds = self.recv_bytes(timeout)
        if self._raw:
            return payload, fds
        try:
            return decode(payload), fds
        except ChannelError:
            # The framing is intact: this message is lost, the channel is not.
            close_fds(fds)
            raise

    def recv_bytes(self, timeout: float | None = None) -> tuple[bytes | bytearray, list[int]]:
        if self._closed:
            raise ChannelClosed("channel is closed")
        if self._ready:
            return self._ready.popleft()
        if timeout is None:
            # The socket is blocking already; settimeout costs two fcntl calls.
            while not self._ready:
                self._fill()
            return self._ready.popleft()
        self._sock.settimeout(timeout)
        try:
            while not self._ready:
                self._fill()
        finally:
            if not self._closed:
                self._sock.settimeout(None)
        return self._ready.popleft()

    def readable(self) -> bool:
        """True when bytes wait to be read (one poll(2), no read: cheap to call often)."""
        if self._ready:
            return True
        poller = self._poller
        if poller is None:
            poller = self._poller = poller_for(self._sock)
        return bool(poller.poll(0))

    def poll(self) -> bool:
        """True when a message can be read without blocking."""
        if self._ready:
            return True
        self._sock.setblocking(False)
        try:
            self._fill()
        except BlockingIOError:
            pass
        finally:
            if not self._closed:
                self._sock.setblocking(True)
        return bool(self._ready)

    def _fill(self) -> None:
        reader = self._reader
        try:
            got = reader.read_from(self._sock)
        except (BlockingIOError, TimeoutError):
            raise
        except OSError as exc:
            self.close()
            raise ChannelClosed(f"channel broke while reading ({exc})") from exc
        if not got:
            truncated = reader.mid_frame()
            self.close()
            if truncated:
                raise ChannelError("truncated frame: the peer closed the channel mid-message")
            raise ChannelClosed("peer closed the channel")
        try:
            self._ready.extend(reader.frames())
        except ChannelError:
            self.close()
            raise

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._reader.discard()
        for _payload, fds in self._ready:
            close_fds(fds)
        self._ready.clear()
        self._sock.close()

    @property
    def closed(self) -> bool:
        return self._closed
