"""The blocking end: round trips with fds, EOF and truncation, and the socketpair."""

from __future__ import annotations

import os
import socket
import struct

import pytest

from allcores.errors import ChannelClosed, ChannelError
from allcores.ipc.channel import Channel, channel_pair


def test_channel_pair_ends_are_close_on_exec() -> None:
    a, b = channel_pair()
    try:
        assert not os.get_inheritable(a.fileno())
        assert not os.get_inheritable(b.fileno())
    finally:
        a.close()
        b.close()


def test_blocking_round_trip_with_fds() -> None:
    a, b = channel_pair()
    left, right = Channel(a), Channel(b)
    r, w = os.pipe()
    try:
        left.send({"n": 1, "data": b"x" * 100_000}, [w])
        obj, fds = right.recv(timeout=5)
        assert obj == {"n": 1, "data": b"x" * 100_000}
        assert len(fds) == 1
        os.write(fds[0], b"ok")
        assert os.read(r, 2) == b"ok"
        os.close(fds[0])
    finally:
        os.close(r)
        os.close(w)
        left.close()
        right.close()


def test_blocking_eof_and_truncation() -> None:
    a, b = channel_pair()
    right = Channel(b)
    a.sendall(struct.pack("!HHI", 0xAC05, 0, 100) + b"only part")
    a.close()
    with pytest.raises(ChannelError, match="truncated"):
        right.recv(timeout=5)
    assert right.closed

    a, b = channel_pair()
    right = Channel(b)
    a.close()
    with pytest.raises(ChannelClosed):
        right.recv(timeout=5)


def test_socket_objects_survive_the_trip() -> None:
    a, b = channel_pair()
    left, right = Channel(a), Channel(b)
    x, y = socket.socketpair()
    left.send("sock", [x.fileno()])
    _, fds = right.recv(timeout=5)
    received = socket.socket(fileno=fds[0])
    received.sendall(b"hello")
    assert y.recv(5) == b"hello"
    for s in (x, y, received):
        s.close()
    left.close()
    right.close()
