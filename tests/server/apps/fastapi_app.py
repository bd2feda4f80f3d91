"""FastAPI's quick-start app, plus a lifespan and a WebSocket echo."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, WebSocket
from fastapi.responses import PlainTextResponse

ready: list[int] = []


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    ready.append(os.getpid())
    yield


app = FastAPI(lifespan=lifespan)


@app.get("/", response_class=PlainTextResponse)
async def root() -> str:
    return f"{os.getpid()} {' '.join(map(str, ready))}"


@app.get("/items/{item_id}")
def read_item(item_id: int, q: str | None = None) -> dict[str, object]:
    return {"item_id": item_id, "q": q}


@app.websocket("/ws")
async def echo(websocket: WebSocket) -> None:
    await websocket.accept()
    while True:
        text = await websocket.receive_text()
        await websocket.send_text(f"{os.getpid()} {text}")
