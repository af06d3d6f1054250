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
import time
from collections.abc import Awaitable, Sequence
from typing import Any

from . import replies
from .headers import is_field_name
from .plugins import HookCall
from .verdict import CONTINUE, Verdict, combine

__all__ = ["run_stage"]

log = logging.getLogger("smtpgate.pipeline")

#: A plain hook that runs longer than this (seconds) held up every session
#: of its worker meanwhile; nothing can interrupt it, so it is reported.
HELD_LOOP = 0.25


def _awaitable(result: object) -> bool:
    """``inspect.isawaitable``, answered at once for what most hooks return:
    for anything else it ends in the ``Awaitable`` ABC's isinstance check,
    about 1,500 instructions, a dozen times per message."""
    return result is not None and type(result) is not Verdict and inspect.isawaitable(result)


def _failed(call: HookCall, why: str) -> Verdict:
    return Verdict.defer(replies.PLUGIN_FAILED, plugin=call.plugin, result=f"error: {why}")


def _checked(call: HookCall, result: object, session_id: str) -> Verdict | None:
    if result is None:
        return None
    if not isinstance(result, Verdict):
        log.error(
            "session=%s plugin=%s hook=%s returned %r, not a Verdict or None",
            session_id, call.plugin, call.function.__name__, result,
        )
        return _failed(call, "bad return value")
    if result.headers and not _writable(result.headers):
        # Caught here, it is the plugin's failure (451, the session goes
        # on); at the end of DATA it would end the session as our own error.
        log.error(
            "session=%s plugin=%s hook=%s returned headers %r: not (name, value) pairs of a field name and a string",
            session_id, call.plugin, call.function.__name__, result.headers,
        )
        return _failed(call, "bad return value")
    return result.by(call.plugin)


def _writable(headers: object) -> bool:
    try:
        return all(is_field_name(name) and isinstance(value, str) for name, value in headers)  # type: ignore[attr-defined]
    except (TypeError, ValueError):  # not a sequence of pairs
        return False


def _raised(call: HookCall, session_id: str, error: BaseException | None = None) -> Verdict:
    log.error("session=%s plugin=%s hook=%s raised", session_id, call.plugin, call.function.__name__,
              exc_info=error or True)
    return _failed(call, "exception")


def _overran(call: HookCall, timeout: float, session_id: str) -> Verdict:
    log.error("session=%s plugin=%s hook=%s: no answer within %.1fs", session_id, call.plugin, call.function.__name__, timeout)
    return _failed(call, "timeout")


async def _awaited(call: HookCall, pending: Awaitable[object], timeout: float, session_id: str) -> Verdict | None:
    try:
        async with asyncio.timeout(timeout) as budget:
            result = await pending
    except TimeoutError:
        if not budget.expired():
            # The hook's own TimeoutError (its own wait_for on a slow
            # server): its failure, with its traceback, not our budget's.
            return _raised(call, session_id)
        return _overran(call, timeout, session_id)
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is None or task.cancelling():
            raise  # the session's own cancellation: the client is gone
        return _raised(call, session_id)  # the hook's own CancelledError
    except BaseException:
        # SystemExit or KeyboardInterrupt from a plugin is its failure; let
        # through, it would end the worker and every session on it.
        return _raised(call, session_id)
    if budget.expired():
        # The hook caught the cancellation and answered anyway, late.
        return _overran(call, timeout, session_id)
    return _checked(call, result, session_id)


async def _contained(pending: Awaitable[object]) -> object:
    """``pending``, with SystemExit and KeyboardInterrupt made plain
    exceptions: raised in a task, asyncio passes them out of the event loop."""
    try:
        return await pending
    except (SystemExit, KeyboardInterrupt) as exc:
        raise RuntimeError(f"hook raised {exc!r}") from exc


def _outcome(call: HookCall, task: asyncio.Future[object], timeout: float, session_id: str) -> Verdict | None:
    """The verdict of one of several hooks awaited together."""
    if not task.done():
        return _overran(call, timeout, session_id)  # cancelled by run_stage
    if task.cancelled():
        # A task run_stage cancelled is not done yet here: this one raised
        # CancelledError itself, a failure like any other, logged with
        # where it came from.
        try:
            task.result()
        except asyncio.CancelledError as cancelled:
            return _raised(call, session_id, cancelled)
    error = task.exception()
    if error is not None:
        return _raised(call, session_id, error)
    return _checked(call, task.result(), session_id)


async def run_stage(
    calls: Sequence[HookCall], kwargs: dict[str, Any], timeout: float, session_id: str
) -> Verdict:
    """Call every implementation of one stage and combine their verdicts.

    Every hook is called here first; what a plain ``def`` returns is used
    at once, and only awaitables (``async def`` hooks, or a plain hook that
    returned a coroutine because it had to wait) are awaited, together,
    under ``timeout`` (one timer for all: they started together).  A task
    per hook costs more than most hooks' own work when their answers are
    cached, so one awaitable is awaited directly and a stage of plain hooks
    creates none.
    """
    verdicts: list[Verdict | None] = [None] * len(calls)
    pending: list[tuple[int, Awaitable[object]]] = []
    for index, call in enumerate(calls):
        started = time.perf_counter()
        try:
            result = call.function(**{name: kwargs[name] for name in call.argnames})
        except BaseException:
            # Whatever a plain call raises is the plugin's (SystemExit and
            # CancelledError too: nothing cancels a call that does not await).
            verdicts[index] = _raised(call, session_id)
            continue
        finally:
            held = time.perf_counter() - started
            if held > HELD_LOOP:
                log.warning(
                    "session=%s plugin=%s hook=%s held the event loop for %.2fs: every session of this "
                    "worker waited (blocking work belongs in an async hook or a thread)",
                    session_id, call.plugin, call.function.__name__, held,
                )
        if _awaitable(result):
            pending.append((index, result))
        else:
            verdicts[index] = _checked(call, result, session_id)
    if len(pending) == 1:
        index, awaitable = pending[0]
        verdicts[index] = await _awaited(calls[index], awaitable, timeout, session_id)
    elif pending:
        # The hooks started together, so one timer bounds them all.
        tasks = [asyncio.ensure_future(_contained(awaitable)) for _, awaitable in pending]
        try:
            await asyncio.wait(tasks, timeout=timeout)
        finally:
            for task in tasks:
                task.cancel()  # those that overran, or all if we are cancelled
        for (index, _), task in zip(pending, tasks):
            verdicts[index] = _outcome(calls[index], task, timeout, session_id)
    return combine(verdicts) if calls else CONTINUE
