"""A FastAPI app for the --preload measurements: ``GET /`` returns the worker's pid."""

import os

from fastapi import FastAPI

app = FastAPI()


@app.get("/")
async def root() -> dict[str, int]:
    return {"pid": os.getpid()}
