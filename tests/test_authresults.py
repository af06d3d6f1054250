"""The clause texts kept per result (plugins._authresults.Memo) read
exactly as authres formats the clauses each time."""

from __future__ import annotations

import authres
from hypothesis import given, settings
from hypothesis import strategies as st

from plugins import _authresults as ar
from plugins import dkim, dmarc, spf
from plugins.dkim import DkimResult
from plugins.dmarc import DmarcRecord, DmarcResult
from plugins.spf import SpfOutcome, SpfResult

HOSTNAME = "gw.auth.example"

#: Printable and not, short and (sometimes) past MEMO_MAX_CHARS.
_TEXT = st.one_of(
    st.text(max_size=40),
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7e), max_size=40),
    st.sampled_from(["auth.test", "a.b.auth.test", "bench", "@auth.test", "x@auth.test", "rsa-sha256", "ab/+cd=", ""]),
    st.builds(lambda c, n: c * n, st.sampled_from(["x", "a.", "@"]), st.sampled_from([0, 3, 300, 1100])),
)
_B = st.one_of(_TEXT, st.text("ABCxyz019+/=", max_size=10))


def _spf_results() -> st.SearchStrategy[SpfResult]:
    # The plugin always has a domain, and a sender of it (spf._question).
    domains = _TEXT.filter(bool)
    return st.builds(
        lambda identity, result, domain, local, ip, helo, explanation: SpfResult(
            identity, result, domain, f"{local}@{domain}", ip, helo, explanation
        ),
        st.sampled_from(["mailfrom", "helo"]), st.sampled_from(spf.FINDINGS),
        domains, _TEXT, _TEXT, _TEXT, _TEXT,
    )


def _dkim_results() -> st.SearchStrategy[DkimResult]:
    return st.builds(DkimResult, st.sampled_from(dkim.FINDINGS), _TEXT, _TEXT, _TEXT, _TEXT, _B, _TEXT)


def _dmarc_results() -> st.SearchStrategy[DmarcResult]:
    records = st.one_of(st.none(), st.builds(DmarcRecord, st.sampled_from(["none", "reject"]), st.sampled_from(["none", "quarantine"])))
    return st.builds(
        DmarcResult, st.sampled_from(["pass", "fail", "none"]), st.sampled_from(dmarc.FINDINGS),
        _TEXT, records, _TEXT, _TEXT, _TEXT, st.integers(1, 3),
    )


def _value(results: list[object]) -> str:
    return ar.authentication_results(HOSTNAME, results)[1]


@settings(max_examples=150, deadline=None)
@given(st.lists(_spf_results(), min_size=1, max_size=2), st.lists(_dkim_results(), max_size=3), _dmarc_results())
def test_texts_are_what_authres_writes(spfs: list[SpfResult], dkims: list[DkimResult], result: DmarcResult) -> None:
    outcome = SpfOutcome("1", spfs[-1], spfs[0] if len(spfs) > 1 else None)
    objects = [*spf.ar_results(outcome), *dkim.ar_results(dkims), dmarc.ar_result(result)]
    for _ in range(2):  # formatted, then kept
        texts = [*spf.ar_texts(outcome), *dkim.ar_texts(dkims), dmarc._AR_TEXTS(result)]
        assert texts == [str(o) for o in objects]
        assert _value(texts) == _value(objects)


def test_no_signature_is_dkim_none() -> None:
    assert dkim.ar_texts([]) == [str(authres.DKIMAuthenticationResult(result="none"))]


def test_the_memo_is_bounded() -> None:
    made: list[int] = []

    def make(key: int) -> str:
        made.append(key)
        return f"clause {key}"

    memo = ar.Memo(make, lambda key: 1, size=3)
    assert [memo(k) for k in (1, 2, 1, 3, 4)] == ["clause 1", "clause 2", "clause 1", "clause 3", "clause 4"]
    assert made == [1, 2, 3, 4] and len(memo) == 3
    assert memo(1) == "clause 1" and made[-1] == 1  # the oldest went first


def test_long_values_are_not_kept() -> None:
    memo = ar.Memo(str, len)
    assert memo("x" * (ar.MEMO_MAX_CHARS + 1)) == "x" * (ar.MEMO_MAX_CHARS + 1)
    assert memo("y" * ar.MEMO_MAX_CHARS) and len(memo) == 1


def test_the_plugins_memos_are_bounded() -> None:
    for memo in (spf._AR_TEXTS, dkim._AR_TEXTS, dmarc._AR_TEXTS):
        assert memo.size == ar.MEMO_SIZE
    for i in range(ar.MEMO_SIZE + 10):
        dmarc._AR_TEXTS(DmarcResult("none", "none", f"d{i}.auth.test"))
    assert len(dmarc._AR_TEXTS) == ar.MEMO_SIZE


@settings(max_examples=100, deadline=None)
@given(_spf_results())
def test_spf_replies_are_made_once_per_result(result: SpfResult) -> None:
    assert spf._replies(result) == spf._make_replies(result)
    if len(result.sender) + len(result.helo) + len(result.domain) + len(result.ip) + len(result.explanation) <= ar.MEMO_MAX_CHARS:
        assert spf._replies(result) is spf._replies(result)


def test_spf_memos_are_bounded() -> None:
    assert spf._REPLIES.size == ar.MEMO_SIZE
    assert spf._question.cache_info().maxsize == 1024
