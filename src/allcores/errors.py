"""The root of every exception allcores raises.

Each layer defines its own errors under `AllcoresError`, so ``except AllcoresError``
catches anything that allcores itself decided to raise, and nothing else.
"""

from __future__ import annotations


class AllcoresError(Exception):
    """Base class of every error raised by allcores."""


class ChannelError(AllcoresError):
    """A channel between two processes broke: the peer went away or sent a bad frame."""


class ChannelClosed(ChannelError):
    """The channel is closed; nothing more can be sent or received on it."""


class MissingDependencyError(AllcoresError, ImportError):
    """An optional dependency is not installed; the message names the extra to install."""


class RemoteTraceback(Exception):
    """The traceback of an exception raised in a worker, attached as ``__cause__``."""

    def __init__(self, tb: str) -> None:
        self.tb = tb
        super().__init__(tb)

    def __str__(self) -> str:
        return self.tb
