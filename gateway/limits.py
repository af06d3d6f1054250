"""Connection counts shared by every worker process.

``max_connections`` and ``max_connections_per_ip`` are the site's limits,
whatever the number of workers: SO_REUSEPORT spreads one client's
connections over all of them, so counting per worker would let a client
hold ``workers`` times its share.  The counts live in one anonymous shared
memory area, made before the workers fork: a row per worker, holding its
total and a counter per address bucket.  Each worker writes only its own
row, so no lock is needed; a check sums the rows.

Two costs, both bounded:

* Addresses share a counter when they hash to the same bucket (CRC-32
  over :data:`BUCKETS`); the per-address limit then applies to them
  together.  With 65,536 buckets that takes two busy addresses colliding.
* Two workers admitting the same address at the same instant can both
  see room for one more, so a limit can be overshot by at most one
  connection per other worker.
"""

from __future__ import annotations

import mmap
import zlib

__all__ = ["BUCKETS", "SharedCounts", "Counts"]

#: Counters per worker for per-address counts.
BUCKETS = 65536
_SLOT = 4  # bytes per counter (unsigned 32-bit)


class SharedCounts:
    """The shared area for ``workers`` rows; make it before forking."""

    def __init__(self, workers: int = 1, buckets: int = BUCKETS):
        self.workers = workers
        self.buckets = buckets
        self._row = buckets + 1  # the row's total comes after its buckets
        self._memory = mmap.mmap(-1, workers * self._row * _SLOT)
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


class Counts:
    """One worker's view: it changes its own row and reads all of them."""

    def __init__(self, shared: SharedCounts, index: int):
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

    def add_unnamed(self, delta: int) -> None:
        """Count a connection in the total only: its client is not known
        yet (it has not sent its PROXY header)."""
        self._view[self._mine + self._buckets] += delta

    def add(self, bucket: int, delta: int) -> None:
        view, mine = self._view, self._mine
        view[mine + bucket] += delta
        view[mine + self._buckets] += delta
