"""Units of the SMTP front that need no network (the rest is in tests/e2e/)."""

from gateway.smtp import _tests, _total
from gateway.verdict import Verdict


def test_score_totals_reach_the_threshold_they_read_as() -> None:
    # 0.7 + 0.2 + 0.1 is 0.9999999999999999 in floats; a threshold of 1 must see 1.
    assert _total([Verdict(score=0.7), Verdict(score=0.2), Verdict(score=0.1)]) == 1.0


def test_tests_list_scored_verdicts_on_one_line() -> None:
    verdicts = [
        Verdict(plugin="dnsbl", score=10.0, result="listed bl.test"),
        Verdict(plugin="helo", result="helo=ok"),  # no score: not listed
        Verdict(plugin="x", score=-1.5, result="a\r\nb\tc"),
    ]
    assert _tests(verdicts) == "dnsbl:listed_bl.test(10),x:a__b_c(-1.5)"
    assert _tests([]) == "none"
