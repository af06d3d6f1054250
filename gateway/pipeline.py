"""Running one stage: every plugin's hook, concurrently, under a budget.

The core owns failure: a hook that raises, overruns ``hook_timeout`` or
returns something that is not a verdict counts as ``451 4.3.0`` from that
plugin, with the traceback in the log.  A crashed check therefore defers
mail; it never lets it through and never takes the session down.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Sequence
from typing import Any

from . import replies
from .plugins import HookCall
from .verdict import CONTINUE, Verdict, combine

__all__ = ["run_stage"]

log = logging.getLogger("smtpgate.pipeline")


def _failed(call: HookCall, why: str) -> Verdict:
    return Verdict.defer(replies.PLUGIN_FAILED, plugin=call.plugin, result=f"error: {why}")


async def _run_one(call: HookCall, kwargs: dict[str, Any], timeout: float, session_id: str) -> Verdict | None:
    try:
        async with asyncio.timeout(timeout):
            result = call.function(**{name: kwargs[name] for name in call.argnames})
            if inspect.isawaitable(result):
                result = await result
    except TimeoutError:
        log.error("session=%s plugin=%s hook=%s: no answer within %.1fs", session_id, call.plugin, call.function.__name__, timeout)
        return _failed(call, "timeout")
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("session=%s plugin=%s hook=%s raised", session_id, call.plugin, call.function.__name__)
        return _failed(call, "exception")
    if result is None:
        return None
    if not isinstance(result, Verdict):
        log.error(
            "session=%s plugin=%s hook=%s returned %r, not a Verdict or None",
            session_id, call.plugin, call.function.__name__, result,
        )
        return _failed(call, "bad return value")
    return result.by(call.plugin)


async def run_stage(
    calls: Sequence[HookCall], kwargs: dict[str, Any], timeout: float, session_id: str
) -> Verdict:
    """Call every implementation of one stage and combine their verdicts."""
    if not calls:
        return CONTINUE
    if len(calls) == 1:
        # Most stages have one or no implementation: skip the task machinery.
        return combine([await _run_one(calls[0], kwargs, timeout, session_id)])
    verdicts = await asyncio.gather(*(_run_one(c, kwargs, timeout, session_id) for c in calls))
    return combine(verdicts)
