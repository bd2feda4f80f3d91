"""Framed messages over a socketpair, with file descriptors passed alongside.

Who sends what to whom::

    parent process (event loop)                         child process
    ───────────────────────────                         ─────────────
    AsyncChannel.send(obj, fds) ──► frame ──────────►  Channel.recv() -> (obj, fds)
      (non-blocking sendmsg; a partial write is          (blocking: the child has
       queued and finished by loop.add_writer)            nothing else to do)
    on_message(obj, fds)  ◄───────── frame ◄─────────  Channel.send(obj, fds)
      (loop.add_reader on the socket: the event
       loop reads it, no helper thread)

A child that runs its own event loop (a cluster worker) uses `AsyncChannel` too.

A frame is an 8-byte header, ``!HHI`` = (magic, number of fds, payload length),
then the payload: by default one object pickled with protocol 5. The fds travel as
SCM_RIGHTS ancillary data attached to the header's bytes; the reader keeps received
fds in arrival order and hands each frame the number its header announces.

A frame with a bad magic or an impossible fd count, or a stream that ends in the
middle of a frame, closes *that* channel with a `ChannelError` that says which;
other channels and the reader's loop carry on. A well-framed payload that does not
unpickle (a class the receiver cannot import) loses only that message: it is
reported, and the channel goes on.

Written by hand rather than with `multiprocessing.connection`: that module has no
fd passing, no event-loop side, and its `recv` on a corrupt stream can block forever.
"""

from __future__ import annotations

import array
import asyncio
import collections
import contextlib
import os
import pickle
import select
import socket
import struct
import time
from collections.abc import Callable, Sequence
from typing import Any

from allcores.errors import ChannelClosed, ChannelError

__all__ = ["AsyncChannel", "Channel", "channel_pair", "read_unread"]

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
MAX_PAYLOAD = 2**32 - 1

OnMessage = Callable[[Any, list[int]], None]
OnClose = Callable[[BaseException | None], None]


def channel_pair() -> tuple[socket.socket, socket.socket]:
    """Return a connected (parent, child) pair of AF_UNIX stream sockets.

    Both ends are close-on-exec; a child started with `subprocess` gets its end
    through ``pass_fds``, a forked child inherits it.
    """
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    return parent, child


def encode(obj: Any) -> bytes:
    """Pickle *obj* with protocol 5 (the payload of a default frame)."""
    return pickle.dumps(obj, protocol=5)


def frame_header(payload_len: int, nfds: int) -> bytes:
    if payload_len > MAX_PAYLOAD:
        raise ChannelError(
            f"message of {payload_len} bytes is larger than a frame can carry "
            f"({MAX_PAYLOAD}); pass large data through shared memory (allcores.SharedArray)"
        )
    if nfds > MAX_FDS:
        raise ChannelError(f"a message can carry at most {MAX_FDS} fds, got {nfds}")
    return _HEADER.pack(_MAGIC, nfds, payload_len)


def _fds_ancillary(fds: Sequence[int]) -> list[tuple[int, int, bytes]]:
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


def _poller_for(sock: socket.socket) -> select.poll:
    """A poll object watching *sock* for input (not select(): fds past 1023 exist).

    Made whole before it is kept: a Ctrl-C between creating and registering it must
    not leave a poller that watches nothing, on which every later wait sleeps forever.
    """
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    return poller


def _close_fds(fds: Sequence[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


class _FrameReader:
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
        return self.big is not None or len(self.buf) > self.pos

    def discard(self) -> None:
        _close_fds(list(self.fds))
        self.fds.clear()
        self.buf.clear()
        self.big = None


def _decode(payload: bytes | bytearray) -> Any:
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
    reader = _FrameReader()
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
                messages.append((_decode(payload), fds))
            except ChannelError:
                _close_fds(fds)
    except ChannelError:
        pass
    reader.discard()
    return messages


class Channel:
    """The blocking end of a channel, for a child process with nothing else to do.

    ``raw=True`` makes `recv` return the payload bytes unpickled, for callers that
    decode frames themselves (the pool does, to read out-of-band buffers).
    """

    def __init__(self, sock: socket.socket, *, raw: bool = False) -> None:
        self._poller: select.poll | None = None
        self._sock = sock
        self._sock.setblocking(True)
        self._reader = _FrameReader()
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
                sent = self._sock.sendmsg([data], _fds_ancillary(fds))
                if sent < len(data):
                    self._sock.sendall(memoryview(data)[sent:])
            else:
                sent = self._sock.sendmsg([header], _fds_ancillary(fds))
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
            return _decode(payload), fds
        except ChannelError:
            # The framing is intact: this message is lost, the channel is not.
            _close_fds(fds)
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
            poller = self._poller = _poller_for(self._sock)
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
            _close_fds(fds)
        self._ready.clear()
        self._sock.close()

    @property
    def closed(self) -> bool:
        return self._closed


class AsyncChannel:
    """The event-loop end of a channel: the loop itself reads and writes the socket.

    *on_message(obj, fds)* runs in the loop for each frame (the payload bytes when
    ``raw=True``); the receiver owns the fds. *on_close(exc)* runs once when the
    channel ends: ``None`` for a clean EOF or a local `close`, a `ChannelError` for a
    broken or corrupt stream (bad magic, impossible fd count, truncated frame). A
    whole frame whose payload does not unpickle is dropped and reported to
    *on_error(exc)* (default: the loop's exception handler); the channel goes on. An
    exception raised by *on_message* goes to the loop's exception handler; it neither
    closes the channel nor drops other frames.
    """

    def __init__(
        self,
        sock: socket.socket,
        on_message: OnMessage,
        on_close: OnClose | None = None,
        *,
        loop: asyncio.AbstractEventLoop | None = None,
        raw: bool = False,
        on_error: Callable[[ChannelError], None] | None = None,
    ) -> None:
        self._on_error = on_error
        self._sock = sock
        self._sock.setblocking(False)
        self._loop = loop or asyncio.get_running_loop()
        self._on_message = on_message
        self._on_close = on_close
        self._raw = raw
        self._reader = _FrameReader()
        self._out: collections.deque[tuple[memoryview, list[int]]] = collections.deque()
        self._writing = False
        self._closed = False
        self._close_after_flush = False
        # While paused the loop does not read; another thread may (`read_now`).
        self._paused = False
        self._held: list[tuple[bytes | bytearray, list[int]]] = []
        self._poller: select.poll | None = None
        # Set while `read_now` moves bytes from the socket into the frame reader: if
        # an exception (Ctrl-C) cuts it there, bytes may have left the socket without
        # reaching the buffer, and the stream can no longer be trusted.
        self._read_cut = False
        self._send_cut = False
        self._loop.add_reader(sock.fileno(), self._on_readable)

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def pending_writes(self) -> int:
        """Frames waiting for the peer to read (0 when the socket took everything)."""
        return len(self._out)

    @property
    def paused(self) -> bool:
        return self._paused

    @property
    def in_doubt(self) -> bool:
        """True when a `read_now` or `send_now` was cut (by an exception raised
        asynchronously, such as KeyboardInterrupt) while it moved bytes between the
        socket and its buffers: frame boundaries may be lost, in one direction or the
        other, and the stream must not be trusted."""
        return self._read_cut or self._send_cut

    def fileno(self) -> int:
        return self._sock.fileno()

    def send(self, obj: Any, fds: Sequence[int] = ()) -> None:
        self.send_bytes(encode(obj), fds)

    def send_bytes(self, payload: bytes | bytearray | memoryview, fds: Sequence[int] = ()) -> None:
        """Queue one frame. Never blocks; the fds may be closed by the caller after this."""
        if self._closed:
            raise ChannelClosed("channel is closed")
        header = frame_header(len(payload), len(fds))
        # The kernel duplicates fds at sendmsg time; when the write has to wait we keep
        # our own duplicates so the caller may close theirs at once.
        if self._out:
            self._out.append((memoryview(header + bytes(payload)), [os.dup(fd) for fd in fds]))
            return
        data = header + bytes(payload) if len(payload) < 64 * 1024 else None
        try:
            if data is not None:
                sent = self._sock.sendmsg([data], _fds_ancillary(fds))
                rest = memoryview(data)[sent:]
            else:
                sent = self._sock.sendmsg([header, payload], _fds_ancillary(fds))
                rest = memoryview(header + bytes(payload))[sent:]
        except BlockingIOError:
            self._out.append((memoryview(header + bytes(payload)), [os.dup(fd) for fd in fds]))
            self._start_writing()
            return
        except OSError as exc:
            self._fail(ChannelClosed(f"peer closed the channel ({exc})"))
            raise ChannelClosed(f"peer closed the channel ({exc})") from exc
        if len(rest):
            self._out.append((rest, []))
            self._start_writing()

    def send_now(self, payload: bytes | bytearray | memoryview, fds: Sequence[int] = ()) -> bool:
        """Send one whole frame at once from any thread, or nothing (False).

        For a caller that knows no other thread sends on this channel meanwhile (the
        pool's direct submit). Nothing is sent while frames wait to be written or
        when the socket cannot take this one now. The rest of a partial write, which
        an empty socket buffer never gives for a small frame, is left to the loop.
        """
        if self._closed or self._out:
            return False
        data = frame_header(len(payload), len(fds)) + bytes(payload)
        self._send_cut = True  # like _read_cut, for a frame half written
        try:
            sent = self._sock.sendmsg([data], _fds_ancillary(fds))
        except OSError:  # BlockingIOError included; a broken peer is the loop's to see
            self._send_cut = False
            return False
        if sent < len(data):
            self._loop.call_soon_threadsafe(self._send_rest, memoryview(data)[sent:])
        self._send_cut = False
        return True

    def _send_rest(self, rest: memoryview) -> None:
        if not self._closed:
            self._out.appendleft((rest, []))
            self._start_writing()

    def pause_reading(self) -> None:
        """Stop reading in the loop (loop thread); `read_now` may read meanwhile."""
        if not self._paused and not self._closed:
            self._paused = True
            self._loop.remove_reader(self._sock.fileno())

    def resume_reading(self) -> None:
        """Read in the loop again (loop thread), starting with frames `read_now` held."""
        if not self._paused or self._closed:
            return
        self._paused = False
        self._loop.add_reader(self._sock.fileno(), self._on_readable)
        held, self._held = self._held, []
        for payload, fds in held:
            self._deliver_frame(payload, fds)
        if self._reader.mid_frame() or self._read_cut:
            # What a cut or failed `read_now` left in the buffer: no new bytes may come
            # to make the loop look at it.
            self._loop.call_soon(self._on_buffered)

    def read_now(self, timeout: float | None) -> tuple[bytes | bytearray, list[int]] | None:
        """One raw frame, read by a thread other than the loop's while reading is paused.

        None when *timeout* passes first. Raises ChannelClosed at EOF and ChannelError
        on a corrupt stream; neither closes the channel: the loop finds the same state
        when it resumes reading, and ends the channel then. Frames read beyond the
        first wait for `resume_reading`. Only one thread may call it at a time.
        """
        if self._held:
            return self._held.pop(0)
        if self._closed:
            raise ChannelClosed("channel is closed")
        reader = self._reader
        poller = self._poller
        if poller is None:
            poller = self._poller = _poller_for(self._sock)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if reader.mid_frame():
                self._read_cut = True  # a cut here can lose the fds of a frame
                frames = reader.frames()
                self._read_cut = False
                if frames:
                    self._held.extend(frames[1:])
                    return frames[0]
            wait_ms = None
            if deadline is not None:
                wait_ms = max(0, int((deadline - time.monotonic()) * 1000 + 0.999))
            if not poller.poll(wait_ms):
                return None
            self._read_cut = True
            try:
                got = reader.read_from(self._sock)
            except (BlockingIOError, InterruptedError):
                self._read_cut = False
                continue
            except OSError as exc:
                raise ChannelClosed(f"channel broke while reading ({exc})") from exc
            self._read_cut = False
            if not got:
                raise ChannelClosed("peer closed the channel")

    def _start_writing(self) -> None:
        if not self._writing:
            self._writing = True
            self._loop.add_writer(self._sock.fileno(), self._on_writable)

    def _on_writable(self) -> None:
        while self._out:
            data, fds = self._out[0]
            try:
                sent = self._sock.sendmsg([data], _fds_ancillary(fds))
            except BlockingIOError:
                return
            except OSError as exc:
                self._fail(ChannelClosed(f"peer closed the channel ({exc})"))
                return
            _close_fds(fds)
            if sent < len(data):
                self._out[0] = (data[sent:], [])
                return
            self._out.popleft()
        self._writing = False
        self._loop.remove_writer(self._sock.fileno())
        if self._close_after_flush:
            self.close()

    def _on_readable(self) -> None:
        if self._closed:
            return
        reader = self._reader
        try:
            eof = not reader.read_from(self._sock)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._fail(ChannelError(f"channel broke while reading ({exc})"))
            return
        if eof:
            if reader.mid_frame():
                self._fail(ChannelError("truncated frame: the peer closed the channel mid-message"))
            else:
                self._fail(None)
            return
        self._deliver_buffered()

    def _on_buffered(self) -> None:
        if self._closed or self._paused:
            return
        if self._read_cut:
            self._fail(ChannelError("a read was cut between the socket and its buffer"))
            return
        self._deliver_buffered()

    def _deliver_buffered(self) -> None:
        try:
            frames = self._reader.frames()
        except ChannelError as exc:
            self._fail(exc)
            return
        for payload, fds in frames:
            self._deliver_frame(payload, fds)

    def _deliver_frame(self, payload: bytes | bytearray, fds: list[int]) -> None:
        if self._closed:
            _close_fds(fds)
            return
        if self._raw:
            self._deliver(payload, fds)
            return
        try:
            obj = _decode(payload)
        except ChannelError as exc:
            # The framing is intact: drop this message, keep the channel.
            _close_fds(fds)
            self._report(exc)
            return
        self._deliver(obj, fds)

    def _report(self, exc: ChannelError) -> None:
        if self._on_error is not None:
            self._on_error(exc)
        else:
            self._loop.call_exception_handler({"message": str(exc), "exception": exc})

    def _deliver(self, obj: Any, fds: list[int]) -> None:
        # A handler's bug must not drop the frames read with this one.
        try:
            self._on_message(obj, fds)
        except Exception as exc:
            self._loop.call_exception_handler(
                {"message": "allcores channel message handler raised", "exception": exc}
            )

    def _fail(self, exc: BaseException | None) -> None:
        if self._closed:
            return
        self._teardown()
        if self._on_close is not None:
            self._on_close(exc)

    def _teardown(self) -> None:
        self._closed = True
        fd = self._sock.fileno()
        if fd >= 0:
            self._loop.remove_reader(fd)
            if self._writing:
                self._loop.remove_writer(fd)
        for _data, fds in self._out:
            _close_fds(fds)
        self._out.clear()
        for _payload, fds in self._held:
            _close_fds(fds)
        self._held.clear()
        self._reader.discard()
        self._sock.close()

    def close(self, *, flush: bool = False) -> None:
        """Close now (or, with ``flush=True``, once queued frames are written)."""
        if self._closed:
            return
        if flush and self._out:
            self._close_after_flush = True
            return
        self._fail(None)
