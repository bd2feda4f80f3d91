"""Framed messages between processes over socketpairs, with fds passed alongside.

Where each part lives::

    frames.py          the wire format: header, payload encoding, fds as SCM_RIGHTS,
                       the reader that splits a byte stream into frames, read_unread
    channel.py         channel_pair() and `Channel`, the blocking end (a child process)
    async_channel.py   `AsyncChannel`, the event-loop end, and the calls by which
                       another thread borrows its socket while the loop is paused
"""

from allcores.ipc.async_channel import AsyncChannel
from allcores.ipc.channel import Channel, channel_pair

__all__ = ["AsyncChannel", "Channel", "channel_pair"]
