"""Connection counts shared by the worker processes."""

import os
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
