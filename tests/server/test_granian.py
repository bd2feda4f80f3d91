"""`allcores serve --engine granian`: granian's Rust HTTP core in every worker, under
allcores' supervision (reload, drain, shared pool, status), end to end."""

from __future__ import annotations

import json
import signal
import subprocess
import threading
from pathlib import Path

from tests.conftest import wait_until
from tests.server.conftest import ALLCORES, get


def test_granian_serves_reloads_offloads_and_drains(serve, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    control = tmp_path / "ctl.sock"
    server = serve(
        "pool_app:app", "--workers", "2", "--pool", "1", "--engine", "granian",
        "--policy", "shared", "--control", str(control),
    )  # fmt: skip
    first = server.wait_ready(2)
    status, body = get(server.port, "/offload?fn=whoami")
    assert status == 200 and int(body.split()[1]) == server.proc.pid, body
    for _ in range(20):
        assert get(server.port)[0] == 200

    def ask(*command: str) -> str:
        done = subprocess.run(
            [ALLCORES, *command, "--control", str(control)], capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    # The scoreboard counts granian's requests as uvicorn's.
    counted = wait_until(
        lambda: sum(w["requests"] for w in json.loads(ask("status", "--json"))["workers"]) >= 22
    )
    assert counted
    ask("reload")
    wait_until(lambda: not (server.wait_ready(2) & first) and server.wait_ready(2))
    # SIGTERM: a request in flight finishes, then the server exits 0.
    answers: list[tuple[int, str]] = []
    thread = threading.Thread(
        target=lambda: answers.append(get(server.port, "/offload?fn=sleep&s=1"))
    )
    thread.start()
    wait_until(lambda: json.loads(ask("status", "--json"))["pool"]["busy"] == 1)
    server.proc.send_signal(signal.SIGTERM)
    thread.join(30)
    assert answers == [(200, "1.0")]
    assert server.wait_exit() == 0


def test_granian_refuses_a_policy_that_cannot_feed_it(serve) -> None:  # type: ignore[no-untyped-def]
    server = serve("plain_asgi:app", "--engine", "granian", "--policy", "balanced")
    assert server.wait_exit() != 0
    assert "--engine granian accepts connections itself" in server.output
    assert "--policy shared" in server.output
