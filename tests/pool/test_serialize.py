"""Functions by reference or by value; large buffers out of band through memfd."""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
import pickle

import numpy as np
import pytest

from allcores.pool import Pool, _pull
from allcores.pool import _protocol as proto
from allcores.pool._serialize import (
    OOB_THRESHOLD,
    dump_function,
    load_function,
    pack,
    pack_call,
    read_head,
    unpack,
    wrap_large_bytes,
)
from allcores.shm.segment import Segment
from tests.pool import helpers

pytestmark = pytest.mark.usefixtures("no_leftovers")


def test_importable_functions_go_by_reference() -> None:
    blob = dump_function(helpers.add)
    assert blob == pickle.dumps(helpers.add, protocol=5)
    assert dump_function(helpers.add) is blob  # cached
    assert load_function(blob) is helpers.add


def test_lambdas_go_by_value() -> None:
    factor = 3
    blob = dump_function(lambda x: x * factor)
    assert load_function(blob)(2) == 6


def test_small_messages_stay_in_band() -> None:
    packed = pack(proto.TASK, 1, (b"x" * 100, bytearray(100)))
    assert packed.segment is None and packed.fds == []
    assert unpack(packed.payload, packed.fds) == (b"x" * 100, bytearray(100))
    packed.close()


def test_large_buffers_go_through_one_memfd() -> None:
    data = os.urandom(OOB_THRESHOLD * 2)
    array = np.arange(OOB_THRESHOLD, dtype=np.int64)
    packed = pack(proto.TASK, 7, wrap_large_bytes((data, bytearray(data), memoryview(data), array)))
    assert packed.segment is not None
    assert len(packed.payload) < OOB_THRESHOLD  # the data is not in the frame
    received = [os.dup(fd) for fd in packed.fds]
    packed.close()
    got_bytes, got_bytearray, got_view, got_array = unpack(bytes(packed.payload), received)
    assert got_view == data
    assert type(got_bytes) is bytes and got_bytes == data
    assert type(got_bytearray) is bytearray and got_bytearray == data
    assert np.array_equal(got_array, array)


@pytest.mark.parametrize(
    "value",
    [
        (b"blob", (1, 2.5, "s", None, True), {"k": [1, (2, 3)]}),  # a tiny task: fast path
        [list(range(20))],  # too long for the fast path: pickled the general way
        {1: "int key"},
        (1, [2, [3, [4]]]),  # too deep for the fast path
    ],
)
def test_plain_and_general_values_round_trip_the_same(value: object) -> None:
    packed = pack(proto.TASK, 3, value, 0.25)
    assert packed.fds == []
    assert unpack(packed.payload, []) == value
    assert read_head(packed.payload) == (proto.TASK, 0, 0, 3, 0.25)


def test_a_segment_deep_inside_arguments_still_travels() -> None:
    # Past the plain-value fast path's depth, the general path must find it.
    with Segment.create(64) as segment:
        segment.buf[:5] = b"hello"
        packed = pack(proto.TASK, 1, ([[segment]],))
        assert len(packed.fds) == 1
        received = [os.dup(fd) for fd in packed.fds]
        packed.close()
        ((inner,),) = unpack(packed.payload, received)[0]
        with inner:
            assert bytes(inner.buf[:5]) == b"hello"


def test_segments_inside_arguments_travel_as_fds() -> None:
    with Segment.create(16) as segment:
        segment.buf[:5] = b"hello"
        packed = pack(proto.TASK, 1, segment)
        assert len(packed.fds) == 1
        received = [os.dup(fd) for fd in packed.fds]
        packed.close()
        with unpack(packed.payload, received) as attached:
            assert bytes(attached.buf[:5]) == b"hello"


def test_large_arguments_and_results_round_trip_intact(pool: Pool) -> None:
    data = os.urandom(8 * 1024 * 1024)
    assert pool.submit(helpers.identity, data).result(timeout=60) == data
    assert pool.submit(helpers.nbytes, data).result(timeout=60) == len(data)
    buffer = bytearray(data)
    assert pool.submit(helpers.identity, buffer).result(timeout=60) == buffer
    view = memoryview(data)
    assert pool.submit(helpers.identity, view).result(timeout=60) == data
    array = np.random.default_rng(1).random((512, 1024))
    result = pool.submit(helpers.identity, array).result(timeout=60)
    assert np.array_equal(result, array)
    # Results keep their shared mapping alive after the segment's fd is closed.
    del array
    assert float(result.sum()) > 0


def test_a_100_mib_payload_round_trips(pool: Pool) -> None:
    data = b"\x5a" * (100 * 1024 * 1024)
    assert pool.submit(helpers.identity, data).result(timeout=60) == data


def test_large_bytes_arguments_reach_the_worker_intact_by_the_best_path(pool: Pool) -> None:
    data = os.urandom(4 * 1024 * 1024)
    digest = hashlib.sha256(data).hexdigest()
    assert pool.submit(helpers.sha256, data).result(timeout=60) == digest
    assert pool.submit(helpers.reverse, data).result(timeout=60) == data[::-1]
    blob = dump_function(helpers.sha256)
    if _pull.AVAILABLE and _pull.kernel_allows():
        # The worker copies the argument out of this process: no memfd, no fd.
        assert pool._engine._pull_ok
        packed = pack_call(proto.TASK, 1, blob, (data,), {}, pull_from=os.getpid())
        assert packed.segment is None and packed.fds == []
        assert len(packed.payload) < 1024
    else:
        assert not pool._engine._pull_ok
    # Mutable or not bytes: always through the memfd.
    for value in (bytearray(data), memoryview(data)):
        packed = pack_call(proto.TASK, 1, blob, (value,), {}, pull_from=os.getpid())
        assert packed.segment is not None
        packed.close()


def test_without_pulls_large_arguments_go_through_a_memfd(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_pull, "kernel_allows", lambda: False)  # as under Yama's scope 1
    data = os.urandom(1024 * 1024)
    with Pool(1) as pool:
        assert pool.submit(helpers.sha256, data).result(timeout=60) == (
            hashlib.sha256(data).hexdigest()
        )
        assert not pool._engine._pull_ok and pool._engine._pull_never


def test_a_worker_that_cannot_pull_turns_pulls_off_for_good() -> None:
    # A READY that says "pull": False (a seccomp profile denying the call, say).
    def ready(pool: Pool, pull: bool) -> None:
        (worker,) = pool._engine._workers.values()
        message = pack(proto.READY, 0, {"pid": 0, "pull": pull})
        done: concurrent.futures.Future[None] = concurrent.futures.Future()

        def deliver() -> None:  # on the pool's loop, like a real READY
            pool._engine._on_message(worker, message.payload, [])  # a ready worker: flags only
            done.set_result(None)

        pool._engine._call(deliver)
        done.result(timeout=30)

    with Pool(1) as pool:
        pool.submit(helpers.add, 1).result(timeout=30)
        ready(pool, False)
        assert not pool._engine._pull_ok and pool._engine._pull_never
        ready(pool, True)
        assert not pool._engine._pull_ok  # never again
        data = os.urandom(1024 * 1024)
        assert pool.submit(helpers.sha256, data).result(timeout=60) == (
            hashlib.sha256(data).hexdigest()
        )


def test_later_pools_trust_the_first_probe_that_succeeded() -> None:
    """Once a worker of this process could pull, later pools pull from their first
    task on, and their workers skip the probe."""
    with Pool(1) as first:
        first.submit(helpers.add, 1).result(timeout=30)
    allowed = _pull.AVAILABLE and _pull.kernel_allows()
    assert _pull.verified == allowed
    with Pool(1) as later:
        assert later._engine._pull_ok == allowed  # before any READY came
        data = os.urandom(1024 * 1024)
        assert later.submit(helpers.sha256, data).result(timeout=60) == (
            hashlib.sha256(data).hexdigest()
        )
    # An initializer may take the right away (setuid): its workers probe after it.
    with Pool(1, initializer=helpers.init_state, initargs=(1,)) as initialized:
        assert not initialized._engine._pull_ok
        initialized.submit(helpers.add, 1).result(timeout=30)
        assert initialized._engine._pull_ok == allowed


def test_the_pull_probe_and_its_errors() -> None:
    here = b"allcores probe " * 8
    assert _pull.AVAILABLE
    assert _pull.probe(os.getpid(), _pull.address_of(here), here)
    assert not _pull.probe(os.getpid(), _pull.address_of(here), here[::-1])
    with pytest.raises(OSError, match="could not copy a 16-byte argument"):
        _pull.pull_bytes(os.getpid(), 8, 16)  # no memory there
