"""Rolling reload of a plain cluster program: SIGHUP replaces every worker, one at
a time, and a new worker that cannot boot stops the reload."""

from __future__ import annotations

import signal
from pathlib import Path

from tests.cluster.conftest import http_get


def test_sighup_replaces_every_worker_and_the_primary_serves_on(start_cluster) -> None:  # type: ignore[no-untyped-def]
    run = start_cluster(workers=2)
    before = run.worker_pids()
    run.proc.send_signal(signal.SIGHUP)
    # Two new workers listen, and the two old ones exit as planned.
    run.wait_for("listening", count=4)
    for pid in before:
        run.wait_for("exit", pid=pid, planned=True)
    after = run.worker_pids()
    assert len(after) == 2 and not after & before
    assert {int(http_get(run.port)) for _ in range(10)} <= after
    assert run.proc.poll() is None
    run.proc.send_signal(signal.SIGTERM)
    assert run.wait_exit(20) == 0


def test_a_reload_whose_new_worker_cannot_boot_keeps_the_old_ones(  # type: ignore[no-untyped-def]
    start_cluster, tmp_path: Path
) -> None:
    broken = tmp_path / "broken"
    run = start_cluster(workers=2, APP_RESPAWN="1", APP_BOOT_FAIL_FILE=str(broken))
    before = run.worker_pids()
    broken.touch()
    run.proc.send_signal(signal.SIGHUP)
    run.wait_for("exit", count=1, planned=False)
    stderr_seen = run.wait_for_stderr("reload 1 stopped after 0 of 2 worker(s)")
    assert "cannot boot: missing configuration APP_SECRET" in stderr_seen
    # The old workers serve on, and the failed candidate was neither respawned nor
    # counted as a crash.
    assert run.worker_pids() == before
    assert {int(http_get(run.port)) for _ in range(6)} <= before
    assert len(run.find("fork")) == 3
    # Fixed, a second SIGHUP goes through.
    broken.unlink()
    run.proc.send_signal(signal.SIGHUP)
    for pid in before:
        run.wait_for("exit", pid=pid, planned=True)
    assert len(run.worker_pids()) == 2


def test_a_reload_whose_new_worker_hangs_at_boot_stops_at_the_ready_timeout(  # type: ignore[no-untyped-def]
    start_cluster, tmp_path: Path
) -> None:
    hang = tmp_path / "hang"
    run = start_cluster(workers=1, APP_BOOT_HANG_FILE=str(hang), APP_READY_TIMEOUT="1")
    before = run.worker_pids()
    hang.touch()
    run.proc.send_signal(signal.SIGHUP)
    stderr = run.wait_for_stderr("reload 1 stopped after 0 of 1 worker(s)")
    assert "was not listening 1 s after it started (ready_timeout)" in stderr
    # The hung candidate was killed; the old worker serves on.
    run.wait_for("exit", signal="SIGKILL")
    assert run.worker_pids() == before
    assert int(http_get(run.port)) in before
