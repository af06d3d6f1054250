"""Time limits checked by the gateway's periodic watch."""

import logging

import pytest

from gateway.deadline import NEVER, Deadline, tick_for
from tests.fixtures.clock import FakeClock


def test_fires_once_when_due_and_not_before() -> None:
    clock, fired = FakeClock(100.0), []
    deadline = Deadline(clock)
    deadline.arm(5, lambda: fired.append(clock.now))
    deadline.check(104.9)
    assert fired == []
    clock.now = 105.0
    deadline.check(105.0)
    deadline.check(106.0)
    assert fired == [105.0]
    assert deadline.at == NEVER


def test_disarmed_never_fires() -> None:
    fired = []
    deadline = Deadline(FakeClock(100.0))
    deadline.arm(1, lambda: fired.append(1))
    deadline.disarm()
    deadline.check(1e9)
    assert fired == []


def test_rearming_moves_the_deadline() -> None:
    clock, fired = FakeClock(100.0), []
    deadline = Deadline(clock)
    deadline.arm(1, lambda: fired.append("first"))
    clock.now += 0.9
    deadline.arm(1, lambda: fired.append("second"))
    deadline.check(clock.now + 0.5)
    assert fired == []
    deadline.check(clock.now + 1)
    assert fired == ["second"]


def test_failing_action_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    deadline = Deadline(FakeClock(100.0))
    deadline.arm(0, lambda: 1 / 0)
    with caplog.at_level(logging.ERROR, logger="smtpgate.deadline"):
        deadline.check(1e9)
    assert "ZeroDivisionError" in caplog.text


@pytest.mark.parametrize(("limits", "tick"), [((300, 300, 120), 1.0), ((0.5, 300), 0.05), ((0.01,), 0.02)])
def test_tick_is_a_tenth_of_the_shortest_limit_within_bounds(limits: tuple[float, ...], tick: float) -> None:
    assert tick_for(*limits) == pytest.approx(tick)
