"""Limits on what a client may send before its request is handled: the defence
against slowloris and oversized heads that uvicorn's httptools protocol lacks.

::

    connection made / first byte of a request ─► head clock starts (`_head_since`)
    on_url, on_header ─► over --limit-request-line: 414; a field over
                         --limit-request-field-size or more than
                         --limit-request-fields fields: 431 (then close)
    on_headers_complete ─► head clock stops
    every second, `sweep`: a head not complete after --timeout-header ─► 408, close

A sweep rather than a timer per request: one clock read per request instead of a
timer set and cancelled, and a loop over the open connections once a second.
`quiet_repeats` keeps a flood of bad requests from flooding the log.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from allcores.server.settings import ServeSettings

__all__ = ["RepeatFilter", "sweep", "with_limits"]


class _TooLarge(Exception):
    pass


def with_limits(protocol_class: type[Any], settings: ServeSettings) -> type[Any]:
    """*protocol_class* itself, or (httptools) a subclass that enforces the limits."""
    if not issubclass(protocol_class, HttpToolsProtocol):
        return protocol_class
    max_line = settings.limit_request_line
    max_field = settings.limit_request_field_size
    max_fields = settings.limit_request_fields

    class LimitedProtocol(protocol_class):  # type: ignore[misc, valid-type]
        _head_since: float | None = None
        _refusal: tuple[int, str] | None = None

        def connection_made(self, transport: Any) -> None:
            self._head_since = time.monotonic()
            super().connection_made(transport)

        def on_message_begin(self) -> None:
            if self._head_since is None:
                self._head_since = time.monotonic()
            self._url_size = 0
            super().on_message_begin()

        def on_url(self, url: bytes) -> None:
            self._url_size += len(url)
            if self._url_size > max_line:
                self._refuse(414, f"request line over {max_line} bytes")
            super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            if len(name) + len(value) > max_field:
                self._refuse(431, f"a header field over {max_field} bytes")
            if len(self.headers) >= max_fields:
                self._refuse(431, f"more than {max_fields} header fields")
            super().on_header(name, value)

        def on_headers_complete(self) -> None:
            self._head_since = None
            super().on_headers_complete()

        def _refuse(self, status: int, why: str) -> None:
            self._refusal = (status, why)
            raise _TooLarge(why)  # httptools stops; uvicorn answers (send_400_response)

        def send_400_response(self, msg: str) -> None:
            if self._refusal is None:
                super().send_400_response(msg)
                return
            status, why = self._refusal
            _answer_and_close(self, status, why)

        def head_timed_out(self, timeout: float) -> None:
            self._head_since = None
            if self.cycle is not None and not self.cycle.response_complete:
                return  # a request is being answered: not a head that is late
            _answer_and_close(self, 408, f"request head not complete within {timeout:g} s")

    return LimitedProtocol


def sweep(connections: Iterable[Any], timeout: float) -> None:
    """Close the connections whose request head is older than *timeout*."""
    now = time.monotonic()
    for protocol in list(connections):
        since = getattr(protocol, "_head_since", None)
        if since is not None and now - since > timeout:
            protocol.head_timed_out(timeout)


_REASONS = {408: "Request Timeout", 414: "URI Too Long", 431: "Request Header Fields Too Large"}


def _answer_and_close(protocol: Any, status: int, why: str) -> None:
    transport = protocol.transport
    if transport.is_closing():
        return
    protocol.logger.warning("Refused a request: %s.", why)
    body = why.encode() + b"\n"
    head = (
        f"HTTP/1.1 {status} {_REASONS[status]}\r\ncontent-type: text/plain; charset=utf-8\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    transport.write(head.encode() + body)
    transport.close()


class RepeatFilter(logging.Filter):
    """Lets a message through once per *period* seconds; the next one that passes
    says how many were held back. A thousand garbage requests log a line, not 1,000."""

    def __init__(self, period: float = 10.0) -> None:
        super().__init__()
        self._period = period
        self._seen: dict[str, tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        key = str(record.msg)
        now = time.monotonic()
        shown, held = self._seen.get(key, (0.0, 0))
        if now - shown < self._period:
            self._seen[key] = (shown, held + 1)
            return False
        self._seen[key] = (now, 0)
        if held:
            record.msg = f"{record.msg} ({held} more like this in the last {self._period:g} s)"
        return True
