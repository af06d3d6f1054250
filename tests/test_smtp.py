"""Units of the SMTP front that need no network (the rest is in tests/e2e/)."""

from gateway.smtp import _field_lines, _tests, _total
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


def test_our_header_fields_end_every_line_in_crlf() -> None:
    # The next hop takes the message's line ends on trust (data(crlf=True));
    # field_value leaves a fold made with a bare LF as it is.
    assert _field_lines([("X-Folded", "one\n\ttwo"), ("X-Plain", "three")]) == (
        b"X-Folded: one\r\n\ttwo\r\nX-Plain: three\r\n"
    )
