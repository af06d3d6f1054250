"""SPF, DKIM and DMARC end to end: a client (impersonated with XCLIENT)
talks to the gateway, which asks the loopback DNS server and forwards to the
real Postfix.  What the client hears and what Postfix delivers are checked."""

from __future__ import annotations

import re
from collections.abc import Callable

import authres
import dkim
import pytest

from tests.fixtures.dnsserver import DNSServer
from tests.fixtures.gateway import GatewayThread
from tests.fixtures.postfix import PostfixInstance
from tests.test_dkim import key_record, publish_keys, sign

pytestmark = pytest.mark.e2e

MX_IP = "192.0.2.10"  # mx.auth.test: auth.test's SPF allows it
SPOOFER_IP = "203.0.113.66"  # thirdparty.test's host; auth.test's SPF does not allow it
AUTHSERV_ID = "gw.test.example"  # the test gateway's hostname

BODY = (
    b"To: Alice <alice@example.com>\r\n"
    b"Subject: the report\r\n"
    b"Date: Mon, 01 Jan 2024 00:00:00 +0000\r\n"
    b"Message-ID: <e2e@auth.test>\r\n"
    b"\r\n"
    b"Numbers attached.\r\n"
)


def message(author: str) -> bytes:
    return f"From: {author}\r\n".encode() + BODY


def start_auth_gateway(
    start_gateway: Callable[..., GatewayThread],
    postfix: PostfixInstance,
    dns: DNSServer,
    plugins: dict[str, dict[str, object]] | None = None,
) -> GatewayThread:
    """The gateway in front of Postfix with ``plugins`` (spf, dkim and dmarc
    by default), auth.test's key and thirdparty.test's SPF record served."""
    publish_keys(dns, "auth.test", {"s1": key_record()})
    dns.add_zone("thirdparty.test", f'@ IN TXT "v=spf1 ip4:{SPOOFER_IP} -all"')
    return start_gateway(
        f"127.0.0.1:{postfix.port}",
        plugins=plugins if plugins is not None else {"spf": {}, "dkim": {}, "dmarc": {}},
        dns={"nameservers": [dns.nameserver], "timeout": 1.0},
    )


@pytest.fixture
def auth_gateway(
    start_gateway: Callable[..., GatewayThread], postfix: PostfixInstance, dns: DNSServer
) -> GatewayThread:
    return start_auth_gateway(start_gateway, postfix, dns)


def header_values(delivered: bytes, name: str) -> list[str]:
    """Unfolded values of every ``name`` header of a Maildir file (LF ends)."""
    head = delivered.split(b"\n\n", 1)[0].decode()
    fields = re.split(r"\n(?![ \t])", head)
    prefix = name.lower() + ":"
    return [f[len(prefix):].replace("\n", "").strip() for f in fields if f.lower().startswith(prefix)]


def send(gw: GatewayThread, ip: str, sender: str, raw: bytes, helo: str = "mx.auth.test") -> list[tuple[int, bytes]]:
    """MAIL, RCPT, DATA; the replies, stopping at the first refusal."""
    with gw.client(xclient=ip, helo=helo) as smtp:
        replies = [smtp.mail(sender)]
        if replies[-1][0] == 250:
            replies.append(smtp.rcpt("alice@example.com"))
        if replies[-1][0] == 250:
            replies.append(smtp.data(raw))
        return replies


def test_authentic_mail_arrives_with_the_results(auth_gateway: GatewayThread, postfix: PostfixInstance) -> None:
    raw = sign(message("Alice <alice@auth.test>"))
    replies = send(auth_gateway, MX_IP, "alice@auth.test", raw)
    assert [code for code, _ in replies] == [250, 250, 250]
    (delivered,) = postfix.wait_for_messages("alice")
    (results,) = header_values(delivered, "Authentication-Results")
    assert results.startswith(f"{AUTHSERV_ID}; spf=pass smtp.mailfrom=alice@auth.test; dkim=pass header.d=auth.test")
    assert results.endswith("; dmarc=pass (p=reject sp=quarantine dis=none) header.from=auth.test")
    (received_spf,) = header_values(delivered, "Received-SPF")
    assert received_spf.startswith(f"pass ({AUTHSERV_ID}: domain of alice@auth.test designates {MX_IP}")
    assert f"client-ip={MX_IP};" in received_spf and "helo=mx.auth.test;" in received_spf
    # What the gateway added leaves the signature intact for the next verifier.
    assert dkim.verify(delivered.replace(b"\n", b"\r\n"), dnsfunc=lambda name, timeout=5: _key(name))


def _key(name: bytes) -> bytes | None:
    record = key_record().replace('" "', "").strip('"')
    return record.encode() if name == b"s1._domainkey.auth.test." else None


def test_spf_fail_is_refused_at_mail(auth_gateway: GatewayThread, postfix: PostfixInstance) -> None:
    replies = send(auth_gateway, SPOOFER_IP, "ceo@auth.test", message("ceo@auth.test"))
    assert replies == [
        (550, f"5.7.23 <ceo@auth.test>: Sender address rejected: SPF fail - not authorized by auth.test for {SPOOFER_IP}".encode())
    ]
    assert postfix.clients() == []  # the transaction never reached Postfix


def test_spoofed_author_is_refused_by_dmarc(auth_gateway: GatewayThread, postfix: PostfixInstance) -> None:
    # SPF passes -- for thirdparty.test, which is not the author domain.
    replies = send(auth_gateway, SPOOFER_IP, "bounce@thirdparty.test", message("The CEO <ceo@auth.test>"))
    assert replies[-1] == (550, b"5.7.1 Rejected by DMARC policy for auth.test")
    assert postfix.messages("alice") == []


def test_spoofed_subdomain_is_tagged_by_sp(auth_gateway: GatewayThread, postfix: PostfixInstance) -> None:
    replies = send(auth_gateway, SPOOFER_IP, "bounce@thirdparty.test", message("ceo@news.auth.test"))
    assert replies[-1][0] == 250
    (delivered,) = postfix.wait_for_messages("alice")
    (results,) = header_values(delivered, "Authentication-Results")
    assert results == (
        f"{AUTHSERV_ID}; spf=pass smtp.mailfrom=bounce@thirdparty.test; dkim=none; "
        "dmarc=fail (p=reject sp=quarantine dis=quarantine) header.from=news.auth.test"
    )


def authserv_ids(values: list[str]) -> list[str]:
    return [v.split(";")[0].strip() for v in values]


def test_forged_results_do_not_reach_postfix(auth_gateway: GatewayThread, postfix: PostfixInstance) -> None:
    forged = (
        f"Authentication-Results: {AUTHSERV_ID}; dmarc=pass header.from=auth.test\r\n"
        "Authentication-Results: mx.elsewhere.example; spf=pass smtp.mailfrom=x@auth.test\r\n"
        f"Authentication-Results: (looks harmless) {AUTHSERV_ID.upper()}.;\r\n dkim=pass\r\n"
    ).encode()
    raw = sign(message("alice@auth.test"))
    replies = send(auth_gateway, MX_IP, "alice@auth.test", forged + raw)
    assert replies[-1][0] == 250
    (delivered,) = postfix.wait_for_messages("alice")
    values = header_values(delivered, "Authentication-Results")
    assert authserv_ids(values) == [AUTHSERV_ID, "mx.elsewhere.example"]
    assert "dmarc=pass" in values[0] and values[0].startswith(f"{AUTHSERV_ID}; spf=pass")


@pytest.mark.parametrize(
    "field",
    [
        f'Authentication-Results: "{AUTHSERV_ID}"; dmarc=pass',  # a quoted-string id (RFC 8601 §2.2)
        f"Authentication-Results: (a (nested) comment) {AUTHSERV_ID}; dmarc=pass",
        f"Authentication-Results : {AUTHSERV_ID}; dmarc=pass",  # obsolete blank before the colon
    ],
)
def test_every_form_of_forged_results_is_removed(
    auth_gateway: GatewayThread, postfix: PostfixInstance, field: str
) -> None:
    raw = sign(message("alice@auth.test"))
    assert send(auth_gateway, MX_IP, "alice@auth.test", f"{field}\r\n".encode() + raw)[-1][0] == 250
    (delivered,) = postfix.wait_for_messages("alice")
    assert len(header_values(delivered, "Authentication-Results")) + len(
        header_values(delivered, "Authentication-Results ")
    ) == 1


def test_a_first_line_that_continues_nothing_cannot_extend_our_results(
    auth_gateway: GatewayThread, postfix: PostfixInstance
) -> None:
    # Placed after the fields we prepend, a message whose first line starts
    # with a blank would continue the last of them: our own results.  Like
    # Postfix's cleanup, the gateway takes such a line as the body's start.
    claim = b" ; dkim=pass header.d=auth.test header.s=s1; dmarc=pass header.from=auth.test\r\n"
    raw = claim + b"From: ceo@news.auth.test\r\nTo: alice@example.com\r\nSubject: pay\r\n\r\npay now\r\n"
    assert send(auth_gateway, SPOOFER_IP, "bounce@thirdparty.test", raw)[-1][0] == 250
    (delivered,) = postfix.wait_for_messages("alice")
    (results,) = header_values(delivered, "Authentication-Results")
    assert results.startswith(AUTHSERV_ID) and "dmarc=pass" not in results and "dkim=pass" not in results
    head, _, body = delivered.partition(b"\n\n")
    assert body.startswith(claim.replace(b"\r\n", b"\n"))  # the client's lines, all body


def field_lines(delivered: bytes, name: str) -> list[bytes]:
    """Every line (folds included) of every ``name`` field of a Maildir file."""
    head = delivered.split(b"\n\n", 1)[0]
    fields = re.split(rb"\n(?![ \t])", head)
    return [line for f in fields if f.lower().startswith(name.lower().encode() + b":") for line in f.split(b"\n")]


def test_a_long_helo_is_cut_in_our_headers(auth_gateway: GatewayThread, postfix: PostfixInstance) -> None:
    # The helo plugin would refuse this name; without it, SPF still reports
    # on it, and a line may hold 998 octets (RFC 5322 §2.1.1).
    helo = ".".join(["h" * 60] * 25) + ".thirdparty.test"
    with auth_gateway.client(xclient=SPOOFER_IP, helo=helo) as smtp:
        replies = [smtp.mail(""), smtp.rcpt("alice@example.com"), smtp.data(message("x@thirdparty.test"))]
    assert [code for code, _ in replies] == [250, 250, 250]
    (delivered,) = postfix.wait_for_messages("alice")
    ours = field_lines(delivered, "Received-SPF") + field_lines(delivered, "Authentication-Results")
    assert len(ours) > 2 and max(len(line) for line in ours) <= 998
    cut = f"{helo[:256]} (cut from 1540 characters)"
    (received_spf,) = header_values(delivered, "Received-SPF")
    assert received_spf.startswith(f"none ({AUTHSERV_ID}: {SPOOFER_IP} is neither permitted nor denied by domain of")
    assert received_spf.endswith(f' envelope-from=""; helo={cut}; identity=helo;')
    (results,) = header_values(delivered, "Authentication-Results")
    assert results == f"{AUTHSERV_ID}; spf=none smtp.helo={cut}; dkim=none; dmarc=none header.from=thirdparty.test"


def test_a_helo_name_cannot_write_a_clause_into_our_results(
    auth_gateway: GatewayThread, postfix: PostfixInstance
) -> None:
    # With no helo plugin to refuse it, this name reaches smtp.helo= of a
    # bounce's results; written bare (authres leaves anything with "@" so),
    # it read as a dkim=pass clause of our own.
    raw = sign(message("alice@auth.test"))
    assert send(auth_gateway, MX_IP, "", raw, helo="x;dkim=pass@auth.test")[-1][0] == 250
    (delivered,) = postfix.wait_for_messages("alice")
    (results,) = header_values(delivered, "Authentication-Results")
    assert 'smtp.helo="x;dkim=pass@auth.test";' in results
    parsed = authres.AuthenticationResultsHeader.parse(f"Authentication-Results: {results}")
    assert [r.method for r in parsed.results] == ["spf", "dkim", "dmarc"]
    assert [(p.name, p.value) for p in parsed.results[0].properties] == [("helo", "x;dkim=pass@auth.test")]


def test_forged_received_spf_does_not_reach_postfix(start_gateway: Callable[..., GatewayThread],
                                                    postfix: PostfixInstance, dns: DNSServer) -> None:
    # A trusted relay's Received-SPF stays (a trace field); one naming us is
    # a forgery, and without the spf plugin nothing of ours sits above it.
    gateway = start_auth_gateway(start_gateway, postfix, dns, {"dkim": {}})
    forged = (
        f"Received-SPF: pass ({AUTHSERV_ID}: domain of ceo@auth.test designates {SPOOFER_IP} as permitted"
        f" sender) receiver={AUTHSERV_ID}; client-ip={SPOOFER_IP};\r\n"
        f'Received-SPF: pass receiver="{AUTHSERV_ID.upper()}.";\r\n'
        "Received-SPF: fail (mx.elsewhere.example: domain of ceo@auth.test does not designate 198.51.100.9"
        " as permitted sender) receiver=mx.elsewhere.example;\r\n"
    ).encode()
    assert send(gateway, SPOOFER_IP, "bounce@thirdparty.test", forged + message("ceo@auth.test"))[-1][0] == 250
    (delivered,) = postfix.wait_for_messages("alice")
    (kept,) = header_values(delivered, "Received-SPF")
    assert kept.startswith("fail (mx.elsewhere.example:")
