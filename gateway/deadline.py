"""Time limits on waits, checked by one periodic timer per worker.

Every read from a client and every wait for the next hop is bounded
(``command_timeout``, ``data_timeout``, ``upstream_timeout``).  Wrapping
each wait in ``asyncio.timeout()`` allocates a timer, pushes it on the
loop's heap and cancels it again: about 14 % of the instructions the
gateway spent per message (measured with callgrind, bench/README.md).
Here a wait is bounded by storing an absolute time in a :class:`Deadline`
and cleared by storing :data:`NEVER`; the gateway looks at every
session's deadlines once per *tick* and runs the action of those that
have passed.  A limit therefore fires between its time and one tick
later; the tick is a tenth of the shortest limit, at most one second.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

__all__ = ["Deadline", "NEVER", "tick_for"]

log = logging.getLogger("smtpgate.deadline")

NEVER = math.inf


class Deadline:
    """One wait at a time: what to do if it is still going on at :attr:`at`."""

    __slots__ = ("at", "_action", "_clock")

    def __init__(self, clock: Callable[[], float]):
        self.at = NEVER
        self._action: Callable[[], None] | None = None
        self._clock = clock

    def arm(self, seconds: float, action: Callable[[], None]) -> None:
        """Run ``action`` if :meth:`disarm` has not been called within ``seconds``."""
        self.at = self._clock() + seconds
        self._action = action

    def disarm(self) -> None:
        self.at = NEVER

    def check(self, now: float) -> None:
        """Run the action if the deadline has passed (once)."""
        if self.at > now:
            return
        self.at = NEVER
        action, self._action = self._action, None
        if action is None:
            return
        try:
            action()
        except Exception:
            log.exception("time limit action failed")


def tick_for(*limits: float) -> float:
    """How often to check: a tenth of the shortest limit, within [0.02, 1] s."""
    return min(1.0, max(0.02, min(limits) / 10))
