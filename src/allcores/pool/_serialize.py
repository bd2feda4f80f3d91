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

A packed message is ``_HEAD`` (kind, part count, user fd count, region count, task
id, seconds), then one 8-byte size per out-of-band part, then the pickle. The parts
are pickle's out-of-band buffers (numpy arrays...), read back as views of the
mapped memfd, then the regions (large top-level bytes, bytearray, memoryview),
read back with one pread each. The frame's fds are the
fds of `Segment` objects found inside the pickle (see `allcores.shm.segment`), then the
out-of-band segment's fd if there is one. Nothing is ever named in ``/dev/shm``.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import pickle
import struct
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import cloudpickle

from allcores.pool import _pull
from allcores.shm.segment import _OUTGOING as _OUTGOING_FDS
from allcores.shm.segment import Segment, received_fds

__all__ = [
    "OOB_THRESHOLD",
    "Packed",
    "dump_function",
    "load_function",
    "pack",
    "pack_call",
    "unpack",
    "wrap_large_bytes",
]

# Buffers from this size up travel through a memfd instead of the socket. Measured
# on the 2-core dev box, 2026-11-28 (/tmp/oob_threshold.py: a bytearray argument's
# round trip through one worker, median of 5 x 20, µs, in band vs memfd):
# 64 KiB 396 vs 398, 128 KiB 520 vs 559, 256 KiB 1026 vs 819, 1 MiB 3823 vs 1890,
# 4 MiB 14475 vs 6225. The crossover lies between 128 and 256 KiB: below it the
# memfd_create/ftruncate/pwrite/close syscalls cost more than the socket's copies.
OOB_THRESHOLD = 192 * 1024

# kind, out-of-band parts, Segment fds, of which regions, task id, run seconds.
_HEAD = struct.Struct("=BxHHHqd")
# The kind of a message that carries several others (its task id field: how many).
BATCH = 5
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
    """Sends a large `bytes`, `bytearray` or `memoryview` through the message's memfd.

    Pickle sends only `PickleBuffer` objects out of band (bytes and bytearray go in
    band by themselves, a memoryview does not pickle at all), and a PickleBuffer is
    read back through a mapping: page faults, then a copy. A region is instead
    written with pwrite and read back with one pread into the new object, which on
    the dev box halves the time of a 100 MiB argument (65 ms instead of 130 ms).
    """

    __slots__ = ("data", "mutable")

    def __init__(self, data: bytes | bytearray | memoryview) -> None:
        self.data = data
        self.mutable = type(data) is bytearray

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, ...]:
        data = self.data
        if type(data) is memoryview and not data.contiguous:
            data = data.tobytes()
        regions = _REGIONS_OUT.get()
        if regions is None:  # Pickled outside `pack`: in band.
            return (bytearray if self.mutable else bytes), (bytes(data),)
        pull_from = _PULL_FROM.get()
        if pull_from is not None and type(data) is bytes:
            return _pull.pull_bytes, (pull_from, _pull.address_of(data), len(data))
        regions.append(data)
        return _take_region, (len(regions) - 1, self.mutable)


class SameAsArgument:
    """A worker's result that *is* one of its task's large bytes arguments: the parent
    returns its own object instead of receiving a copy."""

    __slots__ = ("index",)

    def __init__(self, index: int) -> None:
        self.index = index

    def __reduce__(self) -> tuple[Any, ...]:
        return SameAsArgument, (self.index,)


# Linux reads and writes at most this much per call.
_MAX_IO = 0x7FFFF000
_REGIONS_OUT: contextvars.ContextVar[list[Any] | None] = contextvars.ContextVar(
    "allcores_pool_regions_out", default=None
)
_REGIONS_IN: contextvars.ContextVar[tuple[int, list[tuple[int, int]]] | None] = (
    contextvars.ContextVar("allcores_pool_regions_in", default=None)
)


# Set by `pack_call(pull_from=pid)`: large `bytes` arguments travel as an address in
# that process, which the worker copies from itself (`allcores.pool._pull`).
_PULL_FROM: contextvars.ContextVar[int | None] = contextvars.ContextVar(
    "allcores_pool_pull_from", default=None
)


def _take_region(index: int, mutable: bool) -> bytes | bytearray:
    source = _REGIONS_IN.get()
    if source is None:
        raise pickle.UnpicklingError("an out-of-band region was unpickled outside its message")
    fd, spans = source
    offset, size = spans[index]
    if not mutable and size <= _MAX_IO:
        data = os.pread(fd, size, offset)
        if len(data) == size:
            return data
    out = bytearray(size)
    view = memoryview(out)
    done = 0
    while done < size:
        got = os.preadv(fd, [view[done : done + _MAX_IO]], offset + done)
        if got <= 0:
            raise pickle.UnpicklingError("shared memory region ended early")
        done += got
    return out if mutable else bytes(out)


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


def _dumps(obj: Any, oob: list[pickle.PickleBuffer], regions: list[Any]) -> bytes:
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
        regions.clear()
        data: bytes = cloudpickle.dumps(obj, protocol=5, buffer_callback=keep_large_out_of_band)
        return data


# Values that can hold neither a Segment nor a large buffer: they pickle directly.
_PLAIN = frozenset({int, float, str, bool, type(None), complex})


def _is_plain(obj: Any, depth: int = 0) -> bool:
    # Loops, not all() over generators: this runs per task, and they cost 3x as much.
    kind = type(obj)
    if kind in _PLAIN:
        return True
    if kind is bytes:
        return len(obj) < OOB_THRESHOLD
    if depth >= 2:
        return False
    if kind is tuple or kind is list:
        if len(obj) > 16:
            return False
        for item in obj:
            if type(item) not in _PLAIN and not _is_plain(item, depth + 1):
                return False
        return True
    if kind is dict:
        if len(obj) > 16:
            return False
        for key, value in obj.items():
            if type(key) is not str:
                return False
            if type(value) not in _PLAIN and not _is_plain(value, depth + 1):
                return False
        return True
    return False


def pack_call(
    kind: int,
    task_id: int,
    blob: bytes,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    pull_from: int | None = None,
    seconds: float = 0.0,
) -> Packed:
    """`pack` of a call ``(blob, args, kwargs)``, with large bytes arguments out of band.

    *seconds* rides in the head (the shared pool of `allcores serve` sends the time
    the task was queued, to measure its wait).

    With *pull_from* (this process's pid), large `bytes` arguments go as their
    address, for the worker to copy (`allcores.pool._pull`); the caller must keep
    them alive until the reply. Scalar positional arguments skip every check.
    """
    if not kwargs:
        for arg in args:
            if type(arg) not in _PLAIN:
                break
        else:
            return Packed(
                _HEAD.pack(kind, 0, 0, 0, task_id, seconds)
                + pickle.dumps((blob, args, kwargs), protocol=5),
                [],
                None,
            )
    if pull_from is None:
        return pack(kind, task_id, (blob, wrap_large_bytes(args), kwargs), seconds)
    token = _PULL_FROM.set(pull_from)
    try:
        return pack(kind, task_id, (blob, wrap_large_bytes(args), kwargs), seconds)
    finally:
        _PULL_FROM.reset(token)


def pack(kind: int, task_id: int, obj: Any, seconds: float = 0.0) -> Packed:
    """Pickle *obj* into a message; raises what pickling raises (nothing is left open)."""
    if _is_plain(obj):
        # The tiny task's path: no fds or buffers to look for, so none of the
        # context variables below (they cost ~2 µs of a ~4 µs pack).
        return Packed(
            _HEAD.pack(kind, 0, 0, 0, task_id, seconds) + pickle.dumps(obj, protocol=5), [], None
        )
    oob: list[pickle.PickleBuffer] = []
    regions: list[Any] = []
    seen_fds: list[int] = []
    # The context variables behind `fd_transfer`, set directly: the context manager
    # alone cost 3 µs of the 5 µs this took per tiny task.
    fds_token = _OUTGOING_FDS.set(seen_fds)
    regions_token = _REGIONS_OUT.set(regions)
    try:
        body = _dumps(obj, oob, regions)
    finally:
        _REGIONS_OUT.reset(regions_token)
        _OUTGOING_FDS.reset(fds_token)
    user_fds = [os.dup(fd) for fd in seen_fds] if seen_fds else seen_fds
    if not oob and not regions:
        return Packed(
            _HEAD.pack(kind, 0, len(user_fds), 0, task_id, seconds) + body, user_fds, None
        )
    views = [buf.raw() for buf in oob] + [memoryview(region).cast("B") for region in regions]
    sizes = [view.nbytes for view in views]
    try:
        segment = Segment.create(sum(sizes), name="allcores-pool")
    except BaseException:
        for fd in user_fds:
            os.close(fd)
        raise
    try:
        offset = 0
        for view, size in zip(views, sizes, strict=True):
            done = 0
            while done < size:
                done += os.pwrite(segment.fd, view[done : done + _MAX_IO], offset + done)
            offset += size
    except BaseException:
        segment.close()
        for fd in user_fds:
            os.close(fd)
        raise
    head = _HEAD.pack(kind, len(sizes), len(user_fds), len(regions), task_id, seconds)
    return Packed(head + struct.pack(f"={len(sizes)}Q", *sizes) + body, user_fds, segment)


_LENGTH = struct.Struct("=I")


def pack_batch(payloads: list[bytes]) -> bytes:
    """Several fd-less packed messages as one (kind BATCH), for one send and one wake-up."""
    parts = [_HEAD.pack(BATCH, 0, 0, 0, len(payloads), 0.0)]
    for payload in payloads:
        parts.append(_LENGTH.pack(len(payload)))
        parts.append(payload)
    return b"".join(parts)


def unpack_batch(payload: bytes | bytearray) -> list[bytes | bytearray]:
    count = _HEAD.unpack_from(payload)[4]
    view = memoryview(payload)
    out: list[bytes | bytearray] = []
    offset = HEAD_SIZE
    for _ in range(count):
        (length,) = _LENGTH.unpack_from(payload, offset)
        offset += 4
        out.append(bytes(view[offset : offset + length]))
        offset += length
    return out


def read_head(payload: bytes | bytearray) -> tuple[int, int, int, int, float]:
    """(kind, buffer count, user fd count, task id, seconds) of a packed message."""
    kind, nbuf, nuser, _nregions, task_id, seconds = _HEAD.unpack_from(payload)
    return kind, nbuf, nuser, task_id, seconds


def unpack(payload: bytes | bytearray, fds: list[int]) -> Any:
    """The object of a packed message; consumes (closes) *fds* in every case."""
    _kind, nbuf, nuser, nregions, _task_id, _seconds = _HEAD.unpack_from(payload)
    if not nbuf and not nuser and not fds:
        return pickle.loads(memoryview(payload)[HEAD_SIZE:])
    offset = HEAD_SIZE
    segment = None
    segment_fd = -1
    region_token = None
    try:
        buffers = None
        if nbuf:
            sizes = struct.unpack_from(f"={nbuf}Q", payload, offset)
            offset += 8 * nbuf
            segment_fd = fds[nuser]
            fds = fds[:nuser]
            nbuffers = nbuf - nregions
            start = sum(sizes[:nbuffers])
            if nbuffers:
                segment = Segment.attach(os.dup(segment_fd), start)
                buffers = []
                start = 0
                for size in sizes[:nbuffers]:
                    buffers.append(segment.buf[start : start + size])
                    start += size
            spans = []
            for size in sizes[nbuffers:]:
                spans.append((start, size))
                start += size
            region_token = _REGIONS_IN.set((segment_fd, spans))
        body = memoryview(payload)[offset:]
        if nuser:
            with received_fds(fds):
                return pickle.loads(body, buffers=buffers)
        return pickle.loads(body, buffers=buffers)
    finally:
        if region_token is not None:
            _REGIONS_IN.reset(region_token)
        if segment_fd >= 0:
            os.close(segment_fd)
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        if segment is not None:
            # Arrays unpickled as views keep the mapping alive after this.
            segment.close()
