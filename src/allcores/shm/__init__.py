"""Shared memory with one owner and no name (see `segment`), and `SharedArray`."""

from allcores.shm.segment import Segment, SegmentError, fd_transfer, received_fds

__all__ = ["Segment", "SegmentError", "fd_transfer", "received_fds"]
