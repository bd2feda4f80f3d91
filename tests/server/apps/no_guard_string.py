"""A script with no main guard that names its own app as a string: each worker
imports this module, and its serve() call must then do nothing."""

import os

import allcores


async def app(scope, receive, send):  # type: ignore[no-untyped-def]
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": str(os.getpid()).encode()})


allcores.serve("no_guard_string:app", port=int(os.environ["APP_PORT"]), workers=2)
