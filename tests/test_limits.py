"""Connection counts shared by the worker processes."""

import asyncio
import fcntl
import logging
import os
import signal
import time
import zlib

import pytest

from gateway import limits
from gateway.limits import LOCKED, SharedCounts


def test_rows_add_up_per_address_and_in_total() -> None:
    shared = SharedCounts(workers=2)
    first, second = shared.row(0), shared.row(1)
    a, b = first.bucket("192.0.2.1"), first.bucket("192.0.2.2")
    assert a != b
    first.add(a, 1)
    second.add(a, 1)
    second.add(b, 1)
    for view in (first, second):
        assert (view.of(a), view.of(b), view.total()) == (2, 1, 3)
    first.add(a, -1)
    assert (second.of(a), second.total()) == (1, 2)


def test_unnamed_connections_count_in_the_total_only() -> None:
    shared = SharedCounts(workers=2)
    first, second = shared.row(0), shared.row(1)
    bucket = first.bucket("192.0.2.1")
    first.add_unnamed(2)
    second.add(bucket, 1)
    assert (second.of(bucket), second.total()) == (1, 3)
    first.add_unnamed(-2)
    assert (first.of(bucket), first.total()) == (1, 1)


def test_clearing_a_gone_worker_forgets_its_connections() -> None:
    shared = SharedCounts(workers=2)
    first, second = shared.row(0), shared.row(1)
    bucket = first.bucket("192.0.2.1")
    first.add(bucket, 3)
    second.add(bucket, 1)
    shared.clear(0)
    assert (second.of(bucket), second.total()) == (1, 1)


def test_a_forked_worker_counts_in_the_same_memory() -> None:
    shared = SharedCounts(workers=2)
    bucket = shared.row(0).bucket("198.51.100.7")
    pid = os.fork()
    if pid == 0:
        shared.row(1).add(bucket, 5)
        os._exit(0)
    os.waitpid(pid, 0)
    assert shared.row(0).of(bucket) == 5


def test_bucket_is_the_same_in_every_process() -> None:
    # crc32, not hash(): str hashes differ between interpreter runs.
    assert SharedCounts().row(0).bucket("192.0.2.1") == zlib.crc32(b"192.0.2.1") % 65536 == 55


def test_row_index_is_checked() -> None:
    with pytest.raises(IndexError):
        SharedCounts(workers=2).row(2)


def _child_holding_the_lock(shared: SharedCounts, then=None) -> tuple[int, int]:
    """Fork a worker that takes the admission lock and, once it has said so,
    waits for a byte on the returned pipe, runs ``then`` and exits (or, with
    no ``then``, holds the lock until killed); its pid and the pipe."""
    ready, told = os.pipe()
    go, went = os.pipe()
    pid = os.fork()
    if pid == 0:
        fcntl.lockf(shared.fd, fcntl.LOCK_EX)
        os.write(told, b"x")
        if then is None:
            time.sleep(60)
        else:
            os.read(go, 1)
            then()
        os._exit(0)
    os.close(told)
    os.close(go)
    assert os.read(ready, 1) == b"x"
    os.close(ready)
    return pid, went


def test_two_workers_cannot_both_take_the_last_place() -> None:
    shared = SharedCounts(workers=2)
    bucket = shared.row(0).bucket("192.0.2.1")
    pid, go = _child_holding_the_lock(shared, lambda: shared.row(1).add(bucket, 1))
    # The other worker is between its look and its count: without the lock
    # this one would see the address's one place free and take it.
    assert shared.row(0).try_admit(bucket, max_total=10, max_bucket=1) is LOCKED
    os.write(go, b"x")
    assert asyncio.run(shared.row(0).admit(bucket, max_total=10, max_bucket=1)) == "address"
    os.waitpid(pid, 0)
    assert shared.row(0).of(bucket) == 1


def test_a_worker_killed_while_admitting_does_not_stop_the_others() -> None:
    shared = SharedCounts(workers=2)
    pid, _ = _child_holding_the_lock(shared)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    # The kernel dropped the lock with its holder: no wait at all.
    assert shared.row(0).try_admit(None, 10) is None
    assert shared.row(0).total() == 1


def test_a_stuck_holder_neither_blocks_the_loop_nor_stops_admission(monkeypatch, caplog) -> None:
    monkeypatch.setattr(limits, "LOCK_WAIT", 0.3)
    shared = SharedCounts(workers=2)
    pid, _ = _child_holding_the_lock(shared)  # as a worker stopped by SIGSTOP would
    ticks = 0

    async def main() -> str | None:
        async def tick() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        ticker = asyncio.create_task(tick())
        try:
            return await shared.row(0).admit(None, 10)
        finally:
            ticker.cancel()

    try:
        started = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="smtpgate.limits"):
            assert asyncio.run(main()) is None
        waited = time.monotonic() - started
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    assert waited >= 0.3
    # A blocking lockf would have frozen the loop for the whole wait.
    assert ticks >= 10
    assert shared.row(0).total() == 1
    assert "admitting without it" in caplog.text


def test_admit_counts_until_a_limit_then_names_it() -> None:
    counts = SharedCounts(workers=1).row(0)
    bucket = counts.bucket("192.0.2.1")
    assert [counts.try_admit(bucket, 3, 2) for _ in range(3)] == [None, None, "address"]
    assert asyncio.run(counts.admit(None, 3)) is None
    assert counts.try_admit(counts.bucket("192.0.2.2"), 3, 2) == "total"
    assert asyncio.run(counts.admit(None, 3)) == "total"
    assert (counts.of(bucket), counts.total()) == (2, 3)
