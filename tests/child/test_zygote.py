"""The zygote on its own: spawns that do not wait, pids read late, kills by number,
forks that fail, a zygote that dies, and nothing left behind."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import multiprocessing.popen_fork
import os
import signal
import socket
from collections.abc import Iterator

import psutil
import pytest

from allcores._system import die_with_parent
from allcores.child import fds, zygote
from allcores.child.zygote import Zygote, ZygoteError
from allcores.ipc.channel import Channel, channel_pair
from tests.pool.conftest import wait_gone


def _report_pid(sock: socket.socket, parent: int) -> None:
    """A child: send its pid and its parent's, then wait for the end of its channel."""
    die_with_parent(parent)
    channel = Channel(sock)
    channel.send((os.getpid(), parent))
    with contextlib.suppress(Exception):
        channel.recv()


def _open_fds() -> set[int]:
    return {int(fd) for fd in os.listdir("/proc/self/fd")}


@pytest.fixture
def leak_check() -> Iterator[None]:
    before_fds = _open_fds()
    before_children = {p.pid for p in psutil.Process().children(recursive=True)}
    before_ends = fds.open_parent_ends()
    yield
    children = {p.pid for p in psutil.Process().children(recursive=True)} - before_children
    assert not wait_gone(children), "processes left behind"
    assert fds.open_parent_ends() - before_ends == set()
    assert _open_fds() - before_fds == set()


pytestmark = pytest.mark.usefixtures("leak_check")


def _spawn(z: Zygote, name: str = "child") -> tuple[zygote.Spawned, Channel]:
    parent_end, child_end = channel_pair()
    try:
        return z.spawn(child_end, name), Channel(parent_end)
    except BaseException:
        parent_end.close()
        raise
    finally:
        child_end.close()


class _Exits:
    """Collects the zygote's notices on an event loop of its own."""

    def __init__(self, z: Zygote) -> None:
        self.loop = asyncio.new_event_loop()
        self.seen: list[tuple[int | None, int | None, str | None]] = []
        z.watch(self.loop, lambda *notice: self.seen.append(notice))

    def wait_for(self, count: int) -> list[tuple[int | None, int | None, str | None]]:
        async def until() -> None:
            while len(self.seen) < count:
                await asyncio.sleep(0.01)

        self.loop.run_until_complete(asyncio.wait_for(until(), 30))
        return self.seen

    def close(self) -> None:
        self.loop.close()


def test_spawns_do_not_wait_and_pids_are_read_when_asked() -> None:
    z = Zygote(_report_pid)
    try:
        spawned = [_spawn(z, f"child-{i}") for i in range(3)]
        assert [s.number for s, _ in spawned] == [1, 2, 3]
        for s, channel in spawned:
            child_pid, parent = channel.recv()[0]
            assert s.pid == child_pid and parent == z.pid and s.error is None
            channel.close()
    finally:
        z.close()


def test_a_child_killed_before_its_pid_is_known() -> None:
    z = Zygote(_report_pid)
    exits = _Exits(z)
    try:
        s, channel = _spawn(z)
        z.kill(s.number)  # the zygote forks it first: requests are served in order
        assert exits.wait_for(1) == [(s.number, -signal.SIGKILL, None)]
        assert s.pid is not None
        channel.close()
    finally:
        z.close()
        exits.close()


def test_a_fork_that_fails_is_told_with_its_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_fork(self: object, process_obj: object) -> None:
        raise OSError(errno.EAGAIN, os.strerror(errno.EAGAIN))

    monkeypatch.setattr(multiprocessing.popen_fork.Popen, "_launch", no_fork)
    z = Zygote(_report_pid)  # forked with the patch: its forks fail
    monkeypatch.undo()
    exits = _Exits(z)
    try:
        s, channel = _spawn(z, "doomed")
        [(number, code, why)] = exits.wait_for(1)
        assert (number, code) == (s.number, None)
        assert why is not None and "could not fork doomed" in why and "Errno 11" in why
        assert s.pid is None and s.error == why
        # The zygote closed its end of the channel: the parent sees EOF, not a hang.
        assert channel.sock.recv(1) == b""
        channel.close()
    finally:
        z.close()
        exits.close()


def test_many_spawns_nobody_asks_a_pid_of_do_not_block(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(zygote, "MAX_UNANSWERED", 2)
    z = Zygote(_report_pid)
    try:
        spawned = [_spawn(z) for _ in range(6)]
        assert len(z._unanswered) <= 2
        assert all(s.pid for s, _ in spawned)
        for _s, channel in spawned:
            channel.close()
    finally:
        z.close()


def test_a_zygote_that_dies_answers_every_pid_and_spawns_no_more() -> None:
    z = Zygote(_report_pid)
    exits = _Exits(z)
    channels = []
    try:
        s, channel = _spawn(z)
        channels.append(channel)
        child_pid = channel.recv()[0][0]
        # Read before the zygote stops: the child can report its pid before the
        # zygote has sent its own answer about it.
        assert s.pid == child_pid
        os.kill(z.pid, signal.SIGSTOP)
        pending, pending_channel = _spawn(z)  # never read: the zygote is stopped
        channels.append(pending_channel)
        os.kill(z.pid, signal.SIGKILL)
        assert exits.wait_for(1)[0][0] is None  # the zygote is gone
        assert not wait_gone([child_pid])  # and its child with it (PR_SET_PDEATHSIG)
        assert s.pid == child_pid  # an answer read stays
        assert pending.pid is None and pending.error is not None and "gone" in pending.error
        with pytest.raises(ZygoteError):
            _spawn(z)
    finally:
        for channel in channels:
            channel.close()
        z.close()
        exits.close()


def test_close_ends_every_child() -> None:
    z = Zygote(_report_pid)
    spawned = [_spawn(z) for _ in range(2)]
    pids = [channel.recv()[0][0] for _s, channel in spawned]
    assert [s.pid for s, _ in spawned] == pids
    unasked, unasked_channel = _spawn(z)
    z.close()
    assert not wait_gone(pids)
    assert unasked.pid is None and unasked.error == "the pool's zygote is closed"
    unasked_channel.close()
    for _s, channel in spawned:
        channel.close()
    with pytest.raises(ZygoteError, match="closed"):
        _spawn(z)
