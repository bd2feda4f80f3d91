"""Direct round trips: a thread that submits to an idle worker sends the task itself,
and reads the reply itself when it waits with ``result()``; otherwise the loop does.

Each test checks ``pool._engine._direct_sent`` so that it cannot pass through the loop's path
by accident.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import allcores
from allcores.ipc.channel import MAX_FDS
from allcores.pool import Pool, ReplyLostError, WorkerCrashedError
from allcores.pool import _protocol as proto
from allcores.pool._serialize import dump_function, pack_call
from allcores.pool.backends.process import ProcessWorker
from allcores.shm.segment import Segment
from tests.conftest import wait_until
from tests.pool import helpers
from tests.pool.conftest import wait_gone

pytestmark = pytest.mark.usefixtures("no_leftovers")


def _warm(pool: Pool) -> None:
    """Every worker ready and idle, so the next submits can go direct."""
    futures = [pool.submit(helpers.sleep_then, 0.05, i) for i in range(pool.settings.max_workers)]
    assert [f.result(timeout=30) for f in futures] == list(range(pool.settings.max_workers))
    # A new pool's first reply can be read before the loop has seen the worker's
    # READY (the caller reads both and passes READY on): it is idle only after that.
    deadline = time.monotonic() + 30
    while len(pool._engine._idle) < pool.settings.max_workers and time.monotonic() < deadline:
        time.sleep(0.001)
    assert len(pool._engine._idle) == pool.settings.max_workers


def test_one_by_one_goes_direct_and_is_counted() -> None:
    with Pool(2) as pool:
        _warm(pool)
        before = pool._engine._direct_sent
        assert [pool.submit(helpers.add, i).result(timeout=30) for i in range(200)] == [
            i + 1 for i in range(200)
        ]
        assert pool._engine._direct_sent - before == 200
        stats = pool.stats()
        assert stats.completed >= 200 and stats.run_time.count >= 200
        assert stats.busy == 0 and stats.idle == 2


def test_a_direct_task_nobody_calls_result_on_still_completes() -> None:
    with Pool(2) as pool:
        _warm(pool)
        before = pool._engine._direct_sent
        plain = pool.submit(helpers.add, 1)
        called = threading.Event()
        with_callback = pool.submit(helpers.add, 2)
        with_callback.add_done_callback(lambda _f: called.set())
        assert pool._engine._direct_sent - before == 2
        done, _pending = concurrent.futures.wait([plain], timeout=30)
        assert plain in done
        assert called.wait(30)
        assert plain.result() == 2 and with_callback.result() == 3
        assert [
            f.result()
            for f in concurrent.futures.as_completed([pool.submit(helpers.add, 5)], timeout=30)
        ] == [6]


def test_result_with_a_timeout_that_passes_then_again() -> None:
    with Pool(1) as pool:
        _warm(pool)
        before = pool._engine._direct_sent
        slow = pool.submit(helpers.sleep_then, 0.5, "done")
        assert pool._engine._direct_sent - before == 1
        with pytest.raises(concurrent.futures.TimeoutError):
            slow.result(timeout=0.05)
        assert slow.result(timeout=30) == "done"
        # The worker is free again, for direct and queued tasks alike.
        assert pool.submit(helpers.add, 1).result(timeout=30) == 2


def test_a_crash_while_the_caller_reads_fails_that_task_only() -> None:
    with Pool(1) as pool:
        _warm(pool)
        first = pool.worker_pids()
        before = pool._engine._direct_sent
        crashing = pool.submit(helpers.exit_hard, 7)
        assert pool._engine._direct_sent - before == 1
        with pytest.raises(WorkerCrashedError) as info:
            crashing.result(timeout=30)
        assert info.value.exitcode == 7
        assert pool.submit(helpers.add, 1).result(timeout=30) == 2
        assert pool.worker_pids() != first
        assert not wait_gone(first, timeout=10)


def test_errors_come_back_with_their_traceback() -> None:
    with Pool(1) as pool:
        _warm(pool)
        before = pool._engine._direct_sent
        with pytest.raises(ValueError, match="direct"):
            pool.submit(helpers.raise_value_error, "direct").result(timeout=30)
        assert pool._engine._direct_sent - before == 1
        assert pool.stats().failed == 1


def test_many_threads_one_by_one() -> None:
    results: dict[int, list[int]] = {}

    def run(thread: int) -> None:
        results[thread] = [
            pool.submit(helpers.add, i, thread).result(timeout=60) for i in range(150)
        ]

    with Pool(2) as pool:
        _warm(pool)
        before = pool._engine._direct_sent
        threads = [threading.Thread(target=run, args=(t,)) for t in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert all(not thread.is_alive() for thread in threads)
        assert results == {t: [i + t for i in range(150)] for t in range(4)}
        assert pool._engine._direct_sent > before  # some went direct, the rest through the loop
        assert pool.stats().completed >= 600


def test_shutdown_waits_for_a_direct_task_nobody_waits_on() -> None:
    pool = Pool(1)
    _warm(pool)
    before = pool._engine._direct_sent
    slow = pool.submit(helpers.sleep_then, 0.3, "kept")
    assert pool._engine._direct_sent - before == 1
    pool.shutdown(wait=True)
    assert slow.done() and slow.result() == "kept"


def test_max_tasks_per_child_counts_direct_tasks() -> None:
    with Pool(1, max_tasks_per_child=2) as pool:
        pids = [pool.submit(helpers.pid).result(timeout=30) for _ in range(6)]
        assert pool._engine._direct_sent >= 2
        assert len(set(pids)) == 3 and pids[0] == pids[1] and pids[2] == pids[3]


def test_an_idle_worker_killed_from_outside_is_replaced() -> None:
    # The loop does not read an idle worker's socket; its death must still be seen.
    with Pool(2) as pool:
        _warm(pool)
        victim = pool.worker_pids()[0]
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            pids = pool.worker_pids()
            if victim not in pids and len(pids) == 2:
                break
            time.sleep(0.01)
        assert victim not in pool.worker_pids() and len(pool.worker_pids()) == 2
        assert [pool.submit(helpers.add, i).result(timeout=30) for i in range(4)] == [1, 2, 3, 4]
        assert pool.stats().crashed == 0  # it held no task


def test_polling_result_with_tiny_timeouts_completes() -> None:
    # Each timed-out result() hands the reply back; the last one must still get it.
    with Pool(1) as pool:
        _warm(pool)
        before = pool._engine._direct_sent
        slow = pool.submit(helpers.sleep_then, 0.3, "polled")
        assert pool._engine._direct_sent - before == 1
        deadline = time.monotonic() + 30
        value = None
        while time.monotonic() < deadline:
            try:
                value = slow.result(timeout=0.001)
                break
            except concurrent.futures.TimeoutError:
                continue
        assert value == "polled"


def test_a_worker_dying_while_its_grandchild_lives_is_seen(tmp_path: Path) -> None:
    # The grandchild holds the worker's socket and multiprocessing's sentinel open;
    # the pool must see the worker's own death (a pidfd), not wait for the grandchild.
    pid_file = tmp_path / "grandchild"
    with Pool(1) as pool:
        _warm(pool)
        future = pool.submit(helpers.die_leaving_a_grandchild, str(pid_file))
        try:
            with pytest.raises(WorkerCrashedError):
                future.result(timeout=30)  # the grandchild lives 60 s
            assert pool.submit(helpers.add, 1).result(timeout=30) == 2
        finally:
            if pid_file.exists():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid_file.read_text()), signal.SIGKILL)


def test_more_shared_blocks_than_a_frame_carries_fail_at_submit() -> None:
    with Pool(1) as pool:
        _warm(pool)
        segments = [Segment.create(16) for _ in range(MAX_FDS + 1)]
        try:
            with pytest.raises(ValueError, match="at most"):
                pool.submit(helpers.identity, segments)
        finally:
            for segment in segments:
                segment.close()
        assert pool.submit(helpers.add, 1).result(timeout=30) == 2
        assert pool.stats().queued == 0


def test_a_result_with_more_shared_blocks_than_a_frame_carries_fails_that_task() -> None:
    with Pool(1) as pool:
        _warm(pool)
        (pid,) = pool.worker_pids()
        with pytest.raises(ValueError, match="a result can carry at most"):
            pool.submit(helpers.many_segments, MAX_FDS + 1).result(timeout=30)
        assert pool.submit(helpers.add, 1).result(timeout=30) == 2
        assert pool.worker_pids() == [pid]  # the worker carried on
        assert pool.stats().crashed == 0


class _Interrupted(BaseException):
    """What a SIGALRM handler raises in the waiting thread, as Ctrl-C raises
    KeyboardInterrupt (a BaseException)."""


def _raise_interrupted(_signum: int, _frame: object) -> None:
    raise _Interrupted


def test_an_interrupted_wait_loses_nothing() -> None:
    # Ctrl-C in result() cuts the thread that reads the reply: the task must still
    # complete, a later wait must get its result, and the pool must shut down. Nothing
    # was taken from the worker's socket, so the worker stays too.
    previous = signal.signal(signal.SIGALRM, _raise_interrupted)
    interrupted = False
    try:
        with Pool(1) as pool:
            _warm(pool)
            (pid,) = pool.worker_pids()
            before = pool._engine._direct_sent
            task = pool.submit(helpers.sleep_then, 0.5, "kept")
            assert pool._engine._direct_sent - before == 1
            signal.setitimer(signal.ITIMER_REAL, 0.05)  # while the caller waits
            try:
                task.result(timeout=30)
            except _Interrupted:
                interrupted = True
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            assert interrupted
            assert task.result(timeout=30) == "kept"
            assert pool.submit(helpers.add, 1).result(timeout=30) == 2
            assert pool.worker_pids() == [pid]
    finally:
        signal.signal(signal.SIGALRM, previous)


def test_an_interrupt_after_the_reply_was_read_still_settles_the_task(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The reply is already out of the socket when the interrupt lands: only the
    # thread holds it, so the pool must settle the task from it, not wait forever.
    with Pool(1) as pool:
        _warm(pool)
        real = pool._engine._finish_direct
        calls = []

        def interrupted_once(*args: object) -> bool:
            calls.append(args)
            if len(calls) == 1:
                raise _Interrupted
            return real(*args)  # type: ignore[arg-type]

        monkeypatch.setattr(pool._engine, "_finish_direct", interrupted_once)
        task = pool.submit(helpers.add, 41)
        with pytest.raises(_Interrupted):
            task.result(timeout=30)
        assert task.result(timeout=30) == 42
        monkeypatch.undo()
        assert [pool.submit(helpers.add, i).result(timeout=30) for i in range(3)] == [1, 2, 3]


def _only_worker(pool: Pool) -> Any:
    (worker,) = pool._engine._workers.values()
    return worker


def test_a_reply_lost_by_a_cut_read_fails_its_task_and_nothing_else(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The interrupt lands after the reply left the socket and before the thread kept
    # it: the channel knows a frame was taken, so the task fails with ReplyLostError
    # instead of waiting forever, and the worker (whose stream is in doubt) goes.
    with Pool(1) as pool:
        _warm(pool)
        handle = _only_worker(pool).handle
        first_pid = handle.pid
        real = handle.read_now

        def read_then_drop(timeout: float | None) -> object:
            frame = real(timeout)
            assert frame is not None
            raise _Interrupted

        monkeypatch.setattr(handle, "read_now", read_then_drop)
        monkeypatch.setattr(pool._engine, "_spin_for_reply", lambda _handle: None)
        before = pool._engine._direct_sent
        task = pool.submit(helpers.add, 41)
        assert pool._engine._direct_sent - before == 1
        with pytest.raises(_Interrupted):
            task.result(timeout=30)
        monkeypatch.undo()
        with pytest.raises(ReplyLostError, match="was lost"):
            task.result(timeout=30)
        assert [pool.submit(helpers.add, i).result(timeout=30) for i in range(3)] == [1, 2, 3]
        assert pool.stats().failed == 1
        assert pool.stats().crashed == 0
        assert pool.worker_pids() != [first_pid]


def test_a_read_cut_mid_frame_replaces_the_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    # Cut between the socket and the buffer, the stream's frame boundaries are lost:
    # the task fails with ReplyLostError and the worker is replaced.
    with Pool(1) as pool:
        _warm(pool)
        handle = _only_worker(pool).handle
        first_pid = handle.pid
        reader = handle._channel._reader
        real = reader.read_from

        def take_some_then_cut(sock: object) -> int:
            real(sock)
            raise _Interrupted

        monkeypatch.setattr(reader, "read_from", take_some_then_cut)
        monkeypatch.setattr(pool._engine, "_spin_for_reply", lambda _handle: None)
        task = pool.submit(helpers.add, 41)
        with pytest.raises(_Interrupted):
            task.result(timeout=30)
        monkeypatch.undo()
        with pytest.raises(ReplyLostError):
            task.result(timeout=30)
        assert pool.submit(helpers.add, 1).result(timeout=30) == 2
        assert pool.worker_pids() != [first_pid]


def test_a_claim_left_by_a_cut_cleanup_is_given_back(monkeypatch: pytest.MonkeyPatch) -> None:
    # The interrupt lands in result()'s cleanup, before it gives the worker's socket
    # back: the loop sees the claiming call is gone and takes the socket back, so the
    # next task on that worker still completes.
    with Pool(1) as pool:
        _warm(pool)
        handle = _only_worker(pool).handle
        calls = []

        def cut_release(*args: object, **kwargs: object) -> bool:
            calls.append(args)
            raise _Interrupted

        monkeypatch.setattr(handle, "release_reading", cut_release)
        task = pool.submit(helpers.add, 41)
        with pytest.raises(_Interrupted):
            task.result(timeout=30)
        monkeypatch.undo()
        assert calls and task.result(timeout=0) == 42
        assert handle.claimed_by() is not None  # left behind by the cut
        assert [pool.submit(helpers.add, i).result(timeout=30) for i in range(3)] == [1, 2, 3]
        assert handle.claimed_by() is None


@pytest.mark.parametrize("posted", [False, True])
def test_a_cut_while_passing_another_frame_on_never_hangs(
    monkeypatch: pytest.MonkeyPatch, posted: bool
) -> None:
    # The reading thread comes across a frame that is not its reply (here the late
    # result of a task nobody waits for) and is cut while it passes that frame on to
    # the loop: before it was posted, or after. The loop takes the frame (twice is
    # harmless), and since the cut thread had taken a frame, the task fails with
    # ReplyLostError and the worker is replaced: the pool goes on.
    with Pool(1) as pool:
        _warm(pool)
        handle = _only_worker(pool).handle
        first_pid = handle.pid
        stray = pack_call(proto.TASK, 999_999, dump_function(helpers.add), (1,), {}, None)
        assert handle.send_from_thread(stray.payload, [])
        real_post = pool._engine._post
        cuts = []

        def cut_post(fn: Any, *args: Any) -> None:
            if fn == pool._engine._on_message and not cuts:
                cuts.append(fn)
                if posted:
                    real_post(fn, *args)
                raise _Interrupted
            real_post(fn, *args)

        monkeypatch.setattr(pool._engine, "_post", cut_post)
        task = pool.submit(helpers.add, 41)
        with pytest.raises(_Interrupted):
            task.result(timeout=30)
        assert cuts
        monkeypatch.undo()
        with pytest.raises(ReplyLostError):
            task.result(timeout=30)
        assert [pool.submit(helpers.add, i).result(timeout=30) for i in range(3)] == [1, 2, 3]
        assert pool.worker_pids() != [first_pid]
        assert pool.stats().failed == 1


def test_a_submit_cut_before_its_frame_went_leaves_the_pool_working(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Ctrl-C in submit() after the task took the idle worker, before it was sent: the
    # worker must not wait for a reply that never comes.
    with Pool(1) as pool:
        _warm(pool)
        handle = _only_worker(pool).handle

        def cut_send(*args: object) -> bool:
            raise _Interrupted

        monkeypatch.setattr(handle, "send_from_thread", cut_send)
        before = pool._engine._direct_sent
        with pytest.raises(_Interrupted):
            pool.submit(helpers.add, 41)
        monkeypatch.undo()
        assert pool._engine._direct_sent - before == 1
        assert [pool.submit(helpers.add, i).result(timeout=30) for i in range(3)] == [1, 2, 3]
    assert pool.stats().failed == 1  # the cut task, which its caller never saw


def _run_module(*argv: str) -> str:
    """Run ``python -m argv...`` from the repository root; its output, or a failure."""
    root = Path(__file__).resolve().parents[2]
    try:
        done = subprocess.run(
            [sys.executable, "-m", *argv],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=180,
        )
    except subprocess.TimeoutExpired as exc:  # run() killed it: a hang
        pytest.fail(f"the interrupted pool hung: {exc.stdout!r} {exc.stderr!r}")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "OK:" in done.stdout
    # An error in the loop's thread does not fail the run by itself.
    assert "Exception in callback" not in done.stderr, done.stderr
    assert not _ours_ignored(done.stderr), done.stderr
    return done.stdout


_PACKAGE = str(Path(allcores.__file__).parent) + os.sep


def _ours_ignored(stderr: str) -> list[str]:
    """The "Exception ignored" reports in *stderr* that went through allcores' code.

    A cut can also land in a weakref callback or a ``__del__`` that the garbage
    collector runs meanwhile, in the standard library, where CPython reports and
    drops it (as it does a real Ctrl-C there): not the pool's to answer for.
    """
    reports = []
    for chunk in stderr.split("Exception ignored")[1:]:
        lines = chunk.splitlines()
        report = lines[:1]
        for line in lines[1:]:
            report.append(line)
            if line and not line[0].isspace() and not line.startswith("Traceback"):
                break  # the exception's own line ends the report
        if any(_PACKAGE in line for line in report):
            reports.append("\n".join(report))
    return reports


@pytest.mark.parametrize("seed", [1, 2])
def test_interrupts_at_random_moments_lose_nothing(seed: int) -> None:
    # The whole direct path under fire: see tests/pool/interrupt_fuzz.py.
    _run_module("tests.pool.interrupt_fuzz", str(seed), "300", "20")


@pytest.mark.parametrize(
    ("workers", "max_tasks", "which"),
    [(1, 0, "any"), (2, 3, "any"), (1, 0, "first"), (2, 3, "first")],
)
def test_an_interrupt_at_each_point_of_a_round_trip_loses_nothing(
    workers: int, max_tasks: int, which: str
) -> None:
    # Every point where CPython could raise KeyboardInterrupt, one after the other:
    # see tests/pool/cut_sweep.py. "first": the first round trip of a new pool,
    # which starts its loop and goes to a worker still starting. A new pool per point
    # is slow, so the two "first" runs take every other point each, between them all.
    extra = ["first", "2", str(1 + workers % 2)] if which == "first" else []
    out = _run_module("tests.pool.cut_sweep", str(workers), str(max_tasks), *extra)
    # It did walk the round trip (the first one has more points: it binds the loop).
    assert int(out.split()[1]) > (75 if extra else 50)


def _idle_worker_that_takes_two(pool: Pool) -> ProcessWorker:
    """The handle of a one-worker pool's worker, idle, to which the loop sends the next
    two tasks at once (prefetch), as it does for tasks that run under a millisecond; a
    slow machine (coverage) may have measured the first one above that."""
    assert pool.submit(helpers.add, 1).result(timeout=30) == 2
    wait_until(lambda: len(pool._engine._idle) == 1, timeout=30)
    done = threading.Event()

    def tiny() -> None:
        pool._engine._run_ema = 0.0
        done.set()

    pool._engine._call(tiny)
    assert done.wait(30)
    handle = next(iter(pool._engine._workers.values())).handle
    assert isinstance(handle, ProcessWorker)
    return handle


def test_replies_sent_before_a_death_during_a_claim_are_read() -> None:
    """A worker that replies, then dies while a thread holds its socket past the EOF
    grace: the replies still in the socket settle their tasks once the claim ends."""
    with Pool(1) as pool:
        handle = _idle_worker_that_takes_two(pool)
        # Named by this frame, as `_wait_direct` names its claim: the loop's check
        # for claims whose thread left sees it on this thread's stack.
        token = sys._getframe()
        assert handle.claim_reading(token)
        try:
            # A timeout keeps them off the direct lane: the loop queues both to the one
            # worker, which replies to the first and dies in the second.
            ok = pool.schedule(helpers.add, (1,), timeout=30)
            crash = pool.schedule(helpers.exit_hard, (5,), timeout=30)
            assert not wait_gone(pool.worker_pids(), timeout=30)
            # The exit is seen and its grace passes while the claim stands.
            deadline = time.monotonic() + 30
            while not handle._finish_deferred and time.monotonic() < deadline:
                time.sleep(0.01)
            assert handle._finish_deferred
        finally:
            assert handle.release_reading(resume=False, token=token)
        assert ok.result(timeout=30) == 2
        with pytest.raises(WorkerCrashedError):
            crash.result(timeout=30)
        assert pool.submit(helpers.add, 2).result(timeout=30) == 3


def test_replies_of_a_dead_worker_the_loop_never_polled_are_read(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The exit's grace runs out before the loop polls the worker's socket again (uvloop
    runs due timers before polling): the replies already there still settle their tasks."""
    with Pool(1) as pool:
        handle = _idle_worker_that_takes_two(pool)
        # The idle worker's socket is not polled; from now on it never is again.
        monkeypatch.setattr(handle, "resume_reading", lambda: None)
        ok = pool.schedule(helpers.add, (1,), timeout=30)
        crash = pool.schedule(helpers.exit_hard, (5,), timeout=30)
        assert ok.result(timeout=30) == 2
        with pytest.raises(WorkerCrashedError):
            crash.result(timeout=30)
        assert pool.submit(helpers.add, 2).result(timeout=30) == 3
