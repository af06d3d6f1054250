"""Tiny statistics helpers (stdlib only, so the harness has no extra deps)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence


def percentile(sorted_values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile of an already sorted sequence.

    Nearest-rank (not interpolation) so that p99 is always a latency some
    message really had.
    """
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(pct / 100.0 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan
