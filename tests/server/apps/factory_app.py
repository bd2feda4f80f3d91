"""An app made by a function, for --factory: ``/`` -> "<pid> made by create_app"."""

from __future__ import annotations

import os
from typing import Any


def create_app() -> Any:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = f"{os.getpid()} made by create_app".encode()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body})

    return app
