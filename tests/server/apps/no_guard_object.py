"""A script with no main guard that hands `allcores.serve` the app object itself:
workers run the script again, up to the serve() call, and serve there."""

import os

import allcores

print(f"script body runs in {os.getpid()}", flush=True)


async def app(scope, receive, send):  # type: ignore[no-untyped-def]
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": str(os.getpid()).encode()})


allcores.serve(app, port=int(os.environ["APP_PORT"]), workers=2)
