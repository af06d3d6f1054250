"""Which event loop runs the gateway.

uvloop (libuv) runs the same asyncio code with about a third fewer
instructions per message than the standard loop: transports, callbacks and
timers are the bulk of a proxy's work, and uvloop does them in C.  It is
used when it is installed (``event_loop = "auto"``, as uvicorn does); the
standard loop stays available for platforms without uvloop and as a way
out should uvloop misbehave.
"""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import Callable, Coroutine
from typing import Any, Literal, TypeVar

__all__ = ["EventLoopKind", "available", "resolve", "run"]

EventLoopKind = Literal["auto", "asyncio", "uvloop"]
T = TypeVar("T")


def available() -> bool:
    """Whether uvloop can be imported here."""
    return importlib.util.find_spec("uvloop") is not None


def resolve(kind: EventLoopKind) -> Literal["asyncio", "uvloop"]:
    """The loop ``kind`` stands for on this machine."""
    if kind == "auto":
        return "uvloop" if available() else "asyncio"
    return kind


def _factory(kind: EventLoopKind) -> Callable[[], asyncio.AbstractEventLoop] | None:
    if resolve(kind) == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    return None  # asyncio.Runner's default: the standard loop


def run(main: Coroutine[Any, Any, T], kind: EventLoopKind) -> T:
    """``asyncio.run(main)`` on the chosen loop."""
    with asyncio.Runner(loop_factory=_factory(kind)) as runner:
        return runner.run(main)
