"""The wire format of a channel: frames, fds alongside, and the reader that splits them.

Who sends what to whom::

    sender                                              receiver
    ──────                                              ────────
    encode(obj) ─► payload (pickle, protocol 5)
    frame_header(len, nfds) + payload
      sendmsg, fds as SCM_RIGHTS ancillary data
      (fds_ancillary) ──────────► socket ──────────►  FrameReader.read_from(sock)
                                                        bytes ─► buffer, fds ─► fd queue
                                                      FrameReader.frames()
                                                        ─► [(payload, fds), ...]
                                                      decode(payload) -> obj

Both channel kinds, `allcores.ipc.channel.Channel` (blocking) and
`allcores.ipc.async_channel.AsyncChannel` (event loop), send and read through this
module; `read_unread` uses it alone, on a socket no channel reads.

A frame is an 8-byte header, ``!HHI`` = (magic, number of fds, payload length),
then the payload: by default one object pickled with protocol 5. The fds travel as
SCM_RIGHTS ancillary data attached to the header's bytes; the reader keeps received
fds in arrival order and hands each frame the number its header announces. A header
with a bad magic or an impossible fd count raises `ChannelError`; what the channel
does then is the channel's business.
"""

from __future__ import annotations

import array
import collections
import contextlib
import os
import pickle
import select
import socket
import struct
from collections.abc import Sequence
from typing import Any

from allcores.errors import ChannelError

__all__ = [
    "HEADER_SIZE",
    "MAX_FDS",
    "MAX_PAYLOAD",
    "FrameReader",
    "close_fds",
    "decode",
    "encode",
    "fds_ancillary",
    "frame_header",
    "poller_for",
    "read_unread",
]

_HEADER = struct.Struct("!HHI")
HEADER_SIZE = _HEADER.size
_MAGIC = 0xAC05
# One frame carries at most this many fds: enough for any message we send (one
# connection, a handful of shared-memory blocks) while keeping the ancillary buffer
# that every recvmsg must reserve small.
MAX_FDS = 32
_FD_SIZE = array.array("i").itemsize
_ANCILLARY_SPACE = socket.CMSG_SPACE(MAX_FDS * _FD_SIZE)
# Reads take up to 64 KiB, so a burst of small result frames is one syscall. They go
# into a scratch buffer reused for the channel's life: `recvmsg(256 KiB)`, as this
# once was, allocated 256 KiB per call, above glibc's mmap threshold, and measured
# 13 µs a call against 1.6 µs for recvmsg_into on the dev box (2026-11-28), twice
# per pool round trip.
_READ_SIZE = 64 * 1024
# Payloads above this are read straight into their own buffer instead of being
# assembled in the shared read buffer, so a 100 MiB frame is copied once, not twice.
_DIRECT_READ = _READ_SIZE
# The header's length field is 32 bits; larger data belongs in shared memory anyway.
MAX_PAYLOAD = 2**32 - 1


def encode(obj: Any) -> bytes:
    """Pickle *obj* with protocol 5 (the payload of a default frame)."""
    return pickle.dumps(obj, protocol=5)


def frame_header(payload_len: int, nfds: int) -> bytes:
    """The header that goes before a payload; raises ChannelError if it cannot be framed."""
    if payload_len > MAX_PAYLOAD:
        raise ChannelError(
            f"message of {payload_len} bytes is larger than a frame can carry "
            f"({MAX_PAYLOAD}); pass large data through shared memory (allcores.SharedArray)"
        )
    if nfds > MAX_FDS:
        raise ChannelError(f"a message can carry at most {MAX_FDS} fds, got {nfds}")
    return _HEADER.pack(_MAGIC, nfds, payload_len)


def fds_ancillary(fds: Sequence[int]) -> list[tuple[int, int, bytes]]:
    """The ancillary data that carries *fds* with a sendmsg (none for no fds)."""
    if not fds:
        return []
    return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]


def _fds_from_ancillary(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(data) - (len(data) % _FD_SIZE)
            fds.extend(array.array("i", data[:usable]))
    return fds


def poller_for(sock: socket.socket) -> select.poll:
    """A poll object watching *sock* for input (not select(): fds past 1023 exist).

    Made whole before it is kept: a Ctrl-C between creating and registering it must
    not leave a poller that watches nothing, on which every later wait sleeps forever.
    """
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    return poller


def close_fds(fds: Sequence[int]) -> None:
    """Close received fds nobody will own (a dropped frame, a closed channel)."""
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


class FrameReader:
    """Turns a byte stream plus received fds into frames. Shared by both channel kinds."""

    def __init__(self) -> None:
        # Allocated on the first read: a channel used only to send never pays for it.
        self.scratch: memoryview | None = None
        self.buf = bytearray()
        self.pos = 0
        self.fds: collections.deque[int] = collections.deque()
        # A large payload being read straight into its own buffer.
        self.big: bytearray | None = None
        self.big_filled = 0
        self.big_nfds = 0

    def read_from(self, sock: socket.socket) -> int:
        """One read from *sock* into the buffers: the byte count (0 at EOF).

        Raises what the socket raises (BlockingIOError when nothing is there).
        """
        if self.big is not None:
            view = memoryview(self.big)[self.big_filled :]
            n, ancdata, _flags, _addr = sock.recvmsg_into([view], _ANCILLARY_SPACE)
            self.fds.extend(_fds_from_ancillary(ancdata))
            self.big_filled += n
            return n
        scratch = self.scratch
        if scratch is None:
            scratch = self.scratch = memoryview(bytearray(_READ_SIZE))
        n, ancdata, _flags, _addr = sock.recvmsg_into([scratch], _ANCILLARY_SPACE)
        self.feed(scratch[:n], _fds_from_ancillary(ancdata))
        return n

    def feed(self, data: bytes | memoryview, fds: list[int]) -> None:
        self.fds.extend(fds)
        if self.big is not None:
            take = min(len(data), len(self.big) - self.big_filled)
            self.big[self.big_filled : self.big_filled + take] = data[:take]
            self.big_filled += take
            data = data[take:]
            if not data:
                return
        if self.pos and self.pos == len(self.buf):
            self.buf.clear()
            self.pos = 0
        self.buf += data

    def frames(self) -> list[tuple[bytes | bytearray, list[int]]]:
        """Every complete frame now buffered; raises ChannelError on a corrupt one."""
        out: list[tuple[bytes | bytearray, list[int]]] = []
        if self.big is not None:
            if self.big_filled < len(self.big):
                return out
            out.append((self.big, self._take_fds(self.big_nfds)))
            self.big = None
        buf = self.buf
        while len(buf) - self.pos >= HEADER_SIZE:
            magic, nfds, length = _HEADER.unpack_from(buf, self.pos)
            if magic != _MAGIC:
                raise ChannelError(
                    f"corrupt frame: bad magic 0x{magic:04x} (expected 0x{_MAGIC:04x}); "
                    "the peer wrote something that is not an allcores frame"
                )
            if nfds > MAX_FDS:
                raise ChannelError(f"corrupt frame: announces {nfds} fds (limit {MAX_FDS})")
            start = self.pos + HEADER_SIZE
            available = len(buf) - start
            if available >= length:
                out.append((bytes(buf[start : start + length]), self._take_fds(nfds)))
                self.pos = start + length
                continue
            if length >= _DIRECT_READ:
                self.big = bytearray(length)
                self.big[:available] = buf[start:]
                self.big_filled = available
                self.big_nfds = nfds
                self.pos = len(buf)
            break
        if self.pos:
            del buf[: self.pos]
            self.pos = 0
        return out

    def _take_fds(self, n: int) -> list[int]:
        if n > len(self.fds):
            raise ChannelError(f"corrupt frame: announces {n} fds but {len(self.fds)} arrived")
        return [self.fds.popleft() for _ in range(n)]

    def mid_frame(self) -> bool:
        """True when part of a frame is buffered: an EOF now truncates it."""
        return self.big is not None or len(self.buf) > self.pos

    def discard(self) -> None:
        """Drop what is buffered and close the fds no frame took."""
        close_fds(list(self.fds))
        self.fds.clear()
        self.buf.clear()
        self.big = None


def decode(payload: bytes | bytearray) -> Any:
    """Unpickle a default frame's payload; raises ChannelError if it does not unpickle."""
    try:
        return pickle.loads(payload)
    except Exception as exc:
        raise ChannelError(f"corrupt frame: payload does not unpickle ({exc!r})") from exc


def read_unread(sock: socket.socket) -> list[tuple[Any, list[int]]]:
    """Every whole message still queued for *sock*'s owner, read without blocking.

    For a parent that kept its own reference to a child's end: when the child dies,
    what it never read (connections passed to it, say) is still there to recover.
    A stream that does not start on a frame boundary yields nothing; its fds are closed.
    """
    reader = FrameReader()
    sock.setblocking(False)
    while True:
        try:
            if not reader.read_from(sock):
                break
        except OSError:  # BlockingIOError included: nothing more is queued
            break
    messages: list[tuple[Any, list[int]]] = []
    try:
        for payload, fds in reader.frames():
            try:
                messages.append((decode(payload), fds))
            except ChannelError:
                close_fds(fds)
    except ChannelError:
        pass
    reader.discard()
    return messages
