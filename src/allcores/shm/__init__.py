"""Shared memory with one owner and no name (see `segment`), and `SharedArray` (see `array`)."""

from allcores.shm.array import ArrayLock, SharedArray, SharedArrayError
from allcores.shm.segment import Segment, SegmentError, fd_transfer, received_fds

__all__ = [
    "ArrayLock",
    "Segment",
    "SegmentError",
    "SharedArray",
    "SharedArrayError",
    "fd_transfer",
    "received_fds",
]
