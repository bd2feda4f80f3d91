"""The event-loop end of a channel: the loop itself reads and writes the socket.

Who sends what to whom::

    this process (event loop)                           peer process
    ─────────────────────────                           ────────────
    AsyncChannel.send(obj, fds) ──► frame ──────────►  Channel.recv() -> (obj, fds)
      (non-blocking sendmsg; a partial write is          (or another AsyncChannel)
       queued and finished by loop.add_writer)
    on_message(obj, fds)  ◄───────── frame ◄─────────  Channel.send(obj, fds)
      (loop.add_reader on the socket: the event
       loop reads it, no helper thread)

The parent of a pool worker or a cluster worker holds this end; a child that runs
its own event loop (a cluster worker) uses it too. The frame format and the reader
live in `allcores.ipc.frames`; the blocking end is `allcores.ipc.channel.Channel`.

Another thread may borrow the socket for a while (the pool's caller thread waits
on its own task's reply without a trip through the loop)::

    loop thread                              borrowing thread
    ───────────                              ────────────────
    pause_reading()    the loop stops reading
                                             send_now(frame) -> True, or False: nothing sent
                                             read_now(timeout) -> frame | None
                                               (frames read beyond the first are held)
    resume_reading()   held frames are delivered first, then the loop reads again

The channel does not arbitrate who borrows: the caller makes sure one thread at a
time does, and only while reading is paused (the pool's process backend holds a
lock for that). A borrowing thread cut by an asynchronous exception (Ctrl-C) while
bytes moved between the socket and the buffers leaves the stream `in_doubt`.

A frame with a bad magic or an impossible fd count, or a stream that ends in the
middle of a frame, closes *that* channel with a `ChannelError` that says which;
other channels and the loop carry on. A well-framed payload that does not unpickle
(a class the receiver cannot import) loses only that message: it is reported, and
the channel goes on.
"""

from __future__ import annotations

import asyncio
import collections
import os
import select
import socket
import time
from collections.abc import Callable, Sequence
from typing import Any

from allcores.errors import ChannelClosed, ChannelError
from allcores.ipc.frames import (
    FrameReader,
    close_fds,
    decode,
    encode,
    fds_ancillary,
    frame_header,
    poller_for,
)

__all__ = ["AsyncChannel", "OnClose", "OnMessage"]

# `read_pending` reads at most this many times (each up to the reader's chunk): far
# more than a dead peer's socket buffer holds.
READ_PENDING_MAX = 4096

OnMessage = Callable[[Any, list[int]], None]
OnClose = Callable[[BaseException | None], None]


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

    Another thread may borrow the socket while the loop's reading is paused: see the
    last section of this class, from `pause_reading` on.
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
        self._reader = FrameReader()
        self._out: collections.deque[tuple[memoryview, list[int]]] = collections.deque()
        self._writing = False
        self._closed = False
        self._close_after_flush = False
        # The state of a borrowing thread (the last section of this class). While
        # paused the loop does not read; another thread may (`read_now`).
        self._paused = False
        self._held: list[tuple[bytes | bytearray, list[int]]] = []
        self._poller: select.poll | None = None
        # Set while `read_now` moves bytes from the socket into the frame reader: if
        # an exception (Ctrl-C) cuts it there, bytes may have left the socket without
        # reaching the buffer, and the stream can no longer be trusted.
        self._read_cut = False
        self._send_cut = False  # the same, for `send_now` and a frame half written
        # Set once `read_now` takes a frame, until the borrower's next `send_now`: a
        # thread cut meanwhile may have taken a frame and lost it before handing it
        # on (a stream cannot say which frames it gave out).
        self._taken = False
        self._loop.add_reader(sock.fileno(), self._on_readable)

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def pending_writes(self) -> int:
        """Frames waiting for the peer to read (0 when the socket took everything)."""
        return len(self._out)

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
                sent = self._sock.sendmsg([data], fds_ancillary(fds))
                rest = memoryview(data)[sent:]
            else:
                sent = self._sock.sendmsg([header, payload], fds_ancillary(fds))
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

    def _start_writing(self) -> None:
        if not self._writing:
            self._writing = True
            self._loop.add_writer(self._sock.fileno(), self._on_writable)

    def _on_writable(self) -> None:
        while self._out:
            data, fds = self._out[0]
            try:
                sent = self._sock.sendmsg([data], fds_ancillary(fds))
            except BlockingIOError:
                return
            except OSError as exc:
                self._fail(ChannelClosed(f"peer closed the channel ({exc})"))
                return
            close_fds(fds)
            if sent < len(data):
                self._out[0] = (data[sent:], [])
                return
            self._out.popleft()
        self._writing = False
        self._loop.remove_writer(self._sock.fileno())
        if self._close_after_flush:
            self.close()

    def _on_readable(self) -> None:
        self._read_some()

    def read_pending(self) -> None:
        """Read and deliver all the socket holds now, up to its EOF (loop thread), even
        while paused: for a peer known to be gone, whose last frames must not be
        dropped when the loop ends it before it polled the socket again. Bounded: a
        process that inherited the peer's end could write for ever."""
        for _ in range(READ_PENDING_MAX):
            if not self._read_some():
                return

    def _read_some(self) -> bool:
        """One read, its frames delivered; False once nothing more is there now."""
        if self._closed:
            return False
        reader = self._reader
        try:
            eof = not reader.read_from(self._sock)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as exc:
            self._fail(ChannelError(f"channel broke while reading ({exc})"))
            return False
        if eof:
            if reader.mid_frame():
                self._fail(ChannelError("truncated frame: the peer closed the channel mid-message"))
            else:
                self._fail(None)
            return False
        self._deliver_buffered()
        return True

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
            close_fds(fds)
            return
        if self._raw:
            self._deliver(payload, fds)
            return
        try:
            obj = decode(payload)
        except ChannelError as exc:
            # The framing is intact: drop this message, keep the channel.
            close_fds(fds)
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
            close_fds(fds)
        self._out.clear()
        for _payload, fds in self._held:
            close_fds(fds)
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

    # Another thread borrows the socket (the module docstring shows the steps). The
    # caller sees to it that one thread at a time does.

    @property
    def paused(self) -> bool:
        """True from `pause_reading` to `resume_reading`: the loop does not read."""
        return self._paused

    @property
    def in_doubt(self) -> bool:
        """True when a borrowing thread may have lost something, if it was cut (by an
        exception raised asynchronously, such as KeyboardInterrupt): `read_now` took
        a frame since the last `send_now`, or `read_now` or `send_now` was
        cut while it moved bytes between the socket and its buffers. A reply the
        borrower waited for may then never come, and the stream must not be trusted."""
        return self._taken or self._read_cut or self._send_cut

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

    def _on_buffered(self) -> None:
        if self._closed or self._paused:
            return
        if self._read_cut:
            self._fail(ChannelError("a read was cut between the socket and its buffer"))
            return
        self._deliver_buffered()

    def read_now(self, timeout: float | None) -> tuple[bytes | bytearray, list[int]] | None:
        """One raw frame, read by a thread other than the loop's while reading is paused.

        None when *timeout* passes first. Raises ChannelClosed at EOF and ChannelError
        on a corrupt stream; neither closes the channel: the loop finds the same state
        when it resumes reading, and ends the channel then. Frames read beyond the
        first wait for `resume_reading`. Only one thread may call it at a time.
        """
        if self._held:
            self._taken = True  # first: a cut after the pop must leave it set
            return self._held.pop(0)
        if self._closed:
            raise ChannelClosed("channel is closed")
        reader = self._reader
        poller = self._poller
        if poller is None:
            poller = self._poller = poller_for(self._sock)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if reader.mid_frame():
                self._read_cut = True  # a cut here can lose the fds of a frame
                frames = reader.frames()
                if frames:
                    self._taken = True  # before _read_cut clears: no gap for a cut
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
        # Sent only to a peer that owes nothing: what was read before was dealt with.
        self._taken = False
        self._send_cut = True  # like _read_cut, for a frame half written
        try:
            sent = self._sock.sendmsg([data], fds_ancillary(fds))
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
