"""FastAPI, Starlette, Flask and Django, unchanged, under `allcores serve`: each
framework's quick-start app, real requests, WebSockets where the framework has them."""

from __future__ import annotations

import http.client
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from websockets.sync.client import connect

from tests.server.conftest import get


def test_fastapi_with_its_lifespan_and_a_websocket(serve) -> None:  # type: ignore[no-untyped-def]
    server = serve("fastapi_app:app", "--workers", "2")
    pids = server.wait_ready(2)
    status, body = get(server.port)
    pid, *lifespan_pids = map(int, body.split())
    assert status == 200 and lifespan_pids == [pid]
    status, body = get(server.port, "/items/5?q=somequery")
    assert status == 200 and json.loads(body) == {"item_id": 5, "q": "somequery"}
    assert get(server.port, "/items/five")[0] == 422
    with connect(f"ws://127.0.0.1:{server.port}/ws", open_timeout=10) as websocket:
        websocket.send("hello")
        pid_text, echoed = str(websocket.recv(timeout=10)).split()
        assert int(pid_text) in pids and echoed == "hello"
        websocket.send("again")
        assert str(websocket.recv(timeout=10)).endswith(" again")
    server.proc.send_signal(signal.SIGTERM)
    assert server.wait_exit() == 0


@pytest.mark.parametrize("policy", ["balanced", "rr", "shared", "reuseport"])
def test_starlette_http_and_websocket_under_every_policy(serve, policy: str) -> None:  # type: ignore[no-untyped-def]
    server = serve("starlette_app:app", "--workers", "2", "--policy", policy)
    server.wait_ready(2)
    assert get(server.port)[1].endswith(" starlette")
    with connect(f"ws://127.0.0.1:{server.port}/ws", open_timeout=10) as websocket:
        websocket.send("hi")
        assert str(websocket.recv(timeout=10)).endswith(" hi")


@pytest.mark.parametrize("workers", [1, 2])
def test_flask_quick_start_through_wsgi(serve, workers: int) -> None:  # type: ignore[no-untyped-def]
    server = serve("flask_app:app", "--workers", str(workers))
    assert len(server.wait_ready(workers)) == workers
    assert get(server.port)[1].endswith("<p>Hello, World!</p>")
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    conn.request(
        "POST", "/echo", body=json.dumps({"a": 1}), headers={"Content-Type": "application/json"}
    )
    response = conn.getresponse()
    assert response.status == 200 and json.loads(response.read()) == {"got": {"a": 1}}
    conn.close()


def test_a_django_startproject_through_asgi_and_wsgi(serve, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    subprocess.run(
        [sys.executable, "-m", "django", "startproject", "mysite", str(tmp_path)],
        check=True,
        timeout=60,
    )
    for entry in ("mysite.asgi:application", "mysite.wsgi:application"):
        server = serve(entry, "--workers", "1", cwd=tmp_path)
        # The project as generated: DEBUG on, so / shows Django's welcome page.
        status, body = _get_when_up(server)
        assert status == 200 and "The install worked successfully!" in body
        assert get(server.port, "/admin/login/")[0] == 200
        server.proc.send_signal(signal.SIGTERM)
        assert server.wait_exit() == 0


def _get_when_up(server) -> tuple[int, str]:  # type: ignore[no-untyped-def]
    from tests.conftest import wait_until

    def attempt() -> tuple[int, str] | None:
        try:
            return get(server.port)
        except OSError:
            return None

    result: tuple[int, str] = wait_until(attempt)
    return result
