"""Connection counts shared by every worker process.

``max_connections`` and ``max_connections_per_ip`` are the site's limits,
whatever the number of workers: SO_REUSEPORT spreads one client's
connections over all of them, so counting per worker would let a client
hold ``workers`` times its share.  The counts live in one anonymous shared
memory area, made before the workers fork: a row per worker, holding its
total and a counter per address bucket.  Each worker writes only its own
row; a check sums the rows.

Admitting is "look, then count", and two workers doing it for the same
address at the same instant would both see room for one more.  So with
more than one worker, admitting holds a POSIX record lock (``lockf``) on
the area's file.  The kernel drops such a lock when its process dies, so
a worker killed while admitting cannot stop the others; the lock is held
for a few microseconds and costs two system calls per connection.
Releasing a connection only lowers a count and takes no lock.

The lock is only ever tried, never waited for in the kernel: a worker
that finds it taken sleeps on its event loop and tries again, so its
other sessions go on.  A holder that never lets go (a worker stopped
with SIGSTOP or held in a debugger) would otherwise stall every worker's
new connections; after :data:`LOCK_WAIT` seconds the connection is
admitted unlocked, with a warning.  The limits may then be overshot by
the few connections that race, which beats refusing all mail.

Addresses share a counter when they hash to the same bucket (CRC-32 over
:data:`BUCKETS`); the per-address limit then applies to them together.
With 65,536 buckets that takes two busy addresses colliding.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import logging
import mmap
import os
import tempfile
import time
import zlib

__all__ = ["BUCKETS", "LOCK_WAIT", "LOCKED", "SharedCounts", "Counts"]

log = logging.getLogger("smtpgate.limits")

#: Seconds a worker keeps trying the admission lock before admitting without it.
LOCK_WAIT = 1.0
#: What :meth:`Counts.try_admit` returns while another worker holds the lock.
LOCKED = "locked"
#: The first and the longest pause between two tries of a taken lock.
_FIRST_PAUSE, _LONGEST_PAUSE = 0.0002, 0.02
_TAKEN = frozenset({errno.EAGAIN, errno.EACCES})  # lockf(F_TLOCK) gives either

#: Counters per worker for per-address counts.
BUCKETS = 65536
_SLOT = 4  # bytes per counter (unsigned 32-bit)


class SharedCounts:
    """The shared area for ``workers`` rows; make it before forking."""

    def __init__(self, workers: int = 1, buckets: int = BUCKETS):
        self.workers = workers
        self.buckets = buckets
        self._row = buckets + 1  # the row's total comes after its buckets
        size = workers * self._row * _SLOT
        # One worker has no one to race: no file, no lock.
        self.fd = _shared_file(size) if workers > 1 else None
        self._memory = mmap.mmap(-1 if self.fd is None else self.fd, size)
        self._view = memoryview(self._memory).cast("I")

    def row(self, index: int) -> Counts:
        """What worker ``index`` counts with."""
        if not 0 <= index < self.workers:
            raise IndexError(f"worker {index} of {self.workers}")
        return Counts(self, index)

    def clear(self, index: int) -> None:
        """Forget a worker's connections (it is gone)."""
        start = index * self._row
        self._view[start:start + self._row] = memoryview(bytes(self._row * _SLOT)).cast("I")


def _shared_file(size: int) -> int:
    """A file only this process and its children can reach: workers map it
    and lock it."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("smtpgate-counts", os.MFD_CLOEXEC)
    else:  # not Linux: an unlinked temporary file serves as well
        with tempfile.TemporaryFile() as file:
            fd = os.dup(file.fileno())
    os.ftruncate(fd, size)
    return fd


class Counts:
    """One worker's view: it changes its own row and reads all of them."""

    def __init__(self, shared: SharedCounts, index: int):
        self._fd = shared.fd
        self._view = shared._view
        self._rows = range(0, shared.workers * shared._row, shared._row)
        self._mine = index * shared._row
        self._buckets = shared.buckets

    def bucket(self, ip: str) -> int:
        return zlib.crc32(ip.encode()) % self._buckets

    def total(self) -> int:
        """Open connections in every worker."""
        view, last = self._view, self._buckets
        return sum(view[row + last] for row in self._rows)

    def of(self, bucket: int) -> int:
        """Open connections from the addresses of ``bucket``, in every worker."""
        view = self._view
        return sum(view[row + bucket] for row in self._rows)

    async def admit(self, bucket: int | None, max_total: int, max_bucket: int = 0) -> str | None:
        """Count a connection from ``bucket`` if both limits leave room;
        otherwise the limit it met, ``"total"`` or ``"address"``.  A
        connection whose address is not known yet (``bucket`` None) counts
        in the total only.  Waits on the event loop while another worker
        admits (at most :data:`LOCK_WAIT`)."""
        found = self.try_admit(bucket, max_total, max_bucket)
        if found is not LOCKED:
            return found
        give_up, pause = time.monotonic() + LOCK_WAIT, _FIRST_PAUSE
        while time.monotonic() < give_up:
            await asyncio.sleep(pause)
            found = self.try_admit(bucket, max_total, max_bucket)
            if found is not LOCKED:
                return found
            pause = min(pause * 2, _LONGEST_PAUSE)
        log.warning(
            "another worker has held the connection-count lock for over %.1f s (stopped?); "
            "admitting without it, so the connection limits may be overshot", LOCK_WAIT)
        return self._admit(bucket, max_total, max_bucket)

    def try_admit(self, bucket: int | None, max_total: int, max_bucket: int = 0) -> str | None:
        """:meth:`admit` without waiting: :data:`LOCKED` if another worker
        holds the lock."""
        if self._fd is None:
            return self._admit(bucket, max_total, max_bucket)
        try:
            fcntl.lockf(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in _TAKEN:
                return LOCKED
            raise
        try:
            return self._admit(bucket, max_total, max_bucket)
        finally:
            fcntl.lockf(self._fd, fcntl.LOCK_UN)

    def _admit(self, bucket: int | None, max_total: int, max_bucket: int) -> str | None:
        if self.total() >= max_total:
            return "total"
        if bucket is None:
            self.add_unnamed(1)
            return None
        if self.of(bucket) >= max_bucket:
            return "address"
        self.add(bucket, 1)
        return None

    def add_unnamed(self, delta: int) -> None:
        """Count a connection in the total only: its client is not known
        yet (it has not sent its PROXY header)."""
        self._view[self._mine + self._buckets] += delta

    def add(self, bucket: int, delta: int) -> None:
        view, mine = self._view, self._mine
        view[mine + bucket] += delta
        view[mine + self._buckets] += delta
