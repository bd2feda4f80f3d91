"""The control socket and the commands that use it: status, reload, scale, stop."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
from pathlib import Path

from tests.conftest import wait_until
from tests.server.conftest import ALLCORES, APPS


def allcores(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([ALLCORES, *args], capture_output=True, text=True, timeout=60, cwd=APPS)


def status(control: Path) -> dict[str, object]:
    run = allcores("status", "--json", "--control", str(control))
    assert run.returncode == 0, run.stderr
    answer: dict[str, object] = json.loads(run.stdout)
    return answer


def serving_pids(control: Path) -> set[int]:
    workers = status(control)["workers"]
    assert isinstance(workers, list)
    return {w["pid"] for w in workers if w["state"] == "serving"}


def test_status_scale_reload_and_stop_from_the_command_line(serve, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    control = tmp_path / "ctl.sock"
    server = serve("plain_asgi:app", "--workers", "2", "--control", str(control))
    pids = server.wait_ready(2)
    assert stat.S_IMODE(os.stat(control).st_mode) == 0o600
    assert serving_pids(control) == pids
    table = allcores("status", "--control", str(control)).stdout
    assert all(str(pid) in table for pid in pids) and "serving" in table

    assert "from 2 to 3" in allcores("scale", "+1", "--control", str(control)).stdout
    wait_until(lambda: len(serving_pids(control)) == 3)
    assert "from 3 to 2" in allcores("scale", "-1", "--control", str(control)).stdout
    wait_until(lambda: len(serving_pids(control)) == 2)

    before = serving_pids(control)
    assert allcores("reload", "--control", str(control)).returncode == 0
    server.wait_for_output("reload 1 done")
    wait_until(lambda: len(serving_pids(control)) == 2 and not serving_pids(control) & before)
    assert status(control)["restarts"] == {"reload": 2}

    refused = allcores("scale", "0", "--control", str(control))
    assert refused.returncode == 1 and "use `allcores stop`" in refused.stderr
    assert allcores("stop", "--control", str(control)).returncode == 0
    assert server.wait_exit() == 0
    assert not control.exists()


def test_garbage_on_the_control_socket_gets_an_error_reply_and_it_serves_on(  # type: ignore[no-untyped-def]
    serve, tmp_path: Path
) -> None:
    control = tmp_path / "ctl.sock"
    server = serve("plain_asgi:app", "--workers", "1", "--control", str(control))
    server.wait_ready(1)
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(str(control))
        reader = sock.makefile("rb")
        replies = []
        for line in (b"hello\n", b"[1, 2]\n", b'{"cmd": "explode"}\n', b'{"cmd": "status"}\n'):
            sock.sendall(line)
            replies.append(json.loads(reader.readline()))
    assert [reply["ok"] for reply in replies] == [False, False, False, True]
    assert "not JSON" in replies[0]["error"]
    assert "unknown command 'explode'" in replies[2]["error"]
    assert len(replies[3]["workers"]) == 1


def test_commands_say_clearly_when_no_server_is_running(tmp_path: Path) -> None:
    run = allcores("status", "--control", str(tmp_path / "none.sock"))
    assert run.returncode == 1
    assert "no allcores server is running with control socket" in run.stderr


def test_status_finds_the_server_on_the_port_the_environment_names(serve) -> None:  # type: ignore[no-untyped-def]
    server = serve("plain_asgi:app", "--workers", "1")
    (pid,) = server.wait_ready(1)
    run = subprocess.run(
        [ALLCORES, "status", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=APPS,
        env={**os.environ, "ALLCORES_PORT": str(server.port)},
    )
    assert run.returncode == 0, run.stderr
    assert [w["pid"] for w in json.loads(run.stdout)["workers"]] == [pid]
