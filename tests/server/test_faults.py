"""Faults under `allcores serve`: a worker or the primary killed outright."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
from pathlib import Path

import psutil

from tests.conftest import wait_until
from tests.server.conftest import ALLCORES
from tests.server.load import Load


def test_a_killed_worker_fails_only_its_own_connections_and_is_replaced(  # type: ignore[no-untyped-def]
    serve, tmp_path: Path
) -> None:
    control = tmp_path / "ctl.sock"
    server = serve("plain_asgi:app", "--workers", "2", "--no-access-log", "--control", str(control))
    server.wait_ready(2)
    load = Load(server.port, connections=8)
    try:
        wait_until(lambda: load.ok > 100)
        status = subprocess.run(
            [ALLCORES, "status", "--json", "--control", str(control)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        victim = json.loads(status.stdout)["workers"][0]
        os.kill(victim["pid"], signal.SIGKILL)
        new_pids = wait_until(lambda: server.wait_ready(2) - {victim["pid"]})
        served = load.ok
        wait_until(lambda: load.ok > served + 100)
    finally:
        load.stop()
    assert len(new_pids) == 2
    assert len(load.failures) <= victim["connections"]


def test_a_killed_primary_leaves_no_worker_and_frees_the_port(serve) -> None:  # type: ignore[no-untyped-def]
    server = serve("plain_asgi:app", "--workers", "2")
    pids = server.wait_ready(2)
    server.proc.kill()
    server.proc.wait(10)
    wait_until(lambda: not [pid for pid in pids if _alive(pid)], timeout=5)
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        wait_until(lambda: _binds(sock, server.port), timeout=5)


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _binds(sock: socket.socket, port: int) -> bool:
    try:
        sock.bind(("127.0.0.1", port))
    except OSError:
        return False
    return True
