"""plugins.dmarc: policy discovery on the loopback DNS server, alignment,
policies, and the one Authentication-Results header of spf+dkim+dmarc."""

from __future__ import annotations

import inspect
import re
from dataclasses import replace
from typing import Any

import pytest

from gateway import Action, Message, Reply, Verdict
from gateway.config import PolicyError, policy_from_dict
from gateway.dns import Resolver
from gateway.pipeline import run_stage
from gateway.plugin import Context
from gateway.plugins import Registry, load_plugins
from plugins import _authresults as ar
from plugins import dmarc
from plugins.dkim import DkimResult
from plugins.dmarc import (
    Discovery,
    DmarcRecord,
    DmarcResult,
    aligned,
    cached_record,
    evaluate,
    find_record,
    organizational_domain,
    parse_record,
)
from plugins.spf import SpfResult
from tests.fixtures.clock import FakeClock
from tests.fixtures.dnsserver import DNSServer
from tests.test_dkim import key_record, publish_keys, sign
from tests.test_spf import (
    BAD_IP,
    GOOD_IP,
    HOSTNAME,
    TRUSTED,
    envelope,
    headers_named,
    session,
    unfold,
)

ALL = {"spf": {}, "dkim": {}, "dmarc": {}}


def message(author: str = "alice@auth.test", extra: bytes = b"") -> bytes:
    return (
        f"From: {author}\r\n".encode() + extra
        + b"To: bob@example.com\r\nSubject: invoice\r\nDate: Mon, 01 Jan 2024 00:00:00 +0000\r\n"
        b"Message-ID: <2@auth.test>\r\n\r\nPlease pay.\r\n"
    )


def registry(resolver: Resolver | None, plugins: dict[str, dict[str, Any]]) -> Registry:
    policy = policy_from_dict(
        {"gateway": {"hostname": HOSTNAME, "trusted_networks": [TRUSTED]}, "plugins": plugins}, "<test>"
    )
    return load_plugins(policy, Context(policy.gateway, resolver))


async def transaction(
    resolver: Resolver, raw: bytes, *, sender: str = "alice@auth.test", ip: str = GOOD_IP,
    helo: str = "mx.auth.test", plugins: dict[str, dict[str, Any]] | None = None,
) -> Verdict:
    """MAIL then DATA through the policy's plugins, as the core runs them:
    concurrently, verdicts combined.  MAIL refusals are returned as such."""
    reg = registry(resolver, ALL if plugins is None else plugins)
    s, e = session(ip, helo), envelope(sender)
    verdict = await run_stage(reg.calls["mail"], {"session": s, "envelope": e}, 5.0, s.id)
    if verdict.refuses:
        return verdict
    return await run_stage(reg.calls["data"], {"session": s, "envelope": e, "message": Message(raw)}, 5.0, s.id)


@pytest.fixture
def resolver(dns: DNSServer) -> Resolver:
    return Resolver([dns.nameserver], timeout=5.0)


@pytest.fixture
def keys(dns: DNSServer) -> DNSServer:
    """auth.test's key, and a third party (thirdparty.test) that sends from
    BAD_IP with its own SPF and key: authentic, but not auth.test."""
    publish_keys(dns, "auth.test", {"s1": key_record()})
    publish_keys(dns, "strict.auth.test", {"s1": key_record()})
    publish_keys(dns, "thirdparty.test", {"tp": key_record()})
    dns.add_zone("thirdparty.test", f'@ IN TXT "v=spf1 ip4:{BAD_IP} -all"')
    return dns


def dmarc_clause(verdict: Verdict) -> str:
    (header,) = headers_named(verdict, "Authentication-Results")
    return unfold(header).split("; ")[-1]


# ------------------------------------------------------------------ records


@pytest.mark.parametrize(
    "text, record",
    [
        ("v=DMARC1; p=reject", DmarcRecord("reject", "reject")),
        ("v=DMARC1;p=quarantine;sp=none;adkim=s;aspf=s;pct=20", DmarcRecord("quarantine", "none", "s", "s", 20)),
        ("v=DMARC1; P=Reject; SP=None", DmarcRecord("reject", "none")),
        ("v=DMARC1; p=none; adkim=x; aspf=; pct=150", DmarcRecord("none", "none")),
        ("v=DMARC1; p=bogus; rua=mailto:d@auth.test", DmarcRecord("none", "none")),  # RFC 7489 §6.6.3 step 6
        ("v=DMARC1; rua=mailto:d@auth.test", DmarcRecord("none", "none")),
        ("v=DMARC1; p=reject; p=none", DmarcRecord("reject", "reject")),  # first one counts
        # pct = 1*3DIGIT, ASCII digits (RFC 7489 §6.4, RFC 5234 B.1); anything
        # else is a syntax error, discarded for the default (§6.3), not a
        # number Python reads in another script, nor a reason to drop the record
        ("v=DMARC1; p=reject; pct=\u0665\u0660", DmarcRecord("reject", "reject")),  # Arabic-Indic 50
        ("v=DMARC1; p=reject; pct=\u00b9", DmarcRecord("reject", "reject")),  # superscript one
        ("v=DMARC1; p=reject; pct=\uff15", DmarcRecord("reject", "reject")),  # fullwidth five
        ("v=DMARC1; p=reject; pct=0050", DmarcRecord("reject", "reject")),  # four digits
        ("v=DMARC1; p=reject; pct=050", DmarcRecord("reject", "reject", pct=50)),
        # RFC 9091 §4.1 np=, the policy for subdomains that do not exist;
        # an invalid one is discarded (sp= then applies to them too)
        ("v=DMARC1; p=reject; sp=none; np=Quarantine", DmarcRecord("reject", "none", np="quarantine")),
        ("v=DMARC1; p=reject; sp=none; np=maybe", DmarcRecord("reject", "none")),
    ],
)
def test_parse_record(text: str, record: DmarcRecord) -> None:
    assert parse_record(text) == record
    assert parse_record(text) is parse_record(text)  # parsed once, not per message


@pytest.mark.parametrize("text", ["v=DMARC1", "v=DMARC1; p=bogus", "v=DMARC1; p=reject; sp=maybe"])
def test_unusable_records(text: str) -> None:
    with pytest.raises(ValueError):
        parse_record(text)


@pytest.mark.parametrize(
    "domain, org",
    [("auth.test", "auth.test"), ("a.b.news.auth.test", "auth.test"), ("x.example.co.uk", "example.co.uk"), ("co.uk", "co.uk")],
)
def test_organizational_domain_from_the_public_suffix_list(domain: str, org: str) -> None:
    assert organizational_domain(domain) == org


@pytest.mark.parametrize(
    "domain, author, mode, expected",
    [
        ("auth.test", "auth.test", "s", True),
        ("AUTH.TEST.", "auth.test", "s", True),
        ("news.auth.test", "auth.test", "s", False),
        ("news.auth.test", "auth.test", "r", True),
        ("auth.test", "a.b.auth.test", "r", True),
        ("thirdparty.test", "auth.test", "r", False),
        ("example.co.uk", "other.co.uk", "r", False),  # a public suffix is no common parent
        ("", "auth.test", "r", False),
    ],
)
def test_alignment(domain: str, author: str, mode: str, expected: bool) -> None:
    assert aligned(domain, author, mode) is expected


@pytest.mark.parametrize(
    "domain, status, at, p",
    [
        ("auth.test", "found", "auth.test", "reject"),
        ("news.auth.test", "found", "auth.test", "reject"),  # the org domain's record
        ("strict.auth.test", "found", "strict.auth.test", "reject"),
        ("notdmarc.auth.test", "found", "auth.test", "reject"),  # v=DMARC2 is not a record
        # RFC 7489 §6.6.3 step 5: more than one record ends discovery, with
        # no policy (not the organisational domain's either)
        ("twodmarc.auth.test", "none", "twodmarc.auth.test", ""),
        ("badpolicy.auth.test", "permerror", "badpolicy.auth.test", ""),
        ("nodmarc.test", "none", "", ""),
    ],
)
async def test_find_record(resolver: Resolver, dns: DNSServer, domain: str, status: str, at: str, p: str) -> None:
    dns.add_zone("nodmarc.test", '@ IN TXT "v=spf1 -all"')
    found = await find_record(resolver, domain)
    assert (found.status, found.at, found.record.p if found.record else "") == (status, at, p)


@pytest.mark.parametrize(
    "domain, exists",
    [
        ("np.test", True),  # its own record: np= is not for it, nothing asked
        ("ghost.np.test", False),  # NXDOMAIN
        ("txtonly.np.test", False),  # NODATA for A, AAAA and MX (RFC 9091 §2.1)
        ("www.np.test", True),  # A
        ("v6.np.test", True),  # AAAA
        ("mail.np.test", True),  # MX
        ("news.auth.test", True),  # auth.test has no np=: nothing asked
    ],
)
async def test_find_record_asks_whether_the_author_domain_exists_for_np(
    resolver: Resolver, dns: DNSServer, domain: str, exists: bool
) -> None:
    found = await find_record(resolver, domain)
    assert found.status == "found" and found.exists is exists
    asked = sum(dns.query_count(domain, rdtype) for rdtype in ("A", "AAAA", "MX"))
    assert asked == (3 if domain.endswith(".np.test") else 0)
    assert dmarc.cached_record(resolver, domain) == found


async def test_find_record_tempfail_and_cache(resolver: Resolver, dns: DNSServer) -> None:
    for _ in range(3):
        assert (await find_record(resolver, "news.auth.test")).status == "found"
    assert dns.query_count("_dmarc.news.auth.test", "TXT") == 1
    assert dns.query_count("_dmarc.auth.test", "TXT") == 1
    dns.servfail("_dmarc.quarantine.auth.test")
    found = await find_record(resolver, "quarantine.auth.test")
    assert found.status == "temperror" and "SERVFAIL" in found.error


@pytest.mark.parametrize("domain", ["auth.test", "news.auth.test", "twodmarc.auth.test", "badpolicy.auth.test",
                                    "nodmarc.test", "quarantine.auth.test"])
async def test_cached_record_is_find_record_without_asking(resolver: Resolver, dns: DNSServer, domain: str) -> None:
    dns.add_zone("nodmarc.test", '@ IN TXT "v=spf1 -all"')
    dns.servfail("_dmarc.quarantine.auth.test")
    assert dmarc.cached_record(resolver, domain) is None  # nothing cached yet
    found = await find_record(resolver, domain)
    asked = dns.query_count(f"_dmarc.{domain}"), dns.query_count("_dmarc.auth.test")
    assert dmarc.cached_record(resolver, domain) == found
    assert (dns.query_count(f"_dmarc.{domain}"), dns.query_count("_dmarc.auth.test")) == asked


async def test_a_warm_data_stage_answers_plainly_with_the_same_verdicts(resolver: Resolver, keys: DNSServer) -> None:
    """Keys, DMARC record and SPF result cached: the dkim and dmarc hooks
    answer without a coroutine, exactly as when they had to wait."""
    reg = registry(resolver, ALL)
    raw = sign(message())
    cold = await transaction(resolver, raw)
    s, e = session(GOOD_IP, "mx.auth.test"), envelope("alice@auth.test")
    await run_stage(reg.calls["mail"], {"session": s, "envelope": e}, 5.0, s.id)
    msg = Message(raw)
    answers = {c.plugin: c.function(session=s, envelope=e, message=msg) for c in reg.calls["data"]}
    assert not any(inspect.isawaitable(a) for a in answers.values()), answers
    warm = await run_stage(reg.calls["data"], {"session": s, "envelope": e, "message": Message(raw)}, 5.0, s.id)
    assert (warm.action, warm.result, warm.headers) == (cold.action, cold.result, cold.headers)


# ------------------------------------------------------------------ evaluation (pure)

RECORD = DmarcRecord("reject", "quarantine")
AT_ORG = Discovery("found", RECORD, "auth.test")


def spf_result(domain: str, result: str = "pass") -> SpfResult:
    return SpfResult("mailfrom", result, domain, f"x@{domain}", GOOD_IP, "mx.auth.test")


def dkim_result(domain: str, result: str = "pass") -> DkimResult:
    return DkimResult(result, domain, "s1")


@pytest.mark.parametrize(
    "author, spf, dkims, result, finding",
    [
        ("auth.test", spf_result("auth.test"), [], "pass", "pass"),
        ("auth.test", spf_result("news.auth.test"), [], "pass", "pass"),  # relaxed
        ("auth.test", None, [dkim_result("news.auth.test")], "pass", "pass"),
        ("auth.test", spf_result("thirdparty.test"), [dkim_result("thirdparty.test")], "fail", "reject"),
        ("auth.test", spf_result("auth.test", "softfail"), [dkim_result("auth.test", "fail")], "fail", "reject"),
        ("news.auth.test", spf_result("thirdparty.test"), [], "fail", "quarantine"),  # sp= for subdomains
        ("auth.test", spf_result("auth.test", "temperror"), [], "temperror", "temperror"),
        ("auth.test", None, [dkim_result("auth.test", "temperror")], "temperror", "temperror"),
        ("auth.test", spf_result("auth.test", "temperror"), [dkim_result("auth.test")], "pass", "pass"),
        ("auth.test", None, [dkim_result("thirdparty.test", "temperror")], "fail", "reject"),  # not aligned
    ],
)
def test_evaluate(author: str, spf: SpfResult | None, dkims: list[DkimResult], result: str, finding: str) -> None:
    outcome = evaluate(ar.Author(author), AT_ORG, spf, dkims)
    assert (outcome.result, outcome.finding) == (result, finding)


def test_strict_alignment() -> None:
    strict = Discovery("found", DmarcRecord("reject", "reject", "s", "s"), "strict.auth.test")
    author = ar.Author("strict.auth.test")
    assert evaluate(author, strict, spf_result("mail.strict.auth.test"), [dkim_result("auth.test")]).finding == "reject"
    assert evaluate(author, strict, None, [dkim_result("strict.auth.test")]).finding == "pass"
    assert evaluate(author, strict, spf_result("strict.auth.test"), []).finding == "pass"


def test_own_record_of_a_subdomain_uses_p() -> None:
    own = Discovery("found", RECORD, "news.auth.test")
    assert evaluate(ar.Author("news.auth.test"), own, None, []).finding == "reject"


@pytest.mark.parametrize(
    "p, sample, honour, finding, disposition",
    [
        ("reject", 0.49, True, "reject", "reject"),
        ("reject", 0.50, True, "quarantine", "quarantine"),  # outside pct=50
        ("quarantine", 0.99, True, "fail", "none"),
        ("reject", 0.99, False, "reject", "reject"),
    ],
)
def test_pct(p: str, sample: float, honour: bool, finding: str, disposition: str) -> None:
    record = Discovery("found", DmarcRecord(p, p, pct=50), "auth.test")
    outcome = evaluate(ar.Author("auth.test"), record, None, [], sample=sample, honour_pct=honour)
    assert (outcome.finding, outcome.disposition, outcome.policy) == (finding, disposition, p)


NP = DmarcRecord("reject", "none", np="quarantine")


@pytest.mark.parametrize(
    "discovery, result, finding, policy",
    [
        (Discovery("found", NP, "np.test", exists=False), "fail", "quarantine", "quarantine"),
        (Discovery("found", NP, "np.test", exists=True), "fail", "fail", "none"),
        (Discovery("found", NP, "np.test", exists=None), "temperror", "temperror", "none"),
        (Discovery("found", DmarcRecord("reject", "none"), "np.test", exists=False), "fail", "fail", "none"),
    ],
)
def test_np_applies_to_a_subdomain_that_does_not_exist(
    discovery: Discovery, result: str, finding: str, policy: str
) -> None:
    outcome = evaluate(ar.Author("ghost.np.test"), discovery, None, [])
    assert (outcome.result, outcome.finding, outcome.policy) == (result, finding, policy)
    if finding == "quarantine":
        assert dmarc.ar_result(outcome).result_comment == (
            "p=reject sp=none np=quarantine dis=quarantine From domain does not exist")
        sampled = evaluate(ar.Author("ghost.np.test"), replace(discovery, record=replace(NP, pct=0)), None, [])
        assert sampled.reason == "From domain does not exist, outside pct=0 sample"
    # a pass is a pass, whatever the existence of the domain
    passed = evaluate(ar.Author("ghost.np.test"), discovery, spf_result("ghost.np.test"), [])
    assert passed.finding == "pass"


async def test_np_through_the_plugins(resolver: Resolver, keys: DNSServer) -> None:
    verdict = await transaction(resolver, message("ceo@ghost.np.test"), sender="bounce@thirdparty.test", ip=BAD_IP)
    assert verdict.action is Action.REJECT
    assert str(verdict.reply) == "550 5.7.1 Rejected by DMARC policy for ghost.np.test"
    verdict = await transaction(resolver, message("ceo@www.np.test"), sender="bounce@thirdparty.test", ip=BAD_IP)
    assert verdict.action is Action.CONTINUE
    assert dmarc_clause(verdict) == "dmarc=fail (p=reject sp=none np=reject dis=none) header.from=www.np.test"


async def test_np_with_the_existence_unknown_is_temperror(resolver: Resolver, keys: DNSServer) -> None:
    keys.servfail("ghost.np.test")
    plugins = {"dmarc": {"actions": {"temperror": "defer"}}}
    verdict = await transaction(
        resolver, message("ceo@ghost.np.test"), sender="bounce@thirdparty.test", ip=BAD_IP, plugins=plugins
    )
    assert str(verdict.reply) == "451 4.7.1 Temporary error evaluating DMARC policy for ghost.np.test, try again later"


def test_no_record_and_no_author() -> None:
    assert evaluate(ar.Author("auth.test"), Discovery("none"), None, []).finding == "none"
    bad = evaluate(ar.Author(problem="2 From header fields"), Discovery("none"), None, [])
    assert (bad.result, bad.finding, bad.reason) == ("permerror", "bad_from", "2 From header fields")


# ------------------------------------------------------------------ through the plugins


async def test_authentic_mail_gets_one_combined_header(resolver: Resolver, keys: DNSServer) -> None:
    signed = sign(message())
    verdict = await transaction(resolver, signed)
    assert verdict.action is Action.CONTINUE
    (header,) = headers_named(verdict, "Authentication-Results")
    clauses = unfold(header).split("; ")
    assert clauses[0] == HOSTNAME
    assert clauses[1] == "spf=pass smtp.mailfrom=alice@auth.test"
    assert clauses[2].startswith("dkim=pass header.d=auth.test header.i=@auth.test header.s=s1 header.a=rsa-sha256 header.b=")
    assert clauses[3] == "dmarc=pass (p=reject sp=quarantine dis=none) header.from=auth.test"
    assert len(headers_named(verdict, "Received-SPF")) == 1
    assert verdict.result == "dkim=pass auth.test:pass dmarc=pass auth.test"  # for the decision log


async def test_spoofed_author_is_rejected(resolver: Resolver, keys: DNSServer) -> None:
    # Authentic SPF and DKIM -- of thirdparty.test, not of the author domain.
    raw = sign(message("The CEO <ceo@auth.test>"), "thirdparty.test", "tp")
    verdict = await transaction(resolver, raw, sender="bounce@thirdparty.test", ip=BAD_IP)
    assert verdict.action is Action.REJECT and verdict.plugin == "dmarc"
    assert verdict.reply == Reply(550, "5.7.1", "Rejected by DMARC policy for auth.test")


async def test_spoofed_subdomain_gets_sp_quarantine(resolver: Resolver, keys: DNSServer) -> None:
    verdict = await transaction(resolver, message("ceo@news.auth.test"), sender="bounce@thirdparty.test", ip=BAD_IP)
    assert verdict.action is Action.TAG
    assert dmarc_clause(verdict) == "dmarc=fail (p=reject sp=quarantine dis=quarantine) header.from=news.auth.test"


async def test_relaxed_spf_alignment_passes(resolver: Resolver, keys: DNSServer) -> None:
    verdict = await transaction(resolver, message(), sender="bounce@news.auth.test")
    assert dmarc_clause(verdict).startswith("dmarc=pass")


@pytest.mark.parametrize(
    "signer, action",
    [(None, Action.REJECT), ("auth.test", Action.REJECT), ("strict.auth.test", Action.CONTINUE)],
)
async def test_strict_alignment_through_the_plugins(
    resolver: Resolver, keys: DNSServer, signer: str | None, action: Action
) -> None:
    raw = message("a@strict.auth.test")
    raw = sign(raw, signer) if signer else raw
    verdict = await transaction(resolver, raw, sender="x@mail.strict.auth.test")  # SPF pass, not strictly aligned
    assert verdict.action is action


async def test_p_none_only_reports(resolver: Resolver, keys: DNSServer) -> None:
    verdict = await transaction(resolver, message("ceo@monitor.auth.test"), sender="bounce@thirdparty.test", ip=BAD_IP)
    assert verdict.action is Action.CONTINUE and "dmarc=fail monitor.auth.test" in verdict.result
    assert dmarc_clause(verdict) == "dmarc=fail (p=none sp=none dis=none) header.from=monitor.auth.test"


async def test_quarantine_policy_is_a_tag(resolver: Resolver, keys: DNSServer) -> None:
    verdict = await transaction(resolver, message("ceo@quarantine.auth.test"), sender="bounce@thirdparty.test", ip=BAD_IP)
    assert verdict.action is Action.TAG


@pytest.mark.parametrize("honour, action", [(True, Action.TAG), (False, Action.REJECT)])
async def test_pct_zero(resolver: Resolver, keys: DNSServer, honour: bool, action: Action) -> None:
    plugins = {"spf": {}, "dmarc": {"honour_pct": honour}}
    verdict = await transaction(
        resolver, message("ceo@sampled.auth.test"), sender="bounce@thirdparty.test", ip=BAD_IP, plugins=plugins
    )
    assert verdict.action is action


async def test_null_sender_aligns_through_the_helo_identity(resolver: Resolver, keys: DNSServer) -> None:
    verdict = await transaction(resolver, message("MAILER-DAEMON@auth.test"), sender="")
    (header,) = headers_named(verdict, "Authentication-Results")
    assert "spf=pass smtp.helo=mx.auth.test" in unfold(header)
    assert dmarc_clause(verdict).startswith("dmarc=pass")


async def test_dmarc_alone_checks_spf_and_dkim_itself(resolver: Resolver, keys: DNSServer) -> None:
    verdict = await transaction(resolver, sign(message()), plugins={"dmarc": {}})
    (header,) = headers_named(verdict, "Authentication-Results")
    assert [c.split(" ")[0] for c in unfold(header).split("; ")[1:]] == ["spf=pass", "dkim=pass", "dmarc=pass"]
    assert headers_named(verdict, "Received-SPF") == []  # that is the spf plugin's


async def test_every_check_runs_once_per_message(resolver: Resolver, keys: DNSServer) -> None:
    await transaction(resolver, sign(message()))
    assert keys.query_count("auth.test", "TXT") == 1  # SPF at MAIL, reused by DMARC
    assert keys.query_count("s1._domainkey.auth.test", "TXT") == 1  # DKIM shared by dkim and dmarc


async def test_bad_from(resolver: Resolver, keys: DNSServer) -> None:
    raw = message().replace(b"From: alice@auth.test\r\n", b"")
    verdict = await transaction(resolver, raw)
    assert verdict.action is Action.CONTINUE
    assert dmarc_clause(verdict) == "dmarc=permerror (no From header field)"
    refused = await transaction(resolver, raw, plugins={"dmarc": {"actions": {"bad_from": "reject"}}})
    assert str(refused.reply) == "550 5.7.1 Message needs From addresses with domains that can be checked: no From header field"


# ------------------------------------------------------------------ several From domains (RFC 7489 §6.6.1)

SPOOFED = {"sender": "bounce@thirdparty.test", "ip": BAD_IP}  # SPF and DKIM pass for thirdparty.test only


@pytest.mark.parametrize(
    "raw",
    [
        message("ceo@auth.test, x@thirdparty.test"),
        message("x@thirdparty.test, The CEO <ceo@auth.test>"),
        message("ceo@auth.test", extra=b"From: x@thirdparty.test\r\n"),
        message("x@thirdparty.test", extra=b"From: ceo@auth.test\r\n"),
        message("Group: x@thirdparty.test, ceo@auth.test;"),
    ],
)
async def test_several_from_domains_get_the_strictest_policy(resolver: Resolver, keys: DNSServer, raw: bytes) -> None:
    verdict = await transaction(resolver, raw, **SPOOFED)
    assert verdict.action is Action.REJECT and verdict.plugin == "dmarc"
    assert verdict.reply == Reply(550, "5.7.1", "Rejected by DMARC policy for auth.test")
    assert verdict.result.endswith(" dmarc=reject auth.test")
    (header,) = headers_named(verdict, "Authentication-Results")
    assert [c.split("=")[0] for c in unfold(header).split("; ")[1:]] == ["spf", "dkim", "dmarc"]
    clause = dmarc_clause(verdict)
    assert clause.startswith("dmarc=fail (p=reject sp=quarantine dis=reject strictest of ")
    assert clause.endswith(" header.from=auth.test")


@pytest.mark.parametrize("count", [dmarc.MAX_AUTHOR_DOMAINS, dmarc.MAX_AUTHOR_DOMAINS + 1])
async def test_more_from_domains_than_are_checked_are_refused_unasked(
    resolver: Resolver, keys: DNSServer, count: int
) -> None:
    # A p=reject domain must not hide among many others, and many others
    # must not cost a query each: past the limit, none is asked.
    others = [f"x@d{i}.thirdparty.test" for i in range(count - 1)]
    keys.reset_counts()
    verdict = await transaction(resolver, message(", ".join([*others, "ceo@auth.test"])), **SPOOFED)
    assert verdict.action is Action.REJECT and verdict.plugin == "dmarc"
    if count <= dmarc.MAX_AUTHOR_DOMAINS:
        assert verdict.reply == Reply(550, "5.7.1", "Rejected by DMARC policy for auth.test")
        assert keys.query_count("_dmarc.auth.test", "TXT") == 1
    else:
        assert verdict.reply == Reply(550, "5.7.1", "Message needs From addresses with domains that can be checked:"
                                                    f" {count} From domains, at most 16 are checked")
        assert verdict.result.endswith(" dmarc=many_authors")
        assert keys.query_count("_dmarc.auth.test") == 0
        assert not any(keys.query_count(f"_dmarc.d{i}.thirdparty.test") for i in range(count - 1))


async def test_many_from_domains_may_be_let_through(resolver: Resolver, keys: DNSServer) -> None:
    authors = ", ".join(f"x@d{i}.thirdparty.test" for i in range(dmarc.MAX_AUTHOR_DOMAINS + 1))
    plugins = {**ALL, "dmarc": {"actions": {"many_authors": "continue"}}}
    verdict = await transaction(resolver, message(authors), plugins=plugins, **SPOOFED)
    assert verdict.action is Action.CONTINUE
    assert dmarc_clause(verdict) == "dmarc=permerror (17 From domains, at most 16 are checked)"


async def test_signed_by_a_third_party_with_its_address_added(resolver: Resolver, keys: DNSServer) -> None:
    # SPF and DKIM pass and align for thirdparty.test (no DMARC record), not for auth.test.
    raw = sign(message("x@thirdparty.test, ceo@auth.test"), "thirdparty.test", "tp")
    verdict = await transaction(resolver, raw, **SPOOFED)
    assert verdict.reply == Reply(550, "5.7.1", "Rejected by DMARC policy for auth.test")


async def test_reject_beats_quarantine_and_none(resolver: Resolver, keys: DNSServer) -> None:
    raw = message("a@monitor.auth.test, b@news.auth.test", extra=b"From: c@auth.test\r\n")
    verdict = await transaction(resolver, raw, **SPOOFED)
    assert verdict.action is Action.REJECT and verdict.result.endswith(" dmarc=reject auth.test")
    assert "strictest of 3 From checks" in dmarc_clause(verdict)
    tagged = await transaction(resolver, message("a@monitor.auth.test, b@news.auth.test"), **SPOOFED)
    assert tagged.action is Action.TAG
    assert dmarc_clause(tagged) == (
        "dmarc=fail (p=reject sp=quarantine dis=quarantine strictest of 2 From checks) header.from=news.auth.test"
    )


async def test_several_from_domains_pass_only_if_every_one_passes(resolver: Resolver, keys: DNSServer) -> None:
    both = await transaction(resolver, message("alice@auth.test, bob@news.auth.test"))
    assert both.action is Action.CONTINUE
    assert dmarc_clause(both) == "dmarc=pass (p=reject sp=quarantine dis=none strictest of 2 From checks) header.from=auth.test"
    one = await transaction(resolver, message("alice@auth.test", extra=b"From: x@thirdparty.test\r\n"))
    assert one.action is Action.CONTINUE
    assert dmarc_clause(one) == "dmarc=none (strictest of 2 From checks) header.from=thirdparty.test"


async def test_a_from_field_that_cannot_be_read_hides_no_failure(resolver: Resolver, keys: DNSServer) -> None:
    raw = message("ceo@auth.test", extra=b"From: undisclosed\r\n")
    verdict = await transaction(resolver, raw, **SPOOFED)
    assert verdict.reply == Reply(550, "5.7.1", "Rejected by DMARC policy for auth.test")
    passing = await transaction(resolver, message("alice@auth.test", extra=b"From: undisclosed\r\n"))
    assert passing.action is Action.CONTINUE and passing.result.endswith(" dmarc=bad_from")
    assert dmarc_clause(passing) == "dmarc=permerror (invalid From header field strictest of 2 From checks)"


@pytest.mark.parametrize(
    "author",
    [
        "ceo@auth.test <x@thirdparty.test>",  # Python's parser reads thirdparty.test
        # A reader drops the comment, or the quotes, and shows ceo@auth.test.
        "The CEO <ceo@(x)auth.test",
        "The CEO <ceo@(x)auth.test.>",
        "ceo@(x)auth.test.",
        'The CEO <ceo@"auth.test">',
    ],
)
async def test_invalid_from_syntax_hides_no_domain(resolver: Resolver, keys: DNSServer, author: str) -> None:
    verdict = await transaction(resolver, message(author), **SPOOFED)
    assert verdict.reply == Reply(550, "5.7.1", "Rejected by DMARC policy for auth.test")
    clause = dmarc_clause(verdict)
    assert clause.startswith("dmarc=fail (p=reject sp=quarantine dis=reject strictest of ")
    assert clause.endswith(" header.from=auth.test")


async def test_several_from_domains_with_a_dns_error(resolver: Resolver, keys: DNSServer) -> None:
    keys.servfail("_dmarc.quarantine.auth.test")
    raw = message("a@monitor.auth.test, b@quarantine.auth.test")
    verdict = await transaction(resolver, raw, **SPOOFED, plugins={"spf": {}, "dmarc": {"actions": {"temperror": "defer"}}})
    assert str(verdict.reply) == (
        "451 4.7.1 Temporary error evaluating DMARC policy for quarantine.auth.test, try again later"
    )


async def test_several_from_domains_warm_answer_plainly(resolver: Resolver, keys: DNSServer) -> None:
    """Every record cached: the plain-hook path (no coroutine, no task) for
    several From domains too, each record asked for once."""
    raw = message("ceo@auth.test, x@news.auth.test", extra=b"From: y@quarantine.auth.test, z@thirdparty.test\r\n")
    cold = await transaction(resolver, raw, **SPOOFED)
    assert [keys.query_count(f"_dmarc.{d}", "TXT") for d in ("auth.test", "news.auth.test", "quarantine.auth.test")] == [1, 1, 1]
    reg = registry(resolver, ALL)
    s, e = session(BAD_IP, "mx.auth.test"), envelope("bounce@thirdparty.test")
    await run_stage(reg.calls["mail"], {"session": s, "envelope": e}, 5.0, s.id)
    plugin = next(c for c in reg.calls["data"] if c.plugin == "dmarc")
    answer = plugin.function(session=s, envelope=e, message=Message(raw))
    assert not inspect.isawaitable(answer)
    assert answer.action is cold.action and answer.result == "dmarc=reject auth.test"
    assert answer.headers == tuple(h for h in cold.headers if h[0] == "Authentication-Results")


def test_evaluate_all_takes_the_strictest() -> None:
    def judged(*domains: str, problem: str = "", found: dict[str, Discovery] | None = None) -> tuple[str, str, int]:
        authors = ar.Authors(domains, problem)
        discoveries = [(found or {}).get(d, Discovery("found", RECORD, d)) for d in domains]  # p=reject
        r = dmarc.evaluate_all(authors, discoveries, spf_result("news.auth.test"), [dkim_result("thirdparty.test")])
        return r.finding, r.domain, r.authors

    none = Discovery("none")
    assert judged("auth.test") == ("pass", "auth.test", 1)  # one domain: as before
    assert judged("auth.test", "thirdparty.test", found={"thirdparty.test": none}) == ("none", "thirdparty.test", 2)
    assert judged("other.test", "auth.test") == ("reject", "other.test", 2)  # first of equals
    sub = {"a.other.test": Discovery("found", RECORD, "other.test")}  # sp=quarantine
    assert judged("a.other.test", "other.test", found=sub) == ("reject", "other.test", 2)
    assert judged("a.other.test", "auth.test", found=sub) == ("quarantine", "a.other.test", 2)
    assert judged("auth.test", problem="invalid From header field") == ("bad_from", "", 2)
    assert judged("other.test", problem="invalid From header field") == ("reject", "other.test", 2)
    assert judged(problem="no From header field") == ("bad_from", "", 1)
    temp = Discovery("temperror", at="x.test", error="SERVFAIL")
    monitor = Discovery("found", DmarcRecord("none", "none"), "m.test")
    assert judged("m.test", "x.test", found={"m.test": monitor, "x.test": temp}) == ("temperror", "x.test", 2)


async def test_temperror(resolver: Resolver, keys: DNSServer) -> None:
    keys.servfail("_dmarc.auth.test")
    verdict = await transaction(resolver, message(), sender="bounce@thirdparty.test", ip=BAD_IP)
    assert verdict.action is Action.CONTINUE and dmarc_clause(verdict).startswith("dmarc=temperror")
    deferred = await transaction(
        resolver, message(), sender="bounce@thirdparty.test", ip=BAD_IP,
        plugins={"dmarc": {"actions": {"temperror": "defer"}}},
    )
    assert str(deferred.reply) == "451 4.7.1 Temporary error evaluating DMARC policy for auth.test, try again later"


async def test_no_record_is_none(resolver: Resolver, keys: DNSServer) -> None:
    verdict = await transaction(resolver, message("x@thirdparty.test"), sender="bounce@thirdparty.test", ip=BAD_IP)
    assert dmarc_clause(verdict) == "dmarc=none header.from=thirdparty.test"


async def test_two_records_are_no_policy(resolver: Resolver, keys: DNSServer) -> None:
    # RFC 7489 §6.6.3 step 5: "DMARC processing is not applied" -- neither
    # record's p=, nor auth.test's sp=quarantine, and no permerror to act on.
    plugins = {"spf": {}, "dmarc": {"actions": {"permerror": "reject"}}}
    verdict = await transaction(
        resolver, message("ceo@twodmarc.auth.test"), sender="bounce@thirdparty.test", ip=BAD_IP, plugins=plugins
    )
    assert verdict.action is Action.CONTINUE and verdict.result == "dmarc=none twodmarc.auth.test"
    assert dmarc_clause(verdict) == (
        "dmarc=none (_dmarc.twodmarc.auth.test: 2 DMARC records, no policy applied) header.from=twodmarc.auth.test"
    )


async def test_trusted_clients_are_not_checked(resolver: Resolver, keys: DNSServer) -> None:
    verdict = await transaction(resolver, message(), ip="198.51.100.7", sender="bounce@thirdparty.test")
    assert verdict.action is Action.CONTINUE and verdict.headers == ()


@pytest.mark.parametrize(
    "table, key",
    [({"actions": {"quarantined": "tag"}}, "plugins.dmarc.actions.quarantined"), ({"honour_pct": 1}, "plugins.dmarc.honour_pct")],
)
def test_bad_options_are_policy_errors(table: dict[str, Any], key: str) -> None:
    with pytest.raises(PolicyError) as info:
        registry(None, {"dmarc": table})
    assert [p.key for p in info.value.problems] == [key]


def test_reporter_rule() -> None:
    for plugins, expected in [
        ({"spf": {}}, "spf"), ({"spf": {}, "dkim": {}}, "dkim"), ({"dkim": {}, "dmarc": {}}, "dmarc"),
        ({"dmarc": {}, "spf": {}}, "dmarc"), ({}, ""),
    ]:
        policy = policy_from_dict({"gateway": {"hostname": HOSTNAME}, "plugins": plugins}, "<t>")
        context = load_plugins(policy, Context(policy.gateway)).context
        assert ar.reporter(context) == expected, plugins


@pytest.mark.parametrize("name", [n for n in dmarc.__all__ if isinstance(getattr(dmarc, n), Reply)])
def test_reply_constants_are_well_formed(name: str) -> None:
    reply: Reply = getattr(dmarc, name)
    assert reply.enhanced[0] == str(reply.code)[0] and reply.code >= 400


FROM_VALUES = [
    "Alice <alice@auth.test>", "<alice@auth.test>", "alice@auth.test", ' "Alice A." <a.b@sub.auth.test> ',
    "=?utf-8?q?J=C3=B6rg?= <j@x.test>", "alice@auth.test.", "Bob <bob@EXAMPLE.org>", "a..b@x.test",
    "<a@-x.test>", ".a@x.test", "a.@x.test", "Al. Bob <a@x.test>", "<a@x..test>", "a@b.test <c@d.test>",
    '"" <a@b.test>', "A  B <a@b.test>", "a@b.test, c@d.test", '"x@y" <a@b.test>', "Al (c) <a@b.test>",
]


@pytest.mark.parametrize(
    "fields",
    [
        # One From of 5,000 addresses (the stdlib parser: 1.3 s; 20,000: 11 s).
        [("From", ", ".join(f"a{i}@d{i}.test" for i in range(5_000)))],
        # An unclosed comment, 5,000 addresses in it.
        [("From", "(" + " ".join(f"a{i}@d{i}.test" for i in range(5_000)))],
        # Many From fields, each short enough but together not.
        [("From", f"a@d{i}.test, b@d{i}.test") for i in range(5_000)],
    ],
    ids=["addresses", "comment", "fields"],
)
def test_from_fields_too_long_to_parse_are_read_in_proportion(
    fields: list[tuple[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The quadratic stdlib parser is given no more than the limit in all
    # (the reading that replaces it is linear: see test_dkim's scan count).
    parsed: list[int] = []
    real = ar._REGISTRY

    def parse(name: str, value: str) -> object:
        parsed.append(len(value))
        return real(name, value)

    monkeypatch.setattr(ar, "_REGISTRY", parse)
    authors = ar.author_domains(fields)
    assert sum(parsed) <= ar.MAX_PARSED_FROM
    # Unparsed is not unread: every domain after an @ still counts.
    assert {f"d{i}.test" for i in range(5_000)} <= set(authors.domains)
    assert authors.problem == f"From header fields over {ar.MAX_PARSED_FROM} characters"


def test_a_from_field_within_the_limit_is_parsed() -> None:
    value = ", ".join(f"Name {i} <a@d{i}.test>" for i in range(150))
    assert len(value) <= ar.MAX_PARSED_FROM
    assert ar.author_domains([("From", value)]) == ar.Authors(tuple(f"d{i}.test" for i in range(150)))


def test_the_authors_are_found_once_per_message(monkeypatch: pytest.MonkeyPatch) -> None:
    message = Message(b"From: a@auth.test, b@other.test\r\nSubject: x\r\n\r\nbody\r\n")
    calls = []
    monkeypatch.setattr(ar, "author_domains", lambda fields: calls.append(fields) or ar.Authors(("auth.test",)))
    assert ar.authors_of(message) is ar.authors_of(message)
    assert len(calls) == 1


@pytest.mark.parametrize("value", FROM_VALUES)
def test_the_simple_from_fast_path_agrees_with_the_full_parser(value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    fast = ar.author_domain([("From", value)]), ar.author_domains([("From", value)])
    monkeypatch.setattr(ar, "_SIMPLE_FROM", re.compile(r"(?!)"))
    assert fast == (ar.author_domain([("From", value)]), ar.author_domains([("From", value)]))


def test_property_values_quoted_as_authres_and_the_address_rule_quote_them() -> None:
    # ar._Value does authres's own quoting with its patterns compiled once;
    # what it writes must stay what authres (plus the rule that a value
    # with an "@" is bare only as an address) wrote.
    import random

    import authres

    def reference(value: str) -> str:
        if "@" in value and not ar._BARE_ADDRESS.fullmatch(value):
            return '"%s"' % value.replace("\\", "\\\\").replace('"', '\\"')
        return str(authres.core.QuotableValue(value).quote_if_needed())

    crafted = ["", "a", "example.com", "a@b.test", "@b.test", "x;dkim=pass@auth.test", 'a"b', "a\\b", "a b",
               "a\n", "a\nb", "(x)", "ñ", "a=b", "1.2.3.4", "2001:db8::1", "a@b.test\n", "é@b.test"]
    rng = random.Random(19)
    pieces = ("a", "Z", "0", ".", "-", "@", '"', "\\", " ", "\n", "=", ";", "(", ")", "/", "ñ", "_", ":", "[", "]")
    generated = ["".join(rng.choice(pieces) for _ in range(rng.randrange(0, 12))) for _ in range(5000)]
    for value in crafted + generated:
        written = ar._Value(value).quote_if_needed()
        assert written == reference(value), value
        assert type(written) is str


# ------------------------------------------------------------ kept discoveries


def _plugin(resolver: Resolver) -> dmarc.DmarcPlugin:
    return registry(resolver, {"dmarc": {}}).plugins[0].instance  # type: ignore[no-any-return]


async def test_a_discovery_is_kept_while_its_answers_hold(dns: DNSServer) -> None:
    clock = FakeClock()
    resolver = Resolver([dns.nameserver], timeout=1.0, clock=clock)
    plugin = _plugin(resolver)
    assert plugin._cached_record("sub.auth.test") is None  # nothing cached yet: asked by find_record
    found = await find_record(resolver, "sub.auth.test")
    assert plugin._cached_record("sub.auth.test") == found == cached_record(resolver, "sub.auth.test")
    ttl = min(resolver.cached(f"_dmarc.{at}", "TXT").ttl for at in ("sub.auth.test", "auth.test"))  # type: ignore[union-attr]
    clock.now += ttl - 0.5
    assert plugin._records.get("sub.auth.test") is not None
    clock.now += 1.0  # the answers are gone, and so is what was made of them
    assert plugin._records.get("sub.auth.test") is None
    assert plugin._cached_record("sub.auth.test") is None


async def test_a_failed_discovery_is_not_kept(resolver: Resolver, dns: DNSServer) -> None:
    dns.servfail("_dmarc.quarantine.auth.test")
    plugin = _plugin(resolver)
    assert (await find_record(resolver, "quarantine.auth.test")).status == "temperror"
    assert plugin._cached_record("quarantine.auth.test").status == "temperror"  # type: ignore[union-attr]
    assert len(plugin._records) == 0


def test_organizational_domains_are_kept_only_for_domain_names() -> None:
    long = "a." * 200 + "auth.test"  # a d= tag can be any length
    dmarc._organizational_domain.cache_clear()
    assert organizational_domain(long) == "auth.test"
    assert dmarc._organizational_domain.cache_info().currsize == 0
    assert organizational_domain("x.auth.test") == "auth.test"
    assert dmarc._organizational_domain.cache_info().currsize == 1
    assert dmarc._organizational_domain.cache_info().maxsize == 4096


def test_dmarc_replies_are_made_once_per_result() -> None:
    result = DmarcResult("fail", "reject", "auth.test", DmarcRecord("reject", "reject"), "reject", "reject")
    assert dmarc._replies(result) is dmarc._replies(result)
    assert dmarc._replies(result) == dmarc._make_replies(result)
    assert dmarc._REPLIES.size == ar.MEMO_SIZE
