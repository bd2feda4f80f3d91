"""What the primary does with each frame a worker sends it (`messages.py` lists them).

The handlers only update the worker's handle and the hand-over, and emit Node's
events; a worker's exit is for the supervision loop (`primary.py`), never decided here.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import TYPE_CHECKING, Any

from allcores.cluster import messages
from allcores.cluster.handle import Worker
from allcores.errors import ChannelError
from allcores.observe.scoreboard import RowState

if TYPE_CHECKING:
    from allcores.cluster.primary import Primary

__all__ = ["Inbox"]

log = logging.getLogger("allcores.cluster")


class Inbox:
    """The primary's side of every worker's channel."""

    def __init__(self, primary: Primary) -> None:
        self._primary = primary

    def on_message(self, worker: Worker, frame: Any, fds: list[int]) -> None:
        primary = self._primary
        kind = messages.kind_of(frame)
        if kind == messages.MSG:
            handle = socket.socket(fileno=fds[0]) if fds else None
            for extra in fds[1:]:
                os.close(extra)
            primary._emit_both("message", worker, frame.get("data"), handle)
            return
        if kind == messages.CONN_BACK:
            primary._handover.take_back(worker, frame, fds)
            return
        for fd in fds:
            os.close(fd)
        if kind == messages.ONLINE:
            worker.state = "online"
            primary.scoreboard.row(worker.row).set("state", RowState.READY)
            primary._emit_both("online", worker)
        elif kind == messages.LISTEN:
            self._on_listen(worker, frame)
        elif kind == messages.UNLISTEN:
            primary._forget_listening(worker)
        elif kind == messages.BYE:
            # The worker closes its end after this; with the primary holding a
            # reference to that end no EOF would tell us, so the worker says so.
            if worker._channel is not None:
                worker._channel.close()
        elif kind == messages.DISCONNECTING:
            worker.exited_after_disconnect = True
            worker.state = "disconnecting"
            primary._start_draining(worker)
            primary._arm_kill_timer(worker)
        else:
            log.warning("allcores: worker %d sent an unknown message %r; ignored", worker.id, frame)

    def _on_listen(self, worker: Worker, request: dict[str, Any]) -> None:
        primary = self._primary
        refuse = primary.stopping or worker.state in ("disconnecting", "disconnected")
        address = primary._handover.listen(worker, request, refuse=refuse)
        if address is None:
            return
        worker.state = "listening"
        worker.listening_once = True
        if worker._stderr is not None:
            worker._stderr.release()
        primary._emit_both("listening", worker, address)

    def on_bad_message(self, worker: Worker, exc: ChannelError) -> None:
        log.error("allcores: worker %d sent a message that was dropped: %s", worker.id, exc)
        worker.emit("error", exc)

    def on_closed(self, worker: Worker, exc: BaseException | None) -> None:
        primary = self._primary
        if isinstance(exc, ChannelError):
            log.error("allcores: channel to worker %d broke: %s", worker.id, exc)
            worker.emit("error", exc)
        primary._forget_listening(worker)
        if worker.state != "dead":
            worker.state = "disconnected"
        primary._emit_both("disconnect", worker)
        if worker.exited_after_disconnect:
            primary._arm_kill_timer(worker)
