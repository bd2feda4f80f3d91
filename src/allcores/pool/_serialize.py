"""How functions, arguments and results become bytes, and large buffers shared memory.

::

    parent                                             worker
    dump_function(fn)  cached per function object  ─►  load_function(blob), cached per blob
      importable: pickled by reference (module + name, a few dozen bytes)
      lambda, closure, __main__: pickled by value with cloudpickle
    pack(obj) ─ pickle protocol 5 ─┬─ small buffers in band ──────► unpack(payload, fds)
                                   └─ buffers >= OOB_THRESHOLD ─► one memfd Segment,
                                      written with pwrite, its fd sent with the frame
                                      (SCM_RIGHTS); the reader maps it: numpy arrays come
                                      back as views of it, bytes with one copy

A packed message is ``_HEAD`` (kind, buffer count, user fd count, task id, seconds),
then one 8-byte size per out-of-band buffer, then the pickle. The frame's fds are the
fds of `Segment` objects found inside the pickle (see `allcores.shm.segment`), then the
out-of-band segment's fd if there is one. Nothing is ever named in ``/dev/shm``.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import struct
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import cloudpickle

from allcores.shm.segment import Segment, fd_transfer, received_fds

__all__ = [
    "OOB_THRESHOLD",
    "Packed",
    "dump_function",
    "load_function",
    "pack",
    "unpack",
    "wrap_large_bytes",
]

# Buffers from this size up travel through a memfd segment instead of the socket.
# Measured on the 2-core dev box (Python 3.11, /tmp/oob_threshold.py, one round trip
# of a bytearray through a pool worker): at 64 KiB in-band and memfd are level
# (~95 µs each); at 256 KiB memfd wins by ~1.4x and at 1 MiB by ~2.5x, because the
# socket copies the data twice each way and memfd + pwrite/mmap once, whereas below
# 64 KiB the memfd_create/ftruncate/mmap/munmap syscalls cost more than the copy saves.
OOB_THRESHOLD = 64 * 1024

_HEAD = struct.Struct("=BxHHxxqd")
HEAD_SIZE = _HEAD.size

# Keeps the pickled form of each function object the pool has seen, so a hot loop
# pays the pickling (and cloudpickle's much higher price) once per function.
_FUNCTION_BLOBS: weakref.WeakKeyDictionary[Any, bytes] = weakref.WeakKeyDictionary()
# The worker's side: blob -> function. Bounded so a program that makes a new lambda
# per task cannot grow the worker without limit; 512 distinct functions in rotation
# is far more than real programs use, and a miss only costs one unpickle.
_LOADED_FUNCTIONS: dict[bytes, Callable[..., Any]] = {}
_LOADED_FUNCTIONS_MAX = 512


def _needs_by_value(fn: Any) -> bool:
    return getattr(fn, "__module__", None) in ("__main__", "__mp_main__", None)


def dump_function(fn: Callable[..., Any]) -> bytes:
    """Pickle *fn* by reference when a worker can import it, by value otherwise.

    Functions of ``__main__`` always go by value: a worker forked earlier, or one
    started by forkserver or spawn, or any worker of a REPL or notebook, does not
    have a ``__main__`` that defines them.
    """
    try:
        return _FUNCTION_BLOBS[fn]
    except (KeyError, TypeError):
        pass
    blob = None
    if not _needs_by_value(fn):
        try:
            blob = pickle.dumps(fn, protocol=5)
        except (pickle.PicklingError, TypeError, AttributeError):
            blob = None
    if blob is None:
        blob = cloudpickle.dumps(fn, protocol=5)
    # Not weak-referenceable (a builtin, a partial): pickled again next time.
    with contextlib.suppress(TypeError):
        _FUNCTION_BLOBS[fn] = blob
    return blob


def load_function(blob: bytes) -> Callable[..., Any]:
    fn = _LOADED_FUNCTIONS.get(blob)
    if fn is None:
        fn = pickle.loads(blob)
        if len(_LOADED_FUNCTIONS) >= _LOADED_FUNCTIONS_MAX:
            _LOADED_FUNCTIONS.clear()
        _LOADED_FUNCTIONS[blob] = fn
    return fn


class _OutOfBand:
    """Pickles a large `bytes`, `bytearray` or `memoryview` as an out-of-band buffer.

    Pickle only sends `PickleBuffer` objects out of band: bytes and bytearray go in
    band by themselves, and a memoryview does not pickle at all (it arrives as bytes).
    """

    __slots__ = ("data", "kind")

    def __init__(self, data: bytes | bytearray | memoryview) -> None:
        self.data = data
        self.kind: type = bytearray if type(data) is bytearray else bytes

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, ...]:
        data = self.data
        if type(data) is memoryview and not data.contiguous:
            data = data.tobytes()
        return self.kind, (pickle.PickleBuffer(data),)


_OUT_OF_BAND_TYPES = (bytes, bytearray, memoryview)


def _wants_out_of_band(value: Any) -> bool:
    kind = type(value)
    if kind is memoryview:
        return True  # It cannot be pickled otherwise, whatever its size.
    return (kind is bytes or kind is bytearray) and len(value) >= OOB_THRESHOLD


def wrap_large_bytes(values: Sequence[Any]) -> tuple[Any, ...]:
    """*values* with each top-level bytes-like of OOB_THRESHOLD or more made out-of-band."""
    out = tuple(values)
    for value in out:
        if type(value) in _OUT_OF_BAND_TYPES and _wants_out_of_band(value):
            return tuple(_OutOfBand(v) if _wants_out_of_band(v) else v for v in out)
    return out


def large_bytes(value: Any) -> Any:
    if type(value) in _OUT_OF_BAND_TYPES and _wants_out_of_band(value):
        return _OutOfBand(value)
    return value


class Packed:
    """One message ready for a channel: payload, fds, and what must live until it is done."""

    __slots__ = ("fds", "payload", "segment", "user_fds")

    def __init__(self, payload: bytes, user_fds: list[int], segment: Segment | None) -> None:
        self.payload = payload
        self.user_fds = user_fds
        self.segment = segment
        self.fds = [*user_fds, segment.fd] if segment is not None else user_fds

    def close(self) -> None:
        """Release this side's fds; a receiver keeps its own copies."""
        for fd in self.user_fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.user_fds = []
        self.fds = []
        if self.segment is not None:
            self.segment.close()
            self.segment = None


def _dumps(obj: Any, oob: list[pickle.PickleBuffer]) -> bytes:
    def keep_large_out_of_band(buf: pickle.PickleBuffer) -> bool:
        if buf.raw().nbytes >= OOB_THRESHOLD:
            oob.append(buf)
            return False
        return True

    try:
        return pickle.dumps(obj, protocol=5, buffer_callback=keep_large_out_of_band)
    except (pickle.PicklingError, TypeError, AttributeError):
        # A lambda or local class inside the arguments: cloudpickle handles those.
        oob.clear()
        data: bytes = cloudpickle.dumps(obj, protocol=5, buffer_callback=keep_large_out_of_band)
        return data


def pack(kind: int, task_id: int, obj: Any, seconds: float = 0.0) -> Packed:
    """Pickle *obj* into a message; raises what pickling raises (nothing is left open)."""
    oob: list[pickle.PickleBuffer] = []
    with fd_transfer() as seen_fds:
        body = _dumps(obj, oob)
        user_fds = [os.dup(fd) for fd in seen_fds]
    if not oob:
        return Packed(_HEAD.pack(kind, 0, len(user_fds), task_id, seconds) + body, user_fds, None)
    sizes = [buf.raw().nbytes for buf in oob]
    try:
        segment = Segment.create(sum(sizes), name="allcores-pool")
    except BaseException:
        for fd in user_fds:
            os.close(fd)
        raise
    try:
        offset = 0
        for buf, size in zip(oob, sizes, strict=True):
            view = buf.raw()
            done = 0
            while done < size:
                done += os.pwrite(segment.fd, view[done:], offset + done)
            offset += size
    except BaseException:
        segment.close()
        for fd in user_fds:
            os.close(fd)
        raise
    head = _HEAD.pack(kind, len(sizes), len(user_fds), task_id, seconds)
    return Packed(head + struct.pack(f"={len(sizes)}Q", *sizes) + body, user_fds, segment)


def read_head(payload: bytes | bytearray) -> tuple[int, int, int, int, float]:
    """(kind, buffer count, user fd count, task id, seconds) of a packed message."""
    kind, nbuf, nuser, task_id, seconds = _HEAD.unpack_from(payload)
    return kind, nbuf, nuser, task_id, seconds


def unpack(payload: bytes | bytearray, fds: list[int]) -> Any:
    """The object of a packed message; consumes (closes) *fds* in every case."""
    _kind, nbuf, nuser, _task_id, _seconds = _HEAD.unpack_from(payload)
    offset = HEAD_SIZE
    segment = None
    try:
        buffers = None
        if nbuf:
            sizes = struct.unpack_from(f"={nbuf}Q", payload, offset)
            offset += 8 * nbuf
            segment_fd = fds[nuser]
            fds = fds[:nuser]
            segment = Segment.attach(segment_fd, sum(sizes))
            buffers = []
            start = 0
            for size in sizes:
                buffers.append(segment.buf[start : start + size])
                start += size
        body = memoryview(payload)[offset:]
        if nuser:
            with received_fds(fds):
                return pickle.loads(body, buffers=buffers)
        return pickle.loads(body, buffers=buffers)
    finally:
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        if segment is not None:
            # Arrays unpickled as views keep the mapping alive after this.
            segment.close()
