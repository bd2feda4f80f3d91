"""The scoreboard: one writer per row, read by another process without messages."""

from __future__ import annotations

import os
import time

from allcores.observe.scoreboard import LAG_BUCKETS_MS, RowState, Scoreboard


def test_a_child_writes_its_row_and_the_owner_reads_it() -> None:
    board = Scoreboard.create(4)
    try:
        board.row(2).clear(pid=123, state=RowState.STARTING)
        pid = os.fork()
        if pid == 0:
            try:
                row = board.row(2)
                row.set("state", RowState.READY)
                row.add("connections", 3)
                row.add("connections_closed", 1)
                row.beat()
                row.record_lag(7.0)
                row.record_lag(0.5)
            finally:
                os._exit(0)
        os.waitpid(pid, 0)
        snap = board.read(2)
        assert snap.pid == 123
        assert snap.state_name == "ready"
        assert (snap.connections, snap.connections_closed) == (3, 1)
        assert 0 <= snap.heartbeat_age() < 60
        assert snap.lag_ms == 0.5 and snap.lag_max_ms == 7.0
        assert snap.lag_histogram[0] == 1 and snap.lag_histogram[2] == 1
        assert len(snap.lag_histogram) == len(LAG_BUCKETS_MS) + 1
        assert board.read(1).heartbeat_age() == float("inf")
    finally:
        board.close()


def test_attach_by_fd_sees_the_same_memory() -> None:
    board = Scoreboard.create(2)
    other = Scoreboard.attach(os.dup(board.fd), 2)
    try:
        board.row(0).set("tasks_total", 9)
        assert other.read(0).tasks_total == 9
        other.row(1).set("started", time.monotonic())
        assert board.read(1).started > 0
    finally:
        other.close()
        board.close()
