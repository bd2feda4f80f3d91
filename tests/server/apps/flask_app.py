"""Flask's quick-start app."""

from __future__ import annotations

import os

from flask import Flask, request

app = Flask(__name__)


@app.route("/")
def hello_world() -> str:
    return f"{os.getpid()} <p>Hello, World!</p>"


@app.post("/echo")
def echo() -> dict[str, object]:
    return {"got": request.get_json()}
