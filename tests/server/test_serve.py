"""`allcores serve` end to end: real servers on free ports, real clients."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
from pathlib import Path

import psutil
import pytest
import trustme

from tests.conftest import wait_until
from tests.server.conftest import ALLCORES, APPS, get
from tests.server.load import Load


def test_every_worker_serves_and_ran_the_lifespan_startup_itself(serve) -> None:  # type: ignore[no-untyped-def]
    server = serve("plain_asgi:app", "--workers", "2")
    pids = server.wait_ready(2)
    for _ in range(6):
        status, body = get(server.port)
        pid, *lifespan_pids = map(int, body.split())
        assert status == 200 and pid in pids
        assert lifespan_pids == [pid]
    titles = {psutil.Process(pid).cmdline()[0] for pid in pids}
    assert titles == {"allcores: worker 1 plain_asgi:app", "allcores: worker 2 plain_asgi:app"}
    assert psutil.Process(server.proc.pid).cmdline()[0] == "allcores: primary plain_asgi:app"
    server.proc.send_signal(signal.SIGTERM)
    assert server.wait_exit() == 0
    assert server.output.count("Application shutdown complete") == 2


def test_three_reloads_under_load_fail_no_request(serve) -> None:  # type: ignore[no-untyped-def]
    server = serve("plain_asgi:app", "--workers", "2", "--no-access-log")
    before = server.wait_ready(2)
    load = Load(server.port, connections=8)
    try:
        wait_until(lambda: load.ok > 50)
        for reload in (1, 2, 3):
            server.proc.send_signal(signal.SIGHUP)
            server.wait_for_output(f"reload {reload} done")
        served_before_stop = load.ok
        wait_until(lambda: load.ok > served_before_stop + 50)
    finally:
        load.stop()
    assert load.failures == []
    after = server.wait_ready(2)
    assert not after & before
    assert server.output.count("drains") == 6


def test_sigterm_lets_requests_in_flight_finish(serve) -> None:  # type: ignore[no-untyped-def]
    server = serve("plain_asgi:app", "--workers", "2")
    server.wait_ready(2)
    results: list[tuple[int, str]] = []
    threads = [
        threading.Thread(target=lambda: results.append(get(server.port, "/sleep?s=1")))
        for _ in range(6)
    ]
    for thread in threads:
        thread.start()
    wait_until(lambda: server.output.count('"GET /sleep?s=1') == 0 and _in_flight(server) >= 6)
    server.proc.send_signal(signal.SIGTERM)
    for thread in threads:
        thread.join(30)
    assert [status for status, _body in results] == [200] * 6
    assert server.wait_exit() == 0


def test_ctrl_c_in_a_terminal_drains_and_exits_0(serve) -> None:  # type: ignore[no-untyped-def]
    server = serve("plain_asgi:app", "--workers", "2")
    pids = server.wait_ready(2)
    # A terminal's Ctrl-C reaches the foreground process group: the primary's alone,
    # since workers have their own; the primary drains them.
    os.killpg(server.proc.pid, signal.SIGINT)
    assert server.wait_exit() == 0
    assert server.output.count("Application shutdown complete") == 2
    assert not [pid for pid in pids if psutil.pid_exists(pid)]


def _in_flight(server) -> int:  # type: ignore[no-untyped-def]
    """Connections open to the server's port, seen from the client side."""
    return sum(
        1
        for conn in psutil.net_connections(kind="tcp")
        if conn.raddr and conn.raddr.port == server.port and conn.status == "ESTABLISHED"
    )


def test_a_lifespan_startup_failure_exits_non_zero_with_the_apps_message(serve) -> None:  # type: ignore[no-untyped-def]
    server = serve("plain_asgi:app", "--workers", "2", env={"APP_LIFESPAN_FAIL": "1"})
    assert server.wait_exit(60) == 1
    output = server.output
    assert output.count("database unreachable at db:5432") == 1
    assert "crash_loop_limit" in output


def test_an_app_that_fails_at_import_shows_its_traceback_once(serve) -> None:  # type: ignore[no-untyped-def]
    server = serve("broken_import:app", "--workers", "2")
    assert server.wait_exit(60) == 1
    output = server.output
    assert output.count("KeyError: 'DATABASE_URL'") == 1
    assert output.count("Traceback (most recent call last)") == 1


def test_a_module_that_is_not_there_is_refused_before_any_worker_starts(serve) -> None:  # type: ignore[no-untyped-def]
    server = serve("plain_asgl:app")
    assert server.wait_exit(30) == 1
    assert "cannot find module 'plain_asgl' for app 'plain_asgl:app'" in server.output
    assert "worker" not in server.output.split("cannot find")[0]


def test_an_attribute_that_is_not_there_names_the_module() -> None:
    run = subprocess.run(
        [ALLCORES, "serve", "plain_asgi:nope", "--workers", "1", "--port", "0"],
        cwd=APPS,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 1
    assert run.stderr.count("module 'plain_asgi' has no attribute 'nope'") == 1


def test_bad_options_are_refused_naming_the_option_and_what_is_valid() -> None:
    bad_flag = subprocess.run(
        [ALLCORES, "serve", "plain_asgi:app", "--workers", "many"],
        cwd=APPS,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert bad_flag.returncode == 2
    assert "--workers='many': workers must be 'auto'" in bad_flag.stderr
    bad_env = subprocess.run(
        [ALLCORES, "serve", "plain_asgi:app"],
        cwd=APPS,
        env={"ALLCORES_POLICY": "fastest", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert bad_env.returncode == 2
    assert "ALLCORES_POLICY='fastest': policy must be one of balanced, rr" in bad_env.stderr


def test_a_wsgi_app_is_found_and_served(serve) -> None:  # type: ignore[no-untyped-def]
    server = serve("plain_wsgi:app", "--workers", "1")
    server.wait_ready(1)
    status, body = get(server.port, "/hello")
    assert status == 200 and body.split()[1:] == ["wsgi", "/hello"]


def test_a_script_with_no_main_guard_serving_its_app_object(serve) -> None:  # type: ignore[no-untyped-def]
    server = serve(str(APPS / "no_guard_object.py"), program=True)
    pids = server.wait_ready(2)

    # The primary and each worker run the script's body: the cluster's model.
    # Counted in the whole output, not per line: print() writes its text and its "\n"
    # apart, so two workers' lines can share one line of the pipe they both write to.
    def runs() -> int:
        return "".join(server.stdout).count("script body runs")

    wait_until(lambda: runs() >= 3)
    assert runs() == 3, server.stdout
    server.proc.send_signal(signal.SIGTERM)
    assert server.wait_exit() == 0
    assert not [pid for pid in pids if psutil.pid_exists(pid)]


def test_a_script_with_no_main_guard_naming_its_app_as_a_string(serve) -> None:  # type: ignore[no-untyped-def]
    server = serve(str(APPS / "no_guard_string.py"), program=True)
    server.wait_ready(2)
    server.proc.send_signal(signal.SIGTERM)
    assert server.wait_exit() == 0
    # Each worker imported the module, whose serve() call then did nothing.
    assert "failed while booting" not in server.output


def test_https_with_a_certificate_and_key(serve, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    authority = trustme.CA()
    certificate = authority.issue_cert("127.0.0.1")
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    certificate.cert_chain_pems[0].write_to_path(str(cert_file))
    certificate.private_key_pem.write_to_path(str(key_file))
    server = serve(
        "plain_asgi:app",
        "--workers",
        "1",
        "--ssl-certfile",
        str(cert_file),
        "--ssl-keyfile",
        str(key_file),
    )
    context = ssl.create_default_context()
    authority.configure_trust(context)

    def https_get() -> tuple[int, str] | None:
        conn = http.client.HTTPSConnection("127.0.0.1", server.port, context=context, timeout=5)
        try:
            conn.request("GET", "/")
            response = conn.getresponse()
            return response.status, response.read().decode()
        except OSError:
            return None
        finally:
            conn.close()

    status, body = wait_until(https_get)
    assert status == 200 and int(body.split()[0]) > 0
    assert "on https://127.0.0.1:" in server.output
    # Plain HTTP on the TLS port is refused, and the server goes on.
    with pytest.raises((OSError, http.client.HTTPException)):
        get(server.port, timeout=5)
    assert wait_until(https_get)[0] == 200


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=10)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(self._path)


def test_a_unix_socket_serves_reloads_and_is_removed_at_the_end(serve, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "app.sock"
    server = serve("plain_asgi:app", "--workers", "2", "--uds", str(path))

    def pid_over_unix() -> int | None:
        conn = _UnixHTTPConnection(str(path))
        try:
            conn.request("GET", "/")
            return int(conn.getresponse().read().split()[0])
        except OSError:
            return None
        finally:
            conn.close()

    first = wait_until(pid_over_unix)
    assert f"on unix:{path}" in server.output
    status = subprocess.run(
        [ALLCORES, "status", "--json", "--uds", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert status.returncode == 0 and len(json.loads(status.stdout)["workers"]) == 2
    server.proc.send_signal(signal.SIGHUP)
    server.wait_for_output("reload 1 done")
    assert wait_until(lambda: (pid := pid_over_unix()) and pid != first)
    server.proc.send_signal(signal.SIGTERM)
    assert server.wait_exit() == 0
    assert not path.exists()


def test_an_app_object_from_the_interactive_interpreter_is_refused_with_what_to_do() -> None:
    script = "import allcores\nasync def app(s, r, se):\n    pass\n\nallcores.serve(app)\n"
    run = subprocess.run(
        [sys.executable, "-i"], input=script, capture_output=True, text=True, timeout=60
    )
    assert "cannot be served from the interactive interpreter" in run.stderr
    assert "give the app as 'module:attribute'" in run.stderr


def test_an_app_factory_with_factory(serve) -> None:  # type: ignore[no-untyped-def]
    server = serve("factory_app:create_app", "--factory", "--workers", "1")
    server.wait_ready(1)
    assert get(server.port)[1].endswith(" made by create_app")


def test_max_lifetime_recycles_a_worker_behind_a_ready_successor(serve) -> None:  # type: ignore[no-untyped-def]
    server = serve("plain_asgi:app", "--workers", "1", "--max-lifetime", "1")
    first = server.wait_ready(1)
    # Its successor (worker 2) listens first; then worker 1 drains.
    output = server.wait_for_output("recycle: worker 2 (pid")
    assert "recycling worker 1" in output and "(max_lifetime=1)" in output
    wait_until(lambda: server.wait_ready(1) - first)


def test_preload_imports_once_and_forks_workers_from_a_zygote(serve) -> None:  # type: ignore[no-untyped-def]
    server = serve("plain_asgi:app", "--workers", "2", "--preload")
    pids = server.wait_ready(2)
    primary = psutil.Process(server.proc.pid)
    (zygote,) = primary.children()
    assert zygote.cmdline()[0] == "allcores: zygote plain_asgi:app"
    titles = {child.pid: child.cmdline()[0] for child in zygote.children()}
    # The workers, and the shared pool's processes (its own tests: test_shared_pool.py).
    assert {pid for pid, title in titles.items() if "worker" in title} == pids
    assert sorted(t for t in titles.values() if "worker" not in t)[0].startswith("allcores: pool")
    # Each worker ran the lifespan itself, on the app the primary imported.
    for _ in range(4):
        pid, *lifespan_pids = map(int, get(server.port)[1].split())
        assert lifespan_pids == [pid]
    victim = min(pids)
    os.kill(victim, signal.SIGKILL)
    replaced = wait_until(lambda: server.wait_ready(2) - pids)
    assert len(replaced) == 1 and psutil.Process(next(iter(replaced))).ppid() == zygote.pid
    server.proc.send_signal(signal.SIGTERM)
    assert server.wait_exit() == 0
    wait_until(lambda: not psutil.pid_exists(zygote.pid), timeout=10)


def test_preload_of_an_app_that_fails_at_import_stops_before_any_worker(serve) -> None:  # type: ignore[no-untyped-def]
    server = serve("broken_import:app", "--workers", "2", "--preload")
    assert server.wait_exit(30) == 1
    assert server.output.count("KeyError: 'DATABASE_URL'") == 1
    assert "failed while booting" not in server.output
