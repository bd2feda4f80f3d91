"""The event-loop end: the loop reads and writes, corrupt peers, and a borrowing thread."""

from __future__ import annotations

import asyncio
import os
import pickle
import socket
import struct
from typing import Any

import pytest

from allcores.errors import ChannelClosed, ChannelError
from allcores.ipc.async_channel import AsyncChannel
from allcores.ipc.channel import Channel, channel_pair
from allcores.ipc.frames import encode


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


async def test_a_thread_reads_and_sends_while_the_loop_is_paused() -> None:
    a, b = channel_pair()
    inbox = Inbox()
    parent = AsyncChannel(a, inbox.on_message, inbox.on_close, raw=True)
    child = Channel(b)
    try:
        parent.pause_reading()
        assert parent.paused
        assert await asyncio.to_thread(parent.read_now, 0) is None  # nothing sent yet
        assert not parent.in_doubt  # nothing was taken
        assert await asyncio.to_thread(parent.send_now, encode("ping"))
        assert (await asyncio.to_thread(child.recv, 5))[0] == "ping"
        child.send("one")
        child.send("two")
        frame = await asyncio.to_thread(parent.read_now, 5)
        assert frame is not None and pickle.loads(frame[0]) == "one"
        assert inbox.messages.empty()  # the loop did not read while paused
        parent.resume_reading()
        payload, _fds = await asyncio.wait_for(inbox.messages.get(), 5)
        assert pickle.loads(payload) == "two"
        assert not parent.paused
        # A frame was taken by the thread: had it been cut, that frame could be lost,
        # until the thread's next send (to a peer that owes it nothing).
        assert parent.in_doubt
        assert await asyncio.to_thread(parent.send_now, encode("next"))
        assert not parent.in_doubt
    finally:
        parent.close()
        child.close()


async def test_a_borrowing_thread_sees_eof_and_the_loop_ends_the_channel() -> None:
    a, b = channel_pair()
    inbox = Inbox()
    parent = AsyncChannel(a, inbox.on_message, inbox.on_close, raw=True)
    try:
        parent.pause_reading()
        b.close()
        with pytest.raises(ChannelClosed):
            await asyncio.to_thread(parent.read_now, 5)
        assert not parent.closed  # the loop ends it, once it reads again
        parent.resume_reading()
        assert await asyncio.wait_for(inbox.closed, 5) is None
        assert parent.closed
    finally:
        parent.close()
