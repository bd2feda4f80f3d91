"""A stop that cannot end gracefully: the primary's last resorts, seen from outside.

Found by coverage: no other test reached the primary's kill timer (a worker still
running graceful_timeout after it was told to stop) or its second-SIGINT kill.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import threading

import psutil

from tests.cluster.conftest import ClusterRun, http_get
from tests.conftest import wait_until

# A /cpu request this long keeps a worker's loop blocked until it is killed.
ENDLESS_CPU = "/cpu?n=10000000000"


def _block_the_only_worker(run: ClusterRun) -> tuple[int, threading.Thread]:
    """Send the one worker a request that blocks its loop; its pid once it is busy."""
    (pid,) = run.worker_pids()
    before = sum(psutil.Process(pid).cpu_times()[:2])

    def endless_request() -> None:
        with contextlib.suppress(OSError):  # the worker dies with it unanswered
            http_get(run.port, ENDLESS_CPU, timeout=60)

    request = threading.Thread(target=endless_request, daemon=True)
    request.start()
    # Busy: it has used a tenth of a second of CPU since the request (idle, it uses none).
    wait_until(lambda: sum(psutil.Process(pid).cpu_times()[:2]) - before > 0.1)
    return pid, request


def _refuses_connections(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


def test_a_worker_that_cannot_drain_is_killed_after_the_graceful_timeout(start_cluster) -> None:  # type: ignore[no-untyped-def]
    run = start_cluster(workers=1, APP_GRACE="0.5")
    pid, request = _block_the_only_worker(run)

    run.proc.send_signal(signal.SIGTERM)

    assert run.wait_exit(timeout=60) == 0
    (exit_event,) = run.wait_for("exit", pid=pid)
    assert exit_event["signal"] == "SIGKILL" and exit_event["planned"] is True
    request.join(30)


def test_a_second_sigint_kills_the_workers_at_once(start_cluster) -> None:  # type: ignore[no-untyped-def]
    # A graceful timeout far longer than the test waits: only the second SIGINT can
    # end this worker in time.
    run = start_cluster(workers=1, APP_GRACE="600")
    pid, request = _block_the_only_worker(run)

    run.proc.send_signal(signal.SIGINT)
    # The first SIGINT was handled (two pending at once would count as one): the
    # primary has closed its listening socket.
    wait_until(lambda: _refuses_connections(run.port))
    run.proc.send_signal(signal.SIGINT)

    assert run.wait_exit(timeout=60) == 0
    (exit_event,) = run.wait_for("exit", pid=pid)
    assert exit_event["signal"] == "SIGKILL" and exit_event["planned"] is True
    request.join(30)


def test_a_worker_whose_app_closed_its_server_still_exits_when_stopped(start_cluster) -> None:  # type: ignore[no-untyped-def]
    run = start_cluster(workers=1, APP_GRACE="0.5")
    (pid,) = run.worker_pids()
    # The worker closes its cluster server, answers, and goes on running.
    assert http_get(run.port, "/busy-then-close?s=0") == str(pid)

    run.proc.send_signal(signal.SIGTERM)

    assert run.wait_exit(timeout=60) == 0
    (exit_event,) = run.wait_for("exit", pid=pid)
    assert (exit_event["code"], exit_event["signal"]) == (0, None)
