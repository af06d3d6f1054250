import pytest

from gateway.replies import Reply
from gateway.verdict import CONTINUE, Action, Verdict, combine

REJ = Reply(554, "5.7.1", "no")
DEF = Reply(451, "4.7.1", "later")


def test_most_severe_wins_and_ties_go_to_policy_order() -> None:
    verdicts = [
        Verdict.tag(("X-A", "1"), plugin="a", score=1.0),
        Verdict.defer(DEF, plugin="b"),
        Verdict.reject(REJ, plugin="c"),
        Verdict.reject(Reply(550, "5.7.1", "also no"), plugin="d"),
    ]
    out = combine(verdicts)
    assert out.action is Action.REJECT
    assert out.plugin == "c" and out.reply == REJ
    assert out.headers == (("X-A", "1"),)
    assert out.score == 1.0


def test_none_means_continue() -> None:
    assert combine([None, None]) is CONTINUE
    assert combine([]) is CONTINUE


def test_scores_are_summed_even_without_action() -> None:
    out = combine([Verdict(score=2.5, plugin="a"), Verdict(score=1.5, plugin="b"), None])
    assert out.action is Action.CONTINUE and out.score == 4.0


def test_disconnect_breaks_a_tie_of_equal_severity() -> None:
    out = combine([Verdict.reject(REJ, plugin="a"), Verdict.reject(REJ, plugin="b", disconnect=True)])
    assert out.plugin == "b" and out.disconnect


@pytest.mark.parametrize(
    "make, why",
    [
        (lambda: Verdict.reject(DEF), "needs a 5yz reply, got 4"),
        (lambda: Verdict.defer(REJ), "needs a 4yz reply, got 5"),
        (lambda: Verdict(Action.REJECT), "needs a reply"),
        # A client that reads the enhanced code must read the same verdict.
        (lambda: Verdict.reject(Reply(550, "4.7.1", "no")), "needs an RFC 3463 code 5.x.y, got '4.7.1'"),
        (lambda: Verdict.defer(Reply(450, "5.7.1", "later")), "needs an RFC 3463 code 4.x.y, got '5.7.1'"),
        (lambda: Verdict.reject(Reply(550, "", "no")), "needs an RFC 3463 code 5.x.y, got ''"),
        (lambda: Verdict.reject(Reply(550, "5.7", "no")), "got '5.7'"),
        (lambda: Verdict.reject(Reply(550, "5.7.1.2", "no")), "got '5.7.1.2'"),
    ],
)
def test_refusals_need_a_reply_of_the_right_class(make, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        make()


def test_by_names_the_parts_a_plugin_combined() -> None:
    listed = Verdict(score=10.0, result="listed bl.test")
    allowed = Verdict(score=-5.0, result="allowed wl.test")
    folded = combine([listed, allowed]).by("dnsbl")
    assert folded.plugin == "dnsbl" and [p.plugin for p in folded.parts] == ["dnsbl", "dnsbl"]
    named = Verdict(plugin="dnsbl")
    assert named.by("dnsbl") is named  # nothing to change: the same object


def test_with_changes_exactly_what_replace_would() -> None:
    from dataclasses import fields, replace

    verdict = Verdict.reject(Reply(550, "5.7.1", "no"), plugin="a", headers=(("X-A", "1"),), score=2.0, result="r",
                             disconnect=True, parts=(Verdict(),))
    assert {f.name for f in fields(Verdict)} == {"action", "reply", "plugin", "headers", "score", "result",
                                                 "disconnect", "parts"}  # _with copies every field
    # by() also names the parts it was combined from
    assert verdict.by("b") == replace(verdict, plugin="b", parts=(Verdict(plugin="b"),))
    assert verdict._with(score=0.5, result="s") == replace(verdict, score=0.5, result="s")
    with pytest.raises(ValueError):
        verdict._with(reply=Reply(451, "4.3.0", "later"))  # still validated
