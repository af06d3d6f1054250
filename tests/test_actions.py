"""From a plugin's finding to the verdict the policy gives it."""

from dataclasses import dataclass
from typing import ClassVar

from gateway.actions import ActionOptions, check_actions, decide
from gateway.replies import Reply
from gateway.verdict import Action

REJECT = Reply(550, "5.7.23", "<a@b.example>: SPF fail")
DEFER = Reply(451, "4.7.24", "<a@b.example>: SPF temperror")
HEADERS = (("Received-SPF", "fail"),)


def test_reject_and_defer_use_the_plugins_replies() -> None:
    actions = {"fail": "reject", "temperror": "defer"}
    verdict = decide("fail", actions, reject=REJECT, defer=DEFER, headers=HEADERS)
    assert (verdict.action, verdict.reply, verdict.headers, verdict.result) == (Action.REJECT, REJECT, HEADERS, "fail")
    assert decide("temperror", actions, reject=REJECT, defer=DEFER).reply == DEFER


def test_defer_without_a_temporary_reply_is_the_rejects_4yz_twin() -> None:
    verdict = decide("fail", {"fail": "defer"}, reject=REJECT)
    assert verdict.action is Action.DEFER
    assert str(verdict.reply) == "451 4.7.23 <a@b.example>: SPF fail"


def test_a_score_continues_and_carries_the_score() -> None:
    verdict = decide("softfail", {"softfail": 2.5}, reject=REJECT, headers=HEADERS)
    assert (verdict.action, verdict.score, verdict.reply, verdict.headers) == (Action.CONTINUE, 2.5, None, HEADERS)


def test_tag_accept_and_unmapped_findings() -> None:
    actions = {"neutral": "tag", "pass": "accept"}
    assert decide("neutral", actions, reject=REJECT).action is Action.TAG
    assert decide("pass", actions, reject=REJECT).action is Action.ACCEPT
    unmapped = decide("none", actions, reject=REJECT, headers=HEADERS, result="spf=none")
    assert (unmapped.action, unmapped.headers, unmapped.result) == (Action.CONTINUE, HEADERS, "spf=none")


def test_reject_without_a_reply_refuses_nothing() -> None:
    # A finding the plugin has no refusal for (say, a pass) cannot be made one.
    assert decide("pass", {"pass": "reject"}).action is Action.CONTINUE


def test_check_actions_names_each_bad_key() -> None:
    bad = check_actions(
        {"fail": "bounce", "bogus": "reject", "temperror": "reject", "none": 1.0, "pass": "accept"},
        ("pass", "fail", "none", "temperror"),
        ("temperror",),
    )
    assert sorted(bad) == ["actions.bogus", "actions.fail", "actions.temperror"]
    assert "a finding of this plugin (pass, fail, none, temperror)" == bad["actions.bogus"]
    assert "temporary failure" in bad["actions.temperror"]


def test_policy_actions_are_merged_over_the_defaults() -> None:
    @dataclass(frozen=True)
    class Options(ActionOptions):
        DEFAULT_ACTIONS: ClassVar = {"fail": "reject", "temperror": "defer"}

    assert Options(actions={"softfail": 2.0, "fail": "tag"}).actions == {
        "fail": "tag", "temperror": "defer", "softfail": 2.0}
    assert Options().actions == {"fail": "reject", "temperror": "defer"}
