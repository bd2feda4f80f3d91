"""The defences against slow and bad clients that uvicorn lacks, beside the checks
in the protocol (`allcores.server.protocol`: 414, 431, the head clock).

- `sweep`, once a second: a connection whose request head has taken longer than
  --timeout-header (slowloris) gets 408 and is closed. A sweep rather than a timer
  per request: one clock read per request instead of a timer set and cancelled.
- `answer_and_close`: the short answer to a refused request.
- `RepeatFilter`: a flood of bad requests logs a line per 10 s, not one each.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any

__all__ = ["RepeatFilter", "answer_and_close", "sweep"]


def sweep(connections: Iterable[Any], timeout: float) -> None:
    """Close the connections whose request head is older than *timeout*."""
    now = time.monotonic()
    for protocol in list(connections):
        since = getattr(protocol, "_head_since", None)
        if since is not None and now - since > timeout:
            protocol.head_timed_out(timeout)


_REASONS = {408: "Request Timeout", 414: "URI Too Long", 431: "Request Header Fields Too Large"}


def answer_and_close(protocol: Any, status: int, why: str) -> None:
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
