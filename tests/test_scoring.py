"""Summing scores against the [scoring] thresholds, and the fields that
record them (through the network: tests/e2e/test_scoring.py)."""

from gateway.config import ScoringSettings
from gateway.scoring import header_fields, judge, keep, summary, total
from gateway.verdict import CONTINUE, Action, Verdict


def test_score_totals_reach_the_threshold_they_read_as() -> None:
    # 0.7 + 0.2 + 0.1 is 0.9999999999999999 in floats; a threshold of 1 must see 1.
    assert total([Verdict(score=0.7), Verdict(score=0.2), Verdict(score=0.1)]) == 1.0


def test_the_summary_lists_scored_verdicts_on_one_line() -> None:
    verdicts = [
        Verdict(plugin="dnsbl", score=10.0, result="listed bl.test"),
        Verdict(plugin="helo", result="helo=ok"),  # no score: not listed
        Verdict(plugin="x", score=-1.5, result="a\r\nb\tc"),
    ]
    assert summary(verdicts) == "dnsbl:listed_bl.test(10),x:a__b_c(-1.5)"
    assert summary([]) == "none"


def test_only_verdicts_with_a_score_a_header_or_a_tag_are_kept() -> None:
    scored, tagged, headed = Verdict(score=1.0), Verdict(action=Action.TAG), Verdict(headers=(("X-A", "b"),))
    kept: list[Verdict] = []
    for verdict in (CONTINUE, Verdict(plugin="quiet"), scored, tagged, headed):
        keep(verdict, kept)
    assert kept == [scored, tagged, headed]


def test_the_highest_threshold_reached_decides() -> None:
    scoring = ScoringSettings(reject=10.0, defer=5.0, tag=2.0)
    verdicts = [Verdict(plugin="a", score=4.0, result="r"), Verdict(plugin="b", score=0.9)]
    assert judge(scoring, verdicts) is CONTINUE  # 4.9: tagged in the headers only
    verdicts.append(Verdict(plugin="c", score=0.1))  # 5.0 reaches `defer`
    assert str(judge(scoring, verdicts).reply) == "451 4.7.1 Error: message deferred, spam score 5.0, try again later"
    rejected = judge(scoring, [Verdict(plugin="a", score=10.0, result="r")])
    assert rejected.action is Action.REJECT and rejected.plugin == "scoring" and rejected.result == "a:r(10)"
    assert str(rejected.reply) == "554 5.7.1 Error: message rejected as spam (score 10.0)"
    assert judge(ScoringSettings(), [Verdict(score=100.0)]) is CONTINUE  # no thresholds: headers only


def test_header_fields_say_the_sum_against_the_lowest_threshold() -> None:
    verdicts = [Verdict(plugin="a", score=3.0, result="r"), Verdict(plugin="t", action=Action.TAG, result="odd")]
    assert header_fields(ScoringSettings(reject=5.0, tag=3.0), verdicts) == [
        ("X-Smtpgate-Tag", "t: odd"),
        ("X-Spam-Score", "3.0"),
        ("X-Spam-Status", "Yes, score=3.0 required=3.0 tests=a:r(3)"),
    ]
    assert header_fields(ScoringSettings(headers=False), verdicts) == [("X-Smtpgate-Tag", "t: odd")]
    assert header_fields(ScoringSettings(), verdicts[:1])[-1] == ("X-Spam-Status", "No, score=3.0 tests=a:r(3)")
