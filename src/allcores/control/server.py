"""The primary's side of the control socket: JSON lines in, JSON lines out.

Each line is one command, ``{"cmd": NAME, ...}``; each gets one reply line. A line
that is not a JSON object, or names no known command, gets an error reply and the
connection goes on; a line longer than `MAX_LINE` ends it. The handlers run on the
primary's loop, where supervision runs: they only read state or record a wish.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from allcores.control.client import MAX_LINE, ControlError

__all__ = ["ControlServer", "Handler"]

log = logging.getLogger("allcores.server")

Handler = Callable[[dict[str, Any]], dict[str, Any]]


class ControlServer:
    """Listens on *path* (mode 0600) and answers with *handlers* by command name."""

    def __init__(self, path: Path, handlers: dict[str, Handler]) -> None:
        self.path = path
        self._handlers = handlers
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        if self.path.exists():
            if _answers(self.path):
                raise ControlError(
                    f"another allcores server already listens on {self.path}; "
                    "stop it, or give this one another --port or --control"
                )
            self.path.unlink()  # left by a server that was killed
        # The mask makes the socket 0600 from the moment it exists: no window in
        # which another user could connect.
        old_mask = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(
                self._serve, path=str(self.path), limit=MAX_LINE
            )
        finally:
            os.umask(old_mask)

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    line = await reader.readline()
                except ValueError:  # longer than the limit
                    writer.write(_reply({"ok": False, "error": f"line over {MAX_LINE} bytes"}))
                    break
                if not line:
                    break
                writer.write(_reply(self._answer(line)))
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    def _answer(self, line: bytes) -> dict[str, Any]:
        try:
            command = json.loads(line)
        except ValueError:
            return {"ok": False, "error": "not JSON: send one JSON object per line"}
        if not isinstance(command, dict) or not isinstance(command.get("cmd"), str):
            return {"ok": False, "error": 'send {"cmd": NAME, ...}'}
        handler = self._handlers.get(command["cmd"])
        if handler is None:
            known = ", ".join(sorted(self._handlers))
            return {"ok": False, "error": f"unknown command {command['cmd']!r}; known: {known}"}
        try:
            return {"ok": True, **handler(command)}
        except (ControlError, ValueError) as exc:
            return {"ok": False, "error": str(exc)}
        except Exception as exc:
            log.exception("allcores: control command %r failed", command["cmd"])
            return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}


def _reply(answer: dict[str, Any]) -> bytes:
    return json.dumps(answer).encode() + b"\n"


def _answers(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True
