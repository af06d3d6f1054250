"""Connection counts shared by the worker processes."""

import fcntl
import os
import signal
import threading
import time
import zlib

import pytest

from gateway.limits import SharedCounts


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


def _child_holding_the_lock(shared: SharedCounts, then=None) -> int:
    """Fork a worker that takes the admission lock and, once it has said so,
    runs ``then`` and exits (or waits to be killed); its pid."""
    ready, told = os.pipe()
    pid = os.fork()
    if pid == 0:
        fcntl.lockf(shared.fd, fcntl.LOCK_EX)
        os.write(told, b"x")
        if then is None:
            time.sleep(60)
        else:
            then()
        os._exit(0)
    os.close(told)
    assert os.read(ready, 1) == b"x"
    os.close(ready)
    return pid


def _waits_for_a_lock(pid: int, fd: int) -> bool:
    """Whether process ``pid`` is blocked on a record lock of ``fd``'s file
    (Linux lists each waiter in /proc/locks after a "->")."""
    inode = os.fstat(fd).st_ino
    with open("/proc/locks") as locks:
        return any(
            "->" in line and fields[fields.index("->") + 4] == str(pid) and fields[fields.index("->") + 5].endswith(f":{inode}")
            for line in locks
            if "->" in (fields := line.split())
        )


@pytest.mark.skipif(not os.path.exists("/proc/locks"), reason="needs Linux's /proc/locks")
def test_two_workers_cannot_both_take_the_last_place() -> None:
    shared = SharedCounts(workers=2)
    bucket = shared.row(0).bucket("192.0.2.1")
    parent = os.getpid()

    def fill_the_address_up():
        # Only once the other worker waits for the lock (bounded: without
        # a lock it never will, and its admit has long returned).
        for _ in range(1000):
            if _waits_for_a_lock(parent, shared.fd):
                break
            time.sleep(0.01)
        shared.row(1).add(bucket, 1)

    pid = _child_holding_the_lock(shared, fill_the_address_up)
    # It looked while the other held the lock: without the lock it would
    # have seen the address's one place free.
    assert shared.row(0).admit(bucket, max_total=10, max_bucket=1) == "address"
    os.waitpid(pid, 0)
    assert shared.row(0).of(bucket) == 1


def test_a_worker_killed_while_admitting_does_not_stop_the_others() -> None:
    shared = SharedCounts(workers=2)
    pid = _child_holding_the_lock(shared)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    done = threading.Thread(target=shared.row(0).admit, args=(None, 10), daemon=True)
    done.start()
    done.join(10)
    assert not done.is_alive()
    assert shared.row(0).total() == 1


def test_admit_counts_until_a_limit_then_names_it() -> None:
    counts = SharedCounts(workers=1).row(0)
    bucket = counts.bucket("192.0.2.1")
    assert [counts.admit(bucket, 3, 2) for _ in range(3)] == [None, None, "address"]
    assert counts.admit(None, 3) is None
    assert counts.admit(counts.bucket("192.0.2.2"), 3, 2) == "total"
    assert counts.admit(None, 3) == "total"
    assert (counts.of(bucket), counts.total()) == (2, 3)
