"""The HTTP protocol of an `allcores serve` worker: uvicorn's HttpToolsProtocol, plus
what it lacks, in one subclass (one extra call per parser event, not one per feature).

::

    connection made / a request's first byte ── head clock starts (_head_since)
    on_url, on_header ── over the limits: 414 / 431, then close          (limits)
    on_headers_complete ── head clock stops; the request counts in flight (Meter)
    the app's writes in one loop step ── one vectored write (_OneWritePerStep)
    on_response_complete ── answered: sent now, counted, timed into the Meter's histogram
    every second, limits.sweep: a head late past --timeout-header ─► 408, close

    while the worker drains (shutdown()):                                (hand-off)
      idle (between requests, nothing read, all written)
        └─► cluster.worker.hand_off(): the fd goes to the primary, which passes it
            to another worker; what the client sends next is still in the socket
      a request in flight ─► answered; then, idle: handed on
      a WebSocket ─► uvicorn's WebSocket shutdown (close code 1012)
      TLS, or the cluster stopping ─► uvicorn's shutdown: idle ones close, the
            request in flight gets ``Connection: close``

Why hand-off: uvicorn's shutdown closes idle keep-alive connections at once, and a
client that sent its next request at that moment sees the connection close under
it, the failed requests that every reload of uvicorn or gunicorn costs under load.
Only httptools' callbacks say where one request ends and the next begins as this
needs; with ``--http h11`` uvicorn's protocol runs as it is, metered by
`metering.metered` instead.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from allcores.cluster.worker import WorkerRuntime
from allcores.server.limits import answer_and_close
from allcores.server.metering import Meter
from allcores.server.settings import ServeSettings

__all__ = ["serving_protocol"]

# While its last response is still being written, a draining connection is looked
# at again this often: a slow reader's response, not worth a callback of its own.
_RECHECK = 0.01


class _OneWritePerStep:
    """The transport as a connection's requests see it: what they write in one step of
    the loop goes out in one vectored write, at the end of that step.

    uvicorn writes a response's head and its body with a write each, so every small
    response costs two syscalls and two TCP segments, and its client two reads. Here
    the head waits until the body joins it (or, for a streamed response, until the
    step ends); ``close`` and the end of the response send what waits first.
    """

    __slots__ = ("_held", "_loop", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._held: list[bytes] | None = None

    def write(self, data: bytes) -> None:
        if self._held is None:
            self._held = [data]
            self._loop.call_soon(self.flush)
        else:
            self._held.append(data)

    def flush(self) -> None:
        held, self._held = self._held, None
        if held and not self._transport.is_closing():
            self._transport.writelines(held)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class _Refused(Exception):
    """Raised in a parser callback: httptools stops, uvicorn calls send_400_response."""


def serving_protocol(
    protocol_class: type[Any], settings: ServeSettings, runtime: WorkerRuntime, meter: Meter
) -> type[Any] | None:
    """The subclass of *protocol_class* (httptools) that an HTTP worker serves with;
    None for another protocol (h11), which runs as it is."""
    if not issubclass(protocol_class, HttpToolsProtocol):
        return None
    max_line = settings.limit_request_line
    max_field = settings.limit_request_field_size
    max_fields = settings.limit_request_fields

    class ServingProtocol(protocol_class):  # type: ignore[misc, valid-type]
        _head_since: float | None = None
        _refusal: tuple[int, str] | None = None
        _reading = False  # between a request's first byte and its end
        _draining = False

        def connection_made(self, transport: Any) -> None:
            self._head_since = time.monotonic()
            self._began: list[float] = []  # requests answered now, oldest first
            super().connection_made(transport)
            self._writes = _OneWritePerStep(transport, self.loop)

        def connection_lost(self, exc: Exception | None) -> None:
            meter.in_flight -= len(self._began)  # cut off before their answers were complete
            self._began.clear()
            super().connection_lost(exc)

        # -- limits and metering, from the parser's callbacks -------------------

        def on_message_begin(self) -> None:
            self._reading = True
            if self._head_since is None:
                self._head_since = time.monotonic()
            super().on_message_begin()

        def on_url(self, url: bytes) -> None:
            super().on_url(url)
            if len(self.url) > max_line:
                self._refuse(414, f"request line over {max_line} bytes")

        def on_header(self, name: bytes, value: bytes) -> None:
            if len(name) + len(value) > max_field:
                self._refuse(431, f"a header field over {max_field} bytes")
            if len(self.headers) >= max_fields:
                self._refuse(431, f"more than {max_fields} header fields")
            super().on_header(name, value)

        def on_headers_complete(self) -> None:
            self._head_since = None
            cycle = self.cycle
            super().on_headers_complete()
            if self.cycle is not cycle:  # a request to answer (not a WebSocket)
                self.cycle.transport = self._writes
                self._began.append(time.perf_counter())
                meter.in_flight += 1

        def on_message_complete(self) -> None:
            super().on_message_complete()
            self._reading = False
            if self._draining:
                # Not from inside the parser: the rest of this read may begin the
                # next request, which must be parsed first.
                self.loop.call_soon(self._hand_off_when_idle)

        def on_response_complete(self) -> None:
            self._writes.flush()  # now: the connection may be closed or handed on next
            if self._began:
                meter.answered(time.perf_counter() - self._began.pop(0))
            super().on_response_complete()
            if self._draining:
                self._hand_off_when_idle()

        def _refuse(self, status: int, why: str) -> None:
            self._refusal = (status, why)
            raise _Refused(why)

        def send_400_response(self, msg: str) -> None:
            if self._refusal is None:
                super().send_400_response(msg)
            else:
                answer_and_close(self, *self._refusal)

        def head_timed_out(self, timeout: float) -> None:
            self._head_since = None
            if self.cycle is not None and not self.cycle.response_complete:
                return  # a request is being answered: not a head that is late
            answer_and_close(self, 408, f"request head not complete within {timeout:g} s")

        # -- draining: hand idle connections on -----------------------------------

        def shutdown(self) -> None:
            self._writes.flush()
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

    return ServingProtocol
