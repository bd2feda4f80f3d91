"""SharedArray: one block of memory seen and changed by several processes."""

from __future__ import annotations

import asyncio
import json
import os
import pickle
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator

import numpy as np
import pytest

from allcores.errors import MissingDependencyError
from allcores.ipc import Channel
from allcores.shm import SharedArray, SharedArrayError, fd_transfer
from tests.conftest import Processes, wait_until


class Peer:
    """A tests.shm.array_peer process, driven one command line at a time."""

    def __init__(self, processes: Processes, pass_fds: tuple[int, ...] = ()) -> None:
        self.proc = processes.python(
            "-m",
            "tests.shm.array_peer",
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            pass_fds=pass_fds,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def send(self, line: str) -> str:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()
        reply = self.proc.stdout.readline().decode().strip()
        assert reply, f"peer {self.pid} died on {line!r} (exit {self.proc.poll()})"
        return reply


@pytest.fixture
def dev_shm() -> Iterator[set[str]]:
    """What /dev/shm holds before the test; the test compares at its end."""
    yield set(os.listdir("/dev/shm"))


def test_processes_see_and_change_the_same_memory_sent_over_a_channel(
    processes: Processes,
) -> None:
    arr = SharedArray(4, "int64")
    arr.numpy()[:] = [1, 2, 3, 4]
    ours, theirs = socket.socketpair()
    with ours, theirs:
        peer = Peer(processes, pass_fds=(theirs.fileno(),))
        with fd_transfer() as fds:
            payload = pickle.dumps(arr, protocol=5)
        Channel(ours, raw=True).send_bytes(payload, fds)
        assert json.loads(peer.send(f"recv {theirs.fileno()}")) == {"owner": False}

        assert json.loads(peer.send("read")) == [1, 2, 3, 4]
        peer.send("write 2 30")
        assert arr.numpy().tolist() == [1, 2, 30, 4]
        arr.numpy()[0] = 10
        assert json.loads(peer.send("read")) == [10, 2, 30, 4]
    arr.close()


def test_lock_makes_increments_from_several_processes_exact(processes: Processes) -> None:
    arr = SharedArray(1, "int64")
    handle = pickle.dumps(arr).hex()  # no channel: attachers use /proc/<our pid>/fd
    peers = [Peer(processes) for _ in range(3)]
    for peer in peers:
        peer.send(f"attach {handle}")
    times, threads = 300, 2
    for peer in peers:
        assert peer.proc.stdin is not None
        peer.proc.stdin.write(f"add {times} {threads}\n".encode())
        peer.proc.stdin.flush()
    view = arr.numpy()
    for _ in range(times):
        with arr.lock:
            view[0] = int(view[0]) + 1
    for peer in peers:
        assert peer.proc.stdout is not None
        assert peer.proc.stdout.readline().strip() == b"ok"
    assert int(view[0]) == times + len(peers) * times * threads
    arr.close()


def add_one_under_lock(arr: SharedArray) -> bool:
    view = arr.numpy()
    with arr.lock:
        view[0] = int(view[0]) + 1
    return arr.owner


async def test_pool_tasks_get_the_memory_itself_and_share_the_lock() -> None:
    from allcores.pool import Pool

    with SharedArray(1, "int64") as arr:
        async with Pool(max_workers=2) as pool:
            owners = await asyncio.gather(*(pool.run(add_one_under_lock, arr) for _ in range(60)))
        assert owners == [False] * 60  # every task got an attached copy, none the original
        assert arr.numpy()[0] == 60


def test_lock_is_exclusive_and_released_when_its_holder_is_killed(processes: Processes) -> None:
    arr = SharedArray(8, "uint8")
    holder = Peer(processes)
    holder.send(f"attach {pickle.dumps(arr).hex()}")
    holder.send("hold")
    assert arr.lock.acquire(blocking=False) is False

    os.kill(holder.pid, signal.SIGKILL)
    holder.proc.wait()
    # The kernel drops the dead holder's lock with its last fd.
    wait_until(lambda: arr.lock.acquire(blocking=False))
    other = Peer(processes)
    other.send(f"attach {pickle.dumps(arr).hex()}")
    assert json.loads(other.send("try")) is False  # we hold it now
    arr.lock.release()
    assert json.loads(other.send("try")) is True
    arr.close()


def test_a_forked_child_does_not_inherit_its_parents_hold_on_the_lock(
    processes: Processes,
) -> None:
    arr = SharedArray(1, "uint8")
    parent = Peer(processes)
    parent.send(f"attach {pickle.dumps(arr).hex()}")
    assert json.loads(parent.send("forktry")) is True  # nobody holds it
    parent.send("hold")
    assert json.loads(parent.send("forktry")) is False  # the child is a new holder
    # A child forked while its parent holds the lock gets it once the parent lets go.
    parent.send("forkwait")
    parent.send("release")
    assert json.loads(parent.send("forkresult")) is True
    arr.close()


def test_memory_outlives_a_sigkilled_owner_and_nothing_appears_in_dev_shm(
    processes: Processes, dev_shm: set[str]
) -> None:
    owner = Peer(processes)
    handle = owner.send("create 3 int32")
    owner.send("write 0 7")
    reader = Peer(processes)
    reader.send(f"attach {handle}")

    os.kill(owner.pid, signal.SIGKILL)
    assert owner.proc.wait() == -signal.SIGKILL

    assert json.loads(reader.send("read")) == [7, 0, 0]
    reader.send("write 2 5")
    assert json.loads(reader.send("read")) == [7, 0, 5]
    assert set(os.listdir("/dev/shm")) == dev_shm


def test_no_resource_tracker_warning_when_an_owner_exits_with_arrays_attached(
    processes: Processes, dev_shm: set[str]
) -> None:
    script = (
        "import pickle, subprocess, sys\n"
        "from allcores.shm import SharedArray\n"
        "arr = SharedArray((2, 2), 'float64')\n"
        "code = f'import pickle; a = pickle.loads(bytes.fromhex({pickle.dumps(arr).hex()!r}));"
        " a.numpy()[:] = 1.5'\n"
        "subprocess.run([sys.executable, '-c', code], check=True)\n"
        "assert arr.numpy().sum() == 6.0\n"
    )
    proc = processes.python("-c", script, stderr=subprocess.PIPE)
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err.decode()
    assert b"leaked" not in err and b"resource_tracker" not in err, err.decode()
    assert set(os.listdir("/dev/shm")) == dev_shm


def test_numpy_view_shares_memory_with_the_buffer_and_with_other_views() -> None:
    with SharedArray((2, 3), "float32") as arr:
        first, second = arr.numpy(), arr.numpy()
        assert first.shape == (2, 3) and first.dtype == np.float32
        assert np.shares_memory(first, second)
        first[1, 2] = 2.5
        assert second[1, 2] == 2.5
        assert arr.buf.cast("f")[5] == 2.5
        assert arr.nbytes == 24 and not first.flags.owndata
    # A view taken before close() stays valid (the mapping lives as long as it does).
    assert first[1, 2] == 2.5


def test_from_numpy_copies_once_into_shared_memory() -> None:
    source = np.arange(6, dtype=np.int16).reshape(2, 3)
    with SharedArray.from_numpy(source) as arr:
        assert (arr.shape, arr.dtype, arr.owner) == ((2, 3), "int16", True)
        assert arr.numpy().tolist() == source.tolist()
        assert not np.shares_memory(arr.numpy(), source)


def test_pickled_in_the_same_process_it_is_the_same_memory() -> None:
    with SharedArray(2, "uint16") as arr:
        twin = pickle.loads(pickle.dumps(arr))
        twin.numpy()[1] = 9
        assert arr.numpy()[1] == 9 and twin.owner is False
        with arr.lock:  # one lock for both objects, even in one process
            assert twin.lock.acquire(blocking=False) is False
        twin.close()


@pytest.mark.parametrize(
    ("shape", "dtype"),
    [(-1, "uint8"), ((2, -3), "uint8"), (1.5, "uint8"), ("4", "uint8"), (True, "uint8")],
)
def test_bad_shape_is_refused(shape: object, dtype: str) -> None:
    with pytest.raises(SharedArrayError, match="shape"):
        SharedArray(shape, dtype)  # type: ignore[arg-type]


@pytest.mark.parametrize("dtype", [object, "U8", ">f8", [("a", "i4")], "no-such-type"])
def test_dtypes_that_cannot_be_shared_are_refused(dtype: object) -> None:
    with pytest.raises(SharedArrayError, match="dtype"):
        SharedArray(4, dtype)


def test_use_after_close_says_so() -> None:
    arr = SharedArray(4)
    arr.close()
    arr.close()  # idempotent
    assert arr.closed
    with pytest.raises(SharedArrayError, match="closed"):
        arr.buf  # noqa: B018
    with pytest.raises(SharedArrayError, match="closed"):
        pickle.dumps(arr)


def test_missing_numpy_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    arr = SharedArray(4, "int32")  # plain dtype names need no numpy
    monkeypatch.setitem(sys.modules, "numpy", None)
    with pytest.raises(MissingDependencyError, match=r"pip install 'allcores\[numpy\]'"):
        arr.numpy()
    assert bytes(arr.buf) == bytes(16)
    arr.close()
