"""Asking a running `allcores serve` over its control socket (the CLI's side)."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import tempfile
from pathlib import Path
from typing import Any

from allcores.errors import AllcoresError

__all__ = ["ControlError", "default_path", "request"]

# A reply is a status table at most: a few hundred bytes per worker.
MAX_LINE = 1 << 20


class ControlError(AllcoresError):
    """No server answered on the control socket, or it refused the command."""


def default_path(port: int | str) -> Path:
    """Where the server on *port* listens for commands: per user (the folder is the
    user's alone) and per port, so two servers never meet.

    ``$XDG_RUNTIME_DIR/allcores/<port>.sock`` where systemd provides that folder,
    else ``<tmp>/allcores-<uid>/<port>.sock``. A server on a UNIX socket (*port* is
    its ``unix:/path``) gets ``uds-<12 hex digits of its path's SHA-1>.sock``.
    """
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and Path(runtime).is_dir():
        folder = Path(runtime) / "allcores"
    else:
        folder = Path(tempfile.gettempdir()) / f"allcores-{os.getuid()}"
    if isinstance(port, str):
        return folder / f"uds-{hashlib.sha1(port.encode()).hexdigest()[:12]}.sock"
    return folder / f"{port}.sock"


def request(path: Path, command: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
    """Send one command, return the server's reply; ControlError if none answers."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError):
            raise ControlError(
                f"no allcores server is running with control socket {path} "
                "(start one with `allcores serve`, or give its --port or --control)"
            ) from None
        except PermissionError:
            message = f"{path}: permission denied (the server runs as another user)"
            raise ControlError(message) from None
        sock.sendall(json.dumps(command).encode() + b"\n")
        reply = b""
        while not reply.endswith(b"\n") and len(reply) < MAX_LINE:
            chunk = sock.recv(65536)
            if not chunk:
                break
            reply += chunk
    except TimeoutError:
        raise ControlError(f"the server at {path} did not answer within {timeout:g} s") from None
    finally:
        sock.close()
    try:
        answer: dict[str, Any] = json.loads(reply)
    except ValueError:
        raise ControlError(f"the server at {path} sent no valid reply: {reply[:200]!r}") from None
    if not answer.get("ok"):
        raise ControlError(str(answer.get("error", "the server refused the command")))
    return answer
