"""The wire format: limits checked before sending, and what read_unread recovers."""

from __future__ import annotations

import os
import socket
import struct

import pytest

from allcores.errors import ChannelError
from allcores.ipc.channel import Channel, channel_pair
from allcores.ipc.frames import read_unread


def test_oversized_fd_list_is_refused_before_sending() -> None:
    a, b = channel_pair()
    left = Channel(a)
    with pytest.raises(ChannelError, match="at most"):
        left.send("x", list(range(100)))
    left.close()
    b.close()


def test_read_unread_recovers_whole_messages_and_their_fds() -> None:
    a, b = channel_pair()
    left = Channel(a)
    r, w = os.pipe()
    try:
        left.send("first", [w])
        left.send("second")
        got = read_unread(b)
        assert [obj for obj, _fds in got] == ["first", "second"]
        assert len(got[0][1]) == 1 and got[1][1] == []
        os.write(got[0][1][0], b"!")
        assert os.read(r, 1) == b"!"
        os.close(got[0][1][0])
    finally:
        os.close(r)
        os.close(w)
        left.close()
        b.close()


def test_read_unread_of_a_stream_that_is_not_frames_closes_its_fds() -> None:
    a, b = channel_pair()
    r, w = os.pipe()
    try:
        a.sendmsg(
            [b"\xde\xad\xbe\xef" * 4],
            [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", w))],
        )
        os.close(w)
        assert read_unread(b) == []
        assert os.read(r, 1) == b""  # the fd that came with it was closed, not leaked
    finally:
        os.close(r)
        a.close()
        b.close()
