"""uvicorn's HTTP protocol, taught to hand its connection on instead of closing it.

When a worker drains during a reload (or a scale-down), uvicorn's own `shutdown()`
closes every idle keep-alive connection at once. A client that sent its next request
at that moment sees the connection close under it: the failed requests that every
reload of uvicorn or gunicorn costs under load. Here, instead::

    shutdown() (the worker starts draining)
      ├─ idle (between requests, nothing read, all written)
      │     └─► cluster.worker.hand_off(): the fd goes to the primary, which passes
      │         it to another worker; what the client sends next is still in the
      │         socket and goes with it
      ├─ a request in flight ─► answered; at on_response_complete, idle: hand on
      └─ a WebSocket ─► uvicorn's WebSocket shutdown (close code 1012)

When the cluster stops rather than goes on, or the connection is TLS (its session
cannot move with the socket), uvicorn's own shutdown runs: idle connections close,
the request in flight gets ``Connection: close``. Only the httptools protocol knows
where one request ends and the next begins in the way this needs; with ``--http h11``
uvicorn's shutdown runs.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from allcores.cluster.worker import WorkerRuntime

__all__ = ["with_hand_off"]

# While its last response is still being written, a draining connection is looked
# at again this often: a slow reader's response, not worth a callback of its own.
_RECHECK = 0.01


def with_hand_off(protocol_class: type[Any], runtime: WorkerRuntime) -> type[Any]:
    """*protocol_class* itself, or (httptools) a subclass that hands idle
    connections on while the worker drains."""
    if not issubclass(protocol_class, HttpToolsProtocol):
        return protocol_class

    class HandOffProtocol(protocol_class):  # type: ignore[misc, valid-type]
        _reading = False  # between the start and the end of a request
        _draining = False

        def on_message_begin(self) -> None:
            self._reading = True
            super().on_message_begin()

        def on_message_complete(self) -> None:
            super().on_message_complete()
            self._reading = False
            if self._draining:
                # Not from inside the parser: the rest of this read may begin the
                # next request, which must be parsed first.
                self.loop.call_soon(self._hand_off_when_idle)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if self._draining:
                self._hand_off_when_idle()

        def shutdown(self) -> None:
            upgraded = self.transport.get_protocol()
            if upgraded is not self:
                shutdown = getattr(upgraded, "shutdown", None)
                if callable(shutdown):
                    shutdown()
                return
            self._draining = True
            tls = self.transport.get_extra_info("ssl_object") is not None
            if not runtime.handing_off or tls:
                super().shutdown()  # a TLS session cannot move with its socket
                return
            self._hand_off_when_idle()

        def _idle(self) -> bool:
            return (
                not self._reading
                and not self.pipeline
                and (self.cycle is None or self.cycle.response_complete)
            )

        def _hand_off_when_idle(self) -> None:
            transport: asyncio.Transport = self.transport
            if transport.is_closing() or not self._idle():
                return
            if transport.get_write_buffer_size():
                self.loop.call_later(_RECHECK, self._hand_off_when_idle)
                return
            if not runtime.hand_off(self, transport):
                transport.close()

        def handle_websocket_upgrade(self) -> None:
            super().handle_websocket_upgrade()
            # The WebSocket protocol now gets the transport's events; its end is
            # this connection's end too (the worker counts it, and waits for it).
            websocket = self.transport.get_protocol()
            lost = websocket.connection_lost

            def connection_lost(exc: Exception | None) -> None:
                try:
                    lost(exc)
                finally:
                    self.connection_lost(exc)

            websocket.connection_lost = connection_lost

    return HandOffProtocol
