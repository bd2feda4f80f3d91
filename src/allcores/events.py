"""A small EventEmitter with Node's method names (`on`, `once`, `off`, `emit`).

Listeners run synchronously, in registration order, in whichever thread calls
`emit` (for a cluster primary: its event loop). A listener that raises does not stop
the others; its exception goes to `on_listener_error` (by default, logged).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

__all__ = ["EventEmitter"]

log = logging.getLogger("allcores")
Listener = Callable[..., Any]


class EventEmitter:
    def __init__(self) -> None:
        self._event_listeners: dict[str, list[tuple[Listener, bool]]] = {}

    def on(self, event: str, listener: Listener) -> Listener:
        """Call *listener* on every *event*; returns it, so it works as a decorator."""
        self._event_listeners.setdefault(event, []).append((listener, False))
        return listener

    def once(self, event: str, listener: Listener) -> Listener:
        self._event_listeners.setdefault(event, []).append((listener, True))
        return listener

    def off(self, event: str, listener: Listener) -> None:
        entries = self._event_listeners.get(event, [])
        for i, (registered, _once) in enumerate(entries):
            if registered is listener:
                del entries[i]
                return

    def listener_count(self, event: str) -> int:
        return len(self._event_listeners.get(event, ()))

    def emit(self, event: str, *args: Any) -> bool:
        entries = self._event_listeners.get(event)
        if not entries:
            return False
        for entry in list(entries):
            listener, once = entry
            if once and entry in entries:
                entries.remove(entry)
            try:
                listener(*args)
            except Exception as exc:
                self.on_listener_error(event, exc)
        return True

    def on_listener_error(self, event: str, exc: Exception) -> None:
        log.error("listener for %r raised", event, exc_info=exc)
