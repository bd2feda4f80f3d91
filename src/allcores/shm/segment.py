"""Shared-memory segments with one owner and no name.

A `Segment` is anonymous memory from ``memfd_create``: it has no path, so nothing
can ever be left in ``/dev/shm``, whoever dies first. The kernel frees it when the
last fd and the last mapping of it are gone.

How a segment reaches another process::

    owner                                              attacher
    Segment.create(size) ─ pickle (inside fd_transfer) ─► index into the frame's fds
                          └─ fd as SCM_RIGHTS on the channel ─► Segment.attach(fd)
    pickle elsewhere (no fd_transfer active): the handle names /proc/<owner>/fd/<n>,
    which the attacher opens while the owner is alive (same user).

Attachers never unlink (there is nothing to unlink) and never touch
`multiprocessing.resource_tracker`, so no "leaked shared_memory" warning can appear.
"""

from __future__ import annotations

import contextlib
import contextvars
import mmap
import os
from collections.abc import Iterator
from typing import Any

from allcores.errors import AllcoresError

__all__ = ["Segment", "SegmentError", "fd_transfer", "received_fds"]


class SegmentError(AllcoresError):
    """A shared-memory segment could not be created or attached."""


# While a channel pickles a message, segments append their fds here and pickle only an
# index; while it unpickles one, the fds that came with the frame are read from here.
_OUTGOING: contextvars.ContextVar[list[int] | None] = contextvars.ContextVar(
    "allcores_outgoing_fds", default=None
)
_INCOMING: contextvars.ContextVar[list[int] | None] = contextvars.ContextVar(
    "allcores_incoming_fds", default=None
)


@contextlib.contextmanager
def fd_transfer() -> Iterator[list[int]]:
    """Collect the fds of segments pickled inside this block (send them with the frame)."""
    fds: list[int] = []
    token = _OUTGOING.set(fds)
    try:
        yield fds
    finally:
        _OUTGOING.reset(token)


@contextlib.contextmanager
def received_fds(fds: list[int]) -> Iterator[None]:
    """Make a frame's fds available to segments unpickled inside this block."""
    token = _INCOMING.set(fds)
    try:
        yield
    finally:
        _INCOMING.reset(token)


class Segment:
    """A block of anonymous shared memory, mapped read-write into this process."""

    __slots__ = ("_closed", "_fd", "_map", "_owner", "_view", "size")

    def __init__(self, fd: int, size: int, *, owner: bool) -> None:
        self._fd = fd
        self.size = size
        self._owner = owner
        self._closed = False
        # mmap refuses length 0; a zero-size segment still gets a valid (empty) view.
        self._map = mmap.mmap(fd, max(size, 1), mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self._view = memoryview(self._map)[:size]

    @classmethod
    def create(cls, size: int, *, name: str = "allcores") -> Segment:
        if size < 0:
            raise SegmentError(f"segment size must be >= 0, got {size}")
        try:
            fd = os.memfd_create(name, os.MFD_CLOEXEC)
        except (AttributeError, OSError) as exc:
            raise SegmentError(
                f"cannot create anonymous shared memory (memfd_create): {exc}"
            ) from exc
        try:
            os.ftruncate(fd, max(size, 1))
            return cls(fd, size, owner=True)
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def attach(cls, fd: int, size: int) -> Segment:
        """Map a segment whose fd this process received; the segment now owns *fd*."""
        try:
            return cls(fd, size, owner=False)
        except (OSError, ValueError) as exc:
            os.close(fd)
            raise SegmentError(f"cannot map shared memory fd {fd} ({size} bytes): {exc}") from exc

    @property
    def fd(self) -> int:
        if self._closed:
            raise SegmentError("segment is closed")
        return self._fd

    @property
    def buf(self) -> memoryview:
        if self._closed:
            raise SegmentError("segment is closed")
        return self._view

    @property
    def owner(self) -> bool:
        return self._owner

    def close(self) -> None:
        """Unmap and close; memory others still map stays valid for them.

        Views handed out earlier (numpy arrays, memoryview slices) keep the mapping
        alive until they are dropped; the fd is closed at once either way.
        """
        if self._closed:
            return
        self._closed = True
        self._view.release()
        # Someone may still hold a view: then the mapping lives until it is collected.
        with contextlib.suppress(BufferError):
            self._map.close()
        os.close(self._fd)

    def __enter__(self) -> Segment:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __reduce__(self) -> tuple[Any, ...]:
        return _rebuild_segment, (reduce_fd(self.fd), self.size)

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"fd={self._fd}"
        return f"<Segment {self.size} bytes {state} {'owner' if self._owner else 'attached'}>"


def reduce_fd(fd: int) -> _FdHandle:
    """A picklable reference to *fd* that `_fd_from_handle` turns back into an fd."""
    outgoing = _OUTGOING.get()
    if outgoing is not None:
        outgoing.append(fd)
        return _FdHandle(index=len(outgoing) - 1, pid=os.getpid(), fd=fd)
    return _FdHandle(index=-1, pid=os.getpid(), fd=fd)


class _FdHandle:
    """How a segment's fd is named inside a pickle."""

    __slots__ = ("fd", "index", "pid")

    def __init__(self, index: int, pid: int, fd: int) -> None:
        self.index = index
        self.pid = pid
        self.fd = fd

    def __reduce__(self) -> tuple[Any, ...]:
        return _FdHandle, (self.index, self.pid, self.fd)

    def open(self) -> int:
        incoming = _INCOMING.get()
        if self.index >= 0 and incoming is not None and self.index < len(incoming):
            # Take ownership of the received fd: a dup keeps the frame's list valid
            # for other objects, and the receiver closes the originals.
            return os.dup(incoming[self.index])
        if self.pid == os.getpid():
            return os.dup(self.fd)
        try:
            return os.open(f"/proc/{self.pid}/fd/{self.fd}", os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise SegmentError(
                f"cannot open shared memory of process {self.pid} (fd {self.fd}): {exc}; "
                "the owner must be alive, and the segment passed through an allcores "
                "channel or pool task"
            ) from exc


def _rebuild_segment(handle: _FdHandle, size: int) -> Segment:
    return Segment.attach(handle.open(), size)
