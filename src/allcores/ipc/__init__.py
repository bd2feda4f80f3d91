"""Framed messages between processes over socketpairs (see `channel`)."""

from allcores.ipc.channel import AsyncChannel, Channel, channel_pair

__all__ = ["AsyncChannel", "Channel", "channel_pair"]
