"""A bare WSGI app: ``/`` -> "<pid> wsgi"."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [f"{os.getpid()} wsgi {environ['PATH_INFO']}".encode()]
