"""Several From domains end to end (RFC 7489 §6.6.1): a second address or a
second From field must not take a message past DKIM ``required_domains``
or a DMARC ``p=reject``; nor may a From field too broken to parse hide the
domain a reader shows.  A client (impersonated with XCLIENT) talks to the
gateway, which asks the loopback DNS server and forwards to the real
Postfix; what the client hears and what Postfix received are checked."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.e2e.test_auth import AUTHSERV_ID, MX_IP, SPOOFER_IP, header_values, send, start_auth_gateway
from tests.fixtures.dnsserver import DNSServer
from tests.fixtures.gateway import GatewayThread
from tests.fixtures.postfix import PostfixInstance
from tests.test_dkim import key_record, key_with, publish_keys, sign, sign_by_hand

pytestmark = pytest.mark.e2e


def message(*froms: str, message_id: str = "refused@thirdparty.test") -> bytes:
    """A message with one From field per value of ``froms``."""
    return "".join(f"From: {f}\r\n" for f in froms).encode() + (
        "To: Alice <alice@example.com>\r\n"
        "Subject: wire transfer\r\n"
        "Date: Mon, 01 Jan 2024 00:00:00 +0000\r\n"
        f"Message-ID: <{message_id}>\r\n"
        "\r\n"
        "Please pay today.\r\n"
    ).encode()


SEVERAL_FROMS = [
    pytest.param(("The CEO <ceo@auth.test>, x@thirdparty.test",), id="two-addresses"),
    pytest.param(("x@thirdparty.test", "ceo@auth.test"), id="two-fields"),
    # Invalid syntax that readers take two ways: both domains are judged.
    pytest.param(("ceo@auth.test <x@thirdparty.test>",), id="invalid-syntax"),
]


def nothing_else_arrived(gw: GatewayThread, postfix: PostfixInstance) -> None:
    """Send authentic mail after the refused one and wait for it: it is the
    only message Postfix delivered, and Postfix never queued the refused one."""
    barrier = sign(message("Alice <alice@auth.test>", message_id="barrier@auth.test"))
    assert send(gw, MX_IP, "alice@auth.test", barrier)[-1][0] == 250
    (delivered,) = postfix.wait_for_messages("alice")
    assert b"Message-ID: <barrier@auth.test>" in delivered
    assert "refused@thirdparty.test" not in postfix.maillog()


@pytest.fixture
def dkim_gateway(start_gateway: Callable[..., GatewayThread], postfix: PostfixInstance, dns: DNSServer) -> GatewayThread:
    return start_auth_gateway(
        start_gateway, postfix, dns, {"spf": {}, "dkim": {"required_domains": ["auth.test"]}}
    )


@pytest.fixture
def dmarc_gateway(start_gateway: Callable[..., GatewayThread], postfix: PostfixInstance, dns: DNSServer) -> GatewayThread:
    return start_auth_gateway(start_gateway, postfix, dns)


@pytest.mark.parametrize("froms", SEVERAL_FROMS)
def test_dkim_required_domain_behind_a_second_from_is_refused(
    dkim_gateway: GatewayThread, postfix: PostfixInstance, froms: tuple[str, ...]
) -> None:
    # SPF passes for thirdparty.test; nothing is signed.
    replies = send(dkim_gateway, SPOOFER_IP, "bounce@thirdparty.test", message(*froms))
    assert replies == [
        (250, b"2.1.0 Ok"),
        (250, b"2.1.5 Ok"),
        (550, b"5.7.20 No passing DKIM signature found for auth.test"),
    ]
    nothing_else_arrived(dkim_gateway, postfix)


@pytest.mark.parametrize("froms", SEVERAL_FROMS)
def test_dmarc_reject_behind_a_second_from_is_refused(
    dmarc_gateway: GatewayThread, postfix: PostfixInstance, froms: tuple[str, ...]
) -> None:
    # SPF passes and aligns for thirdparty.test (no DMARC record), not for auth.test (p=reject).
    replies = send(dmarc_gateway, SPOOFER_IP, "bounce@thirdparty.test", message(*froms))
    assert replies == [(250, b"2.1.0 Ok"), (250, b"2.1.5 Ok"), (550, b"5.7.1 Rejected by DMARC policy for auth.test")]
    nothing_else_arrived(dmarc_gateway, postfix)


def test_a_from_of_too_many_domains_is_refused_without_a_lookup(
    dmarc_gateway: GatewayThread, postfix: PostfixInstance, dns: DNSServer
) -> None:
    # Seventeen domains, the p=reject one among them: looking each up would
    # cost a query per domain the sender chose; checking only some would
    # let auth.test hide.
    authors = ", ".join([*(f"x@d{i}.thirdparty.test" for i in range(16)), "ceo@auth.test"])
    dns.reset_counts()
    replies = send(dmarc_gateway, SPOOFER_IP, "bounce@thirdparty.test", message(authors))
    assert replies[-1] == (550, b"5.7.1 Message needs From addresses with domains that can be checked:"
                                b" 17 From domains, at most 16 are checked")
    assert dns.query_count("_dmarc.auth.test") == 0
    nothing_else_arrived(dmarc_gateway, postfix)


def test_several_authentic_from_domains_arrive_with_one_header(
    dmarc_gateway: GatewayThread, postfix: PostfixInstance
) -> None:
    raw = sign(message("alice@auth.test, bob@news.auth.test", message_id="both@auth.test"))
    assert send(dmarc_gateway, MX_IP, "alice@auth.test", raw)[-1][0] == 250
    (delivered,) = postfix.wait_for_messages("alice")
    (results,) = header_values(delivered, "Authentication-Results")
    assert results.startswith(f"{AUTHSERV_ID}; spf=pass smtp.mailfrom=alice@auth.test; dkim=pass header.d=auth.test")
    assert results.endswith(
        "; dmarc=pass (p=reject sp=quarantine dis=none strictest of 2 From checks) header.from=auth.test"
    )


#: Invalid From fields whose domain hides behind a comment or quotes after
#: the @: readers drop the comment (RFC 5322 §3.2.2) or the quotes and show
#: ceo@auth.test.
HIDDEN_AUTHORS = [
    pytest.param("The CEO <ceo@(x)auth.test", id="comment-no-closing-bracket"),
    pytest.param("The CEO <ceo@(x)auth.test.>", id="comment-final-dot"),
    pytest.param("ceo@(x)auth.test.", id="bare-comment-final-dot"),
    pytest.param('The CEO <ceo@"auth.test">', id="quoted-domain"),
]


@pytest.mark.parametrize(("check", "reply"), [
    ("dkim_gateway", (550, b"5.7.20 No passing DKIM signature found for auth.test")),  # required_domains
    ("dmarc_gateway", (550, b"5.7.1 Rejected by DMARC policy for auth.test")),  # p=reject
])
@pytest.mark.parametrize("author", HIDDEN_AUTHORS)
def test_a_from_domain_behind_a_comment_is_still_judged(
    request: pytest.FixtureRequest, postfix: PostfixInstance, check: str, reply: tuple[int, bytes], author: str
) -> None:
    gateway: GatewayThread = request.getfixturevalue(check)
    replies = send(gateway, SPOOFER_IP, "bounce@thirdparty.test", message(author))
    assert replies[-1] == reply
    nothing_else_arrived(gateway, postfix)


#: What a careless signer covers when it leaves From out: anyone can put
#: any From on such a signature.
WITHOUT_FROM = ("to", "subject", "date", "message-id")


def test_a_signature_without_from_does_not_take_a_spoofed_author_past_dmarc(
    dmarc_gateway: GatewayThread, postfix: PostfixInstance
) -> None:
    # auth.test signed some harmless mail with h= lacking From; the spoofer
    # replays it with the CEO as author (RFC 6376 §6.1.1: PERMFAIL).
    signed = sign_by_hand(message("news@auth.test"), WITHOUT_FROM)
    replayed = signed.replace(b"From: news@auth.test", b"From: The CEO <ceo@auth.test>")
    replies = send(dmarc_gateway, SPOOFER_IP, "bounce@thirdparty.test", replayed)
    assert replies[-1] == (550, b"5.7.1 Rejected by DMARC policy for auth.test")
    # The same signature with From signed is what takes mail past DMARC.
    signed = sign_by_hand(message("ceo@auth.test", message_id="barrier@auth.test"), ("from", *WITHOUT_FROM))
    assert send(dmarc_gateway, SPOOFER_IP, "bounce@thirdparty.test", signed)[-1][0] == 250
    (delivered,) = postfix.wait_for_messages("alice")
    assert b"Message-ID: <barrier@auth.test>" in delivered
    (results,) = header_values(delivered, "Authentication-Results")
    assert "; dkim=pass header.d=auth.test header.s=s1 " in results
    assert "refused@thirdparty.test" not in postfix.maillog()


def test_a_signature_without_from_is_reported_as_permerror(
    dmarc_gateway: GatewayThread, postfix: PostfixInstance
) -> None:
    # SPF passes for auth.test itself, so the message arrives; the header
    # tells the reader the signature counted for nothing.
    raw = sign_by_hand(message("alice@auth.test", message_id="unsigned-from@auth.test"), WITHOUT_FROM)
    assert send(dmarc_gateway, MX_IP, "alice@auth.test", raw)[-1][0] == 250
    (delivered,) = postfix.wait_for_messages("alice")
    (results,) = header_values(delivered, "Authentication-Results")
    assert "; dkim=permerror (From field not signed) header.d=auth.test header.s=s1 " in results
    assert results.endswith("; dmarc=pass (p=reject sp=quarantine dis=none) header.from=auth.test")


def delivered_results(gateway: GatewayThread, postfix: PostfixInstance, raw: bytes, sender: str = "bounce@thirdparty.test",
                      ip: str = SPOOFER_IP) -> tuple[list[tuple[int, bytes]], str]:
    """Send ``raw``; the replies and, when it arrived, the one
    Authentication-Results header Postfix delivered."""
    replies = send(gateway, ip, sender, raw)
    if replies[-1][0] != 250:
        return replies, ""
    (delivered,) = postfix.wait_for_messages("alice")
    (results,) = header_values(delivered, "Authentication-Results")
    return replies, results


def test_two_dmarc_records_apply_no_policy(start_gateway: Callable[..., GatewayThread], postfix: PostfixInstance,
                                           dns: DNSServer) -> None:
    # RFC 7489 §6.6.3 step 5: twodmarc.auth.test publishes p=reject and
    # p=none; neither applies, nor auth.test's sp=quarantine: dmarc=none,
    # which a policy that refuses permerror does not refuse.
    gateway = start_auth_gateway(start_gateway, postfix, dns, {"spf": {}, "dmarc": {"actions": {"permerror": "reject"}}})
    replies, results = delivered_results(gateway, postfix, message("ceo@twodmarc.auth.test"))
    assert [code for code, _ in replies] == [250, 250, 250]
    assert results.endswith(
        "; dmarc=none (_dmarc.twodmarc.auth.test: 2 DMARC records, no policy applied) header.from=twodmarc.auth.test"
    )


@pytest.mark.parametrize("domain", ["indicpct.auth.test", "superpct.auth.test"])
def test_a_pct_in_other_digits_is_the_default(
    dmarc_gateway: GatewayThread, postfix: PostfixInstance, domain: str
) -> None:
    # pct=٠ and pct=¹ are no 1*3DIGIT (RFC 7489 §6.4): discarded for the
    # default, 100 (§6.3), so p=reject applies to every failing message --
    # not pct=0 (all sampled out, tagged) nor a record dropped as permerror.
    replies = send(dmarc_gateway, SPOOFER_IP, "bounce@thirdparty.test", message(f"ceo@{domain}"))
    assert replies[-1] == (550, f"5.7.1 Rejected by DMARC policy for {domain}".encode())
    nothing_else_arrived(dmarc_gateway, postfix)


def test_a_failing_signature_under_a_testing_key_is_not_punished(
    start_gateway: Callable[..., GatewayThread], postfix: PostfixInstance, dns: DNSServer
) -> None:
    # RFC 6376 §3.6.1: a signer whose key says t=y is testing; a signature
    # of it that fails is treated as no signature.  A policy refusing
    # dkim=fail lets it through, and the header says neutral, not fail.
    gateway = start_auth_gateway(start_gateway, postfix, dns, {"spf": {}, "dkim": {"actions": {"fail": "reject"}}})
    publish_keys(dns, "auth.test", {"s1": key_record(), "t1": key_with("t=y")})
    tampered = sign(message("alice@auth.test"), selector="t1").replace(b"Please pay today.", b"Please pay me today.")
    replies, results = delivered_results(gateway, postfix, tampered, "alice@auth.test", MX_IP)
    assert [code for code, _ in replies] == [250, 250, 250]
    assert results.startswith(
        f"{AUTHSERV_ID}; spf=pass smtp.mailfrom=alice@auth.test; dkim=neutral (testing key t=y, fail: body hash"
        " mismatch) header.d=auth.test header.i=@auth.test header.s=t1 header.a=rsa-sha256 header.b="
    )
    assert ";" not in results.rpartition("header.b=")[2]  # the only dkim= clause, the last


def test_np_refuses_a_subdomain_that_does_not_exist(dmarc_gateway: GatewayThread, postfix: PostfixInstance) -> None:
    # np.test: p=reject sp=none np=reject (RFC 9091).  ghost.np.test has no
    # A, AAAA or MX (NXDOMAIN): np applies; www.np.test exists: sp=none.
    replies = send(dmarc_gateway, SPOOFER_IP, "bounce@thirdparty.test", message("ceo@ghost.np.test"))
    assert replies[-1] == (550, b"5.7.1 Rejected by DMARC policy for ghost.np.test")
    replies, results = delivered_results(dmarc_gateway, postfix, message("ceo@www.np.test", message_id="barrier@np.test"))
    assert [code for code, _ in replies] == [250, 250, 250]
    assert results.endswith("; dmarc=fail (p=reject sp=none np=reject dis=none) header.from=www.np.test")
    assert "refused@thirdparty.test" not in postfix.maillog()


def test_the_spf_fail_reply_quotes_the_sender_as_sent(
    start_gateway: Callable[..., GatewayThread], postfix: PostfixInstance, dns: DNSServer
) -> None:
    # As Postfix's own "<address>: Sender address rejected" and its log's
    # from=<...> quote it; the domain SPF checked is named after "by".
    gateway = start_auth_gateway(start_gateway, postfix, dns, {"spf": {}})
    replies = send(gateway, SPOOFER_IP, "CEO@Auth.Test", message("ceo@auth.test"))
    assert replies == [(550, f"5.7.23 <CEO@Auth.Test>: Sender address rejected: SPF fail - not authorized by auth.test"
                             f" for {SPOOFER_IP}".encode())]
    assert postfix.clients() == []
