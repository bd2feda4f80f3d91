"""A Starlette app with an HTTP route and a WebSocket route."""

from __future__ import annotations

import os

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket


async def homepage(request: Request) -> PlainTextResponse:
    return PlainTextResponse(f"{os.getpid()} starlette")


async def echo(websocket: WebSocket) -> None:
    await websocket.accept()
    text = await websocket.receive_text()
    await websocket.send_text(f"{os.getpid()} {text}")
    await websocket.close()


app = Starlette(routes=[Route("/", homepage), WebSocketRoute("/ws", echo)])
