"""What `allcores serve` does about a blocked loop, a stuck worker and a worker due to
be recycled, seen from outside: real servers, real clients."""

from __future__ import annotations

import contextlib
import re
import signal
import threading
import time

from tests.conftest import wait_until
from tests.server.conftest import get
from tests.server.load import Load


def _block_in_background(port: int, seconds: float) -> threading.Thread:
    def call() -> None:
        with contextlib.suppress(OSError):
            get(port, f"/block?s={seconds}", timeout=seconds + 10)

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    return thread


def test_a_blocked_loop_is_logged_once_per_line_with_the_apps_stack(serve) -> None:  # type: ignore[no-untyped-def]
    server = serve("plain_asgi:app", "--workers", "1", "--warn-blocking", "0.1")
    server.wait_ready(1)
    for _ in range(3):
        assert get(server.port, "/block?s=0.4")[0] == 200
    output = server.wait_for_output("event loop blocked for")
    assert output.count("event loop blocked for") == 1
    report = output[output.index("event loop blocked for") :]
    assert "plain_asgi.py:" in report and "in block_the_loop" in report
    assert "time.sleep(seconds)" in report
    # Only the frames the loop called: not the runner around it.
    assert "runpy" not in report and "engine.py" not in report


def test_a_stuck_worker_is_dumped_killed_and_replaced_while_others_serve(serve) -> None:  # type: ignore[no-untyped-def]
    server = serve("plain_asgi:app", "--workers", "2", "--timeout-hung", "1", "--no-access-log")
    before = server.wait_ready(2)
    _block_in_background(server.port, 30)
    # Once its heartbeat is stale (0.25 s), the primary sends it nothing new. (A
    # connection its loop took just before it blocked is lost with it: one of its
    # open connections.)
    time.sleep(0.6)
    load = Load(server.port, connections=2, fresh=True)
    try:
        output = server.wait_for_output("crashed: killed by SIGKILL")
        assert len(server.wait_ready(2) - before) == 1
        served = load.ok
        wait_until(lambda: load.ok > served + 20)
    finally:
        load.stop()
    # Fresh polls went to the other worker all along.
    assert load.failures == []
    assert "its event loop has not run for" in output
    dump = output[output.index("its event loop has not run for") :]
    assert "in block_the_loop" in dump and "Current thread" in dump
    server.proc.send_signal(signal.SIGTERM)
    assert server.wait_exit() == 0


def test_max_requests_recycles_each_worker_behind_a_ready_successor(serve) -> None:  # type: ignore[no-untyped-def]
    server = serve("plain_asgi:app", "--workers", "2", "--max-requests", "40", "--no-access-log")
    before = server.wait_ready(2)
    load = Load(server.port, connections=4)
    try:
        server.wait_for_output("recycling worker", count=2)
        wait_until(lambda: not before & server.wait_ready(2))
    finally:
        load.stop()
    assert load.failures == []
    # Looked at once a second: recycled at 40 requests or a little past.
    assert re.search(r"served \d+ requests \(max_requests=40\)", server.output)
