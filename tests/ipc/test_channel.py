"""Channels: framing, fd passing, and what a broken or corrupt peer does to a reader."""

from __future__ import annotations

import asyncio
import os
import pickle
import socket
import struct
from typing import Any

import pytest

from allcores.errors import ChannelClosed, ChannelError
from allcores.ipc import AsyncChannel, Channel, channel_pair


class Inbox:
    def __init__(self) -> None:
        self.messages: asyncio.Queue[tuple[Any, list[int]]] = asyncio.Queue()
        self.closed: asyncio.Future[BaseException | None] = (
            asyncio.get_running_loop().create_future()
        )

    def on_message(self, obj: Any, fds: list[int]) -> None:
        self.messages.put_nowait((obj, fds))

    def on_close(self, exc: BaseException | None) -> None:
        if not self.closed.done():
            self.closed.set_result(exc)


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


async def test_async_side_reads_with_the_loop_and_passes_fds() -> None:
    a, b = channel_pair()
    inbox = Inbox()
    parent = AsyncChannel(a, inbox.on_message, inbox.on_close)
    child = Channel(b)
    r, w = os.pipe()
    try:
        parent.send("to child", [w])
        obj, fds = await asyncio.to_thread(child.recv, 5)
        assert obj == "to child" and len(fds) == 1
        child.send(("back", 42), fds)
        os.close(fds[0])
        obj, got = await asyncio.wait_for(inbox.messages.get(), 5)
        assert obj == ("back", 42)
        os.write(got[0], b"!")
        assert os.read(r, 1) == b"!"
        os.close(got[0])
        big = bytes(range(256)) * 20_000  # 5 MB: read straight into its own buffer
        sending = asyncio.ensure_future(asyncio.to_thread(child.send, big))
        obj, _ = await asyncio.wait_for(inbox.messages.get(), 5)
        await sending
        assert obj == big
        child.close()
        assert await asyncio.wait_for(inbox.closed, 5) is None
    finally:
        os.close(r)
        os.close(w)
        parent.close()
        child.close()


async def test_async_side_writes_large_frames_without_blocking() -> None:
    a, b = channel_pair()
    inbox = Inbox()
    parent = AsyncChannel(a, inbox.on_message, inbox.on_close)
    child = Channel(b)
    payload = os.urandom(8 << 20)
    parent.send(payload)  # far more than the socket buffer: finished by add_writer
    parent.send("after")
    assert (await asyncio.to_thread(child.recv, 10))[0] == payload
    assert (await asyncio.to_thread(child.recv, 10))[0] == "after"
    parent.close()
    child.close()


@pytest.mark.parametrize(
    ("garbage", "error"),
    [
        (b"\xde\xad\xbe\xef" * 4, "bad magic"),
        (struct.pack("!HHI", 0xAC05, 200, 0), "fds"),
    ],
)
async def test_corrupt_frame_closes_only_that_channel(garbage: bytes, error: str) -> None:
    bad_a, bad_b = channel_pair()
    good_a, good_b = channel_pair()
    bad_inbox, good_inbox = Inbox(), Inbox()
    bad = AsyncChannel(bad_a, bad_inbox.on_message, bad_inbox.on_close)
    good = AsyncChannel(good_a, good_inbox.on_message, good_inbox.on_close)
    try:
        Channel(bad_b).send("fine first")
        assert (await asyncio.wait_for(bad_inbox.messages.get(), 5))[0] == "fine first"
        bad_b.sendall(garbage)
        exc = await asyncio.wait_for(bad_inbox.closed, 5)
        assert isinstance(exc, ChannelError) and error in str(exc)
        assert bad.closed
        with pytest.raises(ChannelClosed):
            bad.send("anything")
        # The other channel on the same loop is untouched.
        Channel(good_b).send("still here")
        assert (await asyncio.wait_for(good_inbox.messages.get(), 5))[0] == "still here"
        assert not good.closed
    finally:
        bad.close()
        good.close()
        bad_b.close()
        good_b.close()


async def test_truncated_frame_is_reported_not_hung() -> None:
    a, b = channel_pair()
    inbox = Inbox()
    channel = AsyncChannel(a, inbox.on_message, inbox.on_close)
    b.sendall(struct.pack("!HHI", 0xAC05, 0, 1000) + pickle.dumps("x")[:3])
    b.close()
    exc = await asyncio.wait_for(inbox.closed, 5)
    assert isinstance(exc, ChannelError) and "truncated" in str(exc)
    assert channel.closed


def test_oversized_fd_list_is_refused_before_sending() -> None:
    a, b = channel_pair()
    left = Channel(a)
    with pytest.raises(ChannelError, match="at most"):
        left.send("x", list(range(100)))
    left.close()
    b.close()


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


async def test_a_payload_that_does_not_unpickle_loses_only_that_message() -> None:
    a, b = channel_pair()
    inbox = Inbox()
    errors: list[ChannelError] = []
    channel = AsyncChannel(a, inbox.on_message, inbox.on_close, on_error=errors.append)
    r, w = os.pipe()
    try:
        b.sendmsg(
            [struct.pack("!HHI", 0xAC05, 1, 6) + b"\x80\x05junk"],
            [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", w))],
        )
        Channel(b).send("next")
        assert (await asyncio.wait_for(inbox.messages.get(), 5))[0] == "next"
        assert len(errors) == 1 and "does not unpickle" in str(errors[0])
        assert not channel.closed
        os.close(w)
        assert os.read(r, 1) == b""  # the bad frame's fd was closed, not leaked
    finally:
        os.close(r)
        channel.close()
        b.close()
