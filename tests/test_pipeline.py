import asyncio
import logging
import time

import pytest

from gateway.pipeline import HELD_LOOP, run_stage
from gateway.plugins import HookCall
from gateway.replies import Reply
from gateway.verdict import Action, Verdict

REJECT = Verdict.reject(Reply(550, "5.7.1", "no"))


def call(name: str, fn, *args: str) -> HookCall:
    return HookCall(name, fn, args or ("session",), asyncio.iscoroutinefunction(fn))


async def test_raising_plugin_defers_with_451_and_logs_traceback(caplog: pytest.LogCaptureFixture) -> None:
    def boom(session):
        raise RuntimeError("kaboom")

    with caplog.at_level(logging.ERROR, "smtpgate"):
        out = await run_stage([call("boom", boom)], {"session": None}, 1.0, "S1")
    assert out.action is Action.DEFER
    assert (out.reply.code, out.reply.enhanced) == (451, "4.3.0")
    assert out.plugin == "boom"
    assert "plugin=boom" in caplog.text and "RuntimeError: kaboom" in caplog.text


async def test_overrunning_plugin_defers() -> None:
    async def slow(session):
        await asyncio.sleep(5)

    out = await run_stage([call("slow", slow)], {"session": None}, 0.05, "S1")
    assert (out.action, out.reply.code, out.result) == (Action.DEFER, 451, "error: timeout")


async def test_reject_beats_failure_and_plugins_run_concurrently() -> None:
    async def slow_reject(session):
        await asyncio.sleep(0.2)
        return REJECT

    def boom(session):
        raise ValueError

    loop = asyncio.get_running_loop()
    started = loop.time()
    out = await run_stage(
        [call("a", slow_reject), call("b", slow_reject), call("c", boom)], {"session": None}, 1.0, "S1"
    )
    assert loop.time() - started < 0.35  # concurrently, not 0.4 s
    assert out.action is Action.REJECT and out.plugin == "a"


async def test_non_verdict_return_is_a_failure() -> None:
    out = await run_stage([call("odd", lambda session: "ok")], {"session": None}, 1.0, "S1")
    assert out.action is Action.DEFER and out.result == "error: bad return value"


async def test_implementations_get_only_the_arguments_they_name() -> None:
    seen = {}

    def rcpt(recipient):
        seen["r"] = recipient

    await run_stage([call("p", rcpt, "recipient")], {"session": 1, "envelope": 2, "recipient": 3}, 1.0, "S1")
    assert seen == {"r": 3}


async def test_plain_hook_may_return_a_coroutine_when_it_must_wait() -> None:
    async def lookup() -> Verdict:
        await asyncio.sleep(0.01)
        return REJECT

    async def forever() -> None:
        await asyncio.sleep(5)

    def cached_or_wait(session):
        return None if session == "cached" else lookup()

    def stuck(session):
        return forever()

    assert (await run_stage([call("c", cached_or_wait)], {"session": "cached"}, 1.0, "S1")).action is Action.CONTINUE
    out = await run_stage([call("c", cached_or_wait)], {"session": "new"}, 1.0, "S1")
    assert out.action is Action.REJECT and out.plugin == "c"
    out = await run_stage([call("c", cached_or_wait), call("s", stuck)], {"session": "new"}, 0.1, "S1")
    assert out.action is Action.REJECT  # the stuck one is a 451, the reject is more severe
    out = await run_stage([call("s", stuck)], {"session": "new"}, 0.05, "S1")
    assert (out.action, out.reply.code, out.result) == (Action.DEFER, 451, "error: timeout")


async def test_among_several_hooks_the_overrunning_one_defers_and_is_cancelled(caplog: pytest.LogCaptureFixture) -> None:
    cancelled = asyncio.Event()

    async def slow(session):
        try:
            await asyncio.sleep(5)
        finally:
            cancelled.set()

    async def quick(session):
        await asyncio.sleep(0)
        return Verdict.tag(("X-Quick", "yes"))

    async def broken(session):
        await asyncio.sleep(0)
        raise LookupError("gone")

    loop = asyncio.get_running_loop()
    started = loop.time()
    with caplog.at_level(logging.ERROR, "smtpgate"):
        out = await run_stage([call("q", quick), call("s", slow), call("b", broken)], {"session": None}, 0.1, "S1")
    assert loop.time() - started < 1.0
    assert (out.action, out.reply.code, out.reply.enhanced) == (Action.DEFER, 451, "4.3.0")
    assert {(v.plugin, v.result) for v in out.parts if v.action is Action.DEFER} == {
        ("s", "error: timeout"), ("b", "error: exception")}
    assert any(v.plugin == "q" and v.headers == (("X-Quick", "yes"),) for v in out.parts)
    assert "plugin=s hook=slow: no answer within 0.1s" in caplog.text
    assert "plugin=b hook=broken raised" in caplog.text and "LookupError: gone" in caplog.text
    await asyncio.wait_for(cancelled.wait(), 1.0)


async def test_a_cancelled_stage_cancels_its_hooks() -> None:
    cancelled = []

    async def waits(session):
        try:
            await asyncio.sleep(5)
        except asyncio.CancelledError:
            cancelled.append(True)
            raise

    stage = asyncio.ensure_future(run_stage([call("a", waits), call("b", waits)], {"session": None}, 10.0, "S1"))
    await asyncio.sleep(0.05)
    stage.cancel()
    with pytest.raises(asyncio.CancelledError):
        await stage
    await asyncio.sleep(0)
    assert cancelled == [True, True]


async def test_a_plain_hook_that_holds_the_loop_is_named_in_the_log(caplog: pytest.LogCaptureFixture) -> None:
    def quick(session):
        return None

    def blocking(session):
        time.sleep(HELD_LOOP + 0.05)
        return REJECT

    with caplog.at_level(logging.WARNING, "smtpgate"):
        out = await run_stage([call("quick", quick), call("slowpoke", blocking)], {"session": None}, 1.0, "S1")
    assert out.action is Action.REJECT  # what it decided still counts
    (record,) = caplog.records
    assert record.getMessage().startswith("session=S1 plugin=slowpoke hook=blocking held the event loop for 0.")


@pytest.mark.parametrize("error", [SystemExit(1), KeyboardInterrupt(), asyncio.CancelledError()])
@pytest.mark.parametrize("shape", ["plain", "async", "async beside another"])
async def test_base_exceptions_from_a_hook_are_its_failure(error: BaseException, shape: str) -> None:
    # Let through, SystemExit and KeyboardInterrupt end the worker and every
    # session on it; a hook's own CancelledError closed the session unanswered.
    def plain(session):
        raise error

    async def asynchronous(session):
        await asyncio.sleep(0)
        raise error

    async def other(session):
        await asyncio.sleep(0)

    calls = [call("bad", plain if shape == "plain" else asynchronous)]
    if shape == "async beside another":
        calls.append(call("other", other))
    out = await run_stage(calls, {"session": None}, 1.0, "S1")
    assert (out.action, out.reply.code, out.reply.enhanced, out.plugin) == (Action.DEFER, 451, "4.3.0", "bad")


async def test_a_hook_that_swallows_its_cancellation_is_still_late() -> None:
    async def stubborn(session):
        for _ in range(3):
            try:
                await asyncio.sleep(0.1)
            except asyncio.CancelledError:
                continue
        return REJECT

    out = await run_stage([call("stubborn", stubborn)], {"session": None}, 0.05, "S1")
    assert (out.action, out.reply.code, out.result) == (Action.DEFER, 451, "error: timeout")


async def test_the_sessions_own_cancellation_still_cancels() -> None:
    async def slow(session):
        await asyncio.sleep(5)

    stage = asyncio.ensure_future(run_stage([call("slow", slow)], {"session": None}, 10.0, "S1"))
    await asyncio.sleep(0.01)
    stage.cancel()
    with pytest.raises(asyncio.CancelledError):
        await stage


async def _impatient(session):
    # A plugin's own asyncio.wait_for on a slow server: TimeoutError long
    # before hook_timeout, once logged as "no answer within 30.0s".
    await asyncio.wait_for(asyncio.sleep(5), 0.01)


async def _quits(session):
    await asyncio.sleep(0)
    raise asyncio.CancelledError("given up")  # beside another hook, once not logged at all


@pytest.mark.parametrize("hook,error", [(_impatient, "TimeoutError"), (_quits, "CancelledError")])
@pytest.mark.parametrize("beside", [False, True])
async def test_a_hooks_own_timeout_or_cancellation_is_its_logged_failure(
    hook, error: str, beside: bool, caplog: pytest.LogCaptureFixture
) -> None:
    async def other(session):
        await asyncio.sleep(0)

    calls = [call("own", hook)] + ([call("other", other)] if beside else [])
    with caplog.at_level(logging.ERROR, "smtpgate"):
        out = await run_stage(calls, {"session": None}, 30.0, "S1")
    assert (out.action, out.reply.code, out.plugin, out.result) == (Action.DEFER, 451, "own", "error: exception")
    assert f"plugin=own hook={hook.__name__} raised" in caplog.text and error in caplog.text
    assert "no answer within" not in caplog.text


@pytest.mark.parametrize("headers", [(("X Bad Name", "v"),), (("X-Ok", 3),), ("X-Not-A-Pair",)])
async def test_headers_that_cannot_be_written_are_the_plugins_failure(headers, caplog: pytest.LogCaptureFixture) -> None:
    # Found only when the message was written, they ended the session as
    # the gateway's own internal error.
    def tags(session):
        return Verdict(Action.TAG, headers=headers)

    with caplog.at_level(logging.ERROR, "smtpgate"):
        out = await run_stage([call("tags", tags)], {"session": None}, 1.0, "S1")
    assert (out.action, out.reply.code, out.plugin, out.result) == (Action.DEFER, 451, "tags", "error: bad return value")
    assert "plugin=tags hook=tags returned headers" in caplog.text


def test_awaitable_agrees_with_inspect() -> None:
    import asyncio
    import inspect

    from gateway.pipeline import _awaitable
    from gateway.verdict import CONTINUE

    class Waits:
        def __await__(self):  # type: ignore[no-untyped-def]
            yield

    async def hook() -> None:
        return None

    coroutine = hook()
    loop = asyncio.new_event_loop()
    try:
        for value in (None, CONTINUE, 0, (), coroutine, loop.create_future(), Waits()):
            assert _awaitable(value) == inspect.isawaitable(value), value
    finally:
        coroutine.close()
        loop.close()
