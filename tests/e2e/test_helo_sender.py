"""The helo and sender plugins through the gateway to the real Postfix, with
the loopback DNS server (tests/zones/mail.test.zone) as the only resolver.

Clients are impersonated from outside with XCLIENT; every refusal is checked
as the exact line a client reads.
"""

from __future__ import annotations

import smtplib
import socket
from collections.abc import Callable
from typing import Any

import pytest

from tests.fixtures.dnsserver import DNSServer
from tests.fixtures.gateway import OUTSIDE_IP, TRUSTED_IP, GatewayThread, recv_reply
from tests.test_helo import add_reverse_zones

pytestmark = pytest.mark.e2e

MESSAGE = b"From: Bob <bob@good.mail.test>\r\nTo: Alice <alice@example.com>\r\nSubject: hello\r\n\r\nhello\r\n"


@pytest.fixture
def start(start_gateway: Callable[..., GatewayThread], postfix: Any, dns: DNSServer) -> Callable[..., GatewayThread]:
    """``start(helo={...}, sender={...})``: the gateway in front of Postfix,
    asking only the loopback DNS server."""

    def run(helo: dict[str, Any] | None = None, sender: dict[str, Any] | None = None) -> GatewayThread:
        return start_gateway(
            f"127.0.0.1:{postfix.port}",
            plugins={"helo": helo or {}, "sender": sender or {}},
            dns={"nameservers": [dns.nameserver], "timeout": 1.0},
        )

    return run


@pytest.fixture
def gw(start: Callable[..., GatewayThread]) -> GatewayThread:
    return start(helo={"resolve": True})


def command(sock: socket.socket, line: str) -> str:
    """Send one command, return the reply as text without the final CRLF."""
    sock.sendall(line.encode() + b"\r\n")
    return recv_reply(sock).decode().rstrip("\r\n")


def outside(gw: GatewayThread, ip: str = OUTSIDE_IP) -> socket.socket:
    sock = gw.raw()
    assert command(sock, f"XCLIENT ADDR={ip}").startswith("220 ")
    return sock


# ------------------------------------------------------------------- HELO


@pytest.mark.parametrize("name, reply", [
    ("-bad-.example.org", "501 5.5.2 <-bad-.example.org>: Helo command rejected: Invalid name"),
    ("[192.0.2.300]", "501 5.5.2 <[192.0.2.300]>: Helo command rejected: Invalid name"),
    ("mailserver", "504 5.5.2 <mailserver>: Helo command rejected: need fully-qualified hostname"),
    ("203.0.113.7", "550 5.7.1 <203.0.113.7>: Helo command rejected: Bare IP address, use an address literal in brackets"),
    ("localhost", "550 5.7.1 <localhost>: Helo command rejected: You are not localhost"),
    ("[127.0.0.1]", "550 5.7.1 <[127.0.0.1]>: Helo command rejected: You are not localhost"),
    ("gw.test.example", "550 5.7.1 <gw.test.example>: Helo command rejected: Host name or address is our own"),
    ("nohost.mail.test", "550 5.7.1 <nohost.mail.test>: Helo command rejected: Host not found"),
    ("nodata.mail.test", "550 5.7.1 <nodata.mail.test>: Helo command rejected: Host not found"),
    # One trailing dot is the root, as Postfix takes it: judged as without.
    ("mailserver.", "504 5.5.2 <mailserver.>: Helo command rejected: need fully-qualified hostname"),
    ("nohost.mail.test.", "550 5.7.1 <nohost.mail.test.>: Helo command rejected: Host not found"),
    ("good.mail.test..", "501 5.5.2 <good.mail.test..>: Helo command rejected: Invalid name"),
])
def test_bad_helo_is_refused(gw: GatewayThread, name: str, reply: str) -> None:
    with outside(gw) as sock:
        assert command(sock, f"EHLO {name}") == reply
        assert command(sock, "MAIL FROM:<bob@good.mail.test>") == "503 5.5.1 Error: send HELO/EHLO first"


def test_helo_with_the_root_dot_is_a_good_name(gw: GatewayThread) -> None:
    with outside(gw) as sock:
        assert command(sock, "EHLO good.mail.test.").startswith("250-gw.test.example")
        assert command(sock, "MAIL FROM:<bob@good.mail.test>") == "250 2.1.0 Ok"


@pytest.mark.parametrize("fault", ["servfail", "timeout"])
def test_helo_dns_trouble_defers(gw: GatewayThread, dns: DNSServer, fault: str) -> None:
    getattr(dns, fault)(f"{fault}.mail.test")
    with outside(gw) as sock:
        assert command(sock, f"HELO {fault}.mail.test") == (
            f"450 4.7.1 <{fault}.mail.test>: Helo command rejected: Host not found"
        )


def test_refusal_sticks_across_a_second_ehlo(gw: GatewayThread) -> None:
    refusal = "504 5.5.2 <mailserver>: Helo command rejected: need fully-qualified hostname"
    with outside(gw) as sock:
        assert command(sock, "EHLO mailserver") == refusal
        assert command(sock, "EHLO good.mail.test") == refusal
        assert command(sock, "HELO good.mail.test") == refusal
        assert command(sock, "MAIL FROM:<bob@good.mail.test>") == "503 5.5.1 Error: send HELO/EHLO first"
        # XCLIENT makes a new client: judged afresh.
        assert command(sock, f"XCLIENT ADDR={OUTSIDE_IP}").startswith("220 ")
        assert command(sock, "EHLO good.mail.test").startswith("250-gw.test.example")
        assert command(sock, "QUIT").startswith("221 ")


def test_good_helo_then_bad_one_is_refused(gw: GatewayThread) -> None:
    with outside(gw) as sock:
        assert command(sock, "HELO good.mail.test") == "250 gw.test.example"
        assert command(sock, "HELO [127.0.0.1]") == (
            "550 5.7.1 <[127.0.0.1]>: Helo command rejected: You are not localhost"
        )
        assert command(sock, "HELO good.mail.test") == (
            "550 5.7.1 <[127.0.0.1]>: Helo command rejected: You are not localhost"
        )


@pytest.mark.parametrize("name", ["good.mail.test", "v6host.mail.test", "[203.0.113.7]", "[192.0.2.1]"])
def test_good_helo_is_accepted(gw: GatewayThread, name: str) -> None:
    with outside(gw) as sock:
        assert command(sock, f"HELO {name}") == "250 gw.test.example"


def test_trusted_client_may_say_anything(gw: GatewayThread) -> None:
    with outside(gw, TRUSTED_IP) as sock:
        assert command(sock, "HELO localhost") == "250 gw.test.example"
        assert command(sock, "HELO nohost.mail.test") == "250 gw.test.example"


def test_own_address_from_outside(start: Callable[..., GatewayThread]) -> None:
    gw = start(helo={"own_addresses": ["192.0.2.200"], "own_names": ["mx.example.com"]})
    with outside(gw) as sock:
        assert command(sock, "EHLO [192.0.2.200]") == (
            "550 5.7.1 <[192.0.2.200]>: Helo command rejected: Host name or address is our own"
        )
    with outside(gw) as sock:
        assert command(sock, "EHLO MX.example.com") == (
            "550 5.7.1 <MX.example.com>: Helo command rejected: Host name or address is our own"
        )


def test_fcrdns_refusal(start: Callable[..., GatewayThread], dns: DNSServer, postfix: Any) -> None:
    add_reverse_zones(dns)
    gw = start(helo={"fcrdns": True, "actions": {"no_fcrdns": "reject"}})
    with outside(gw, "203.0.113.8") as sock:
        assert command(sock, "EHLO good.mail.test") == (
            "550 5.7.25 Client host rejected: cannot find your hostname, [203.0.113.8]"
        )
    with gw.client(xclient="203.0.113.7", helo="good.mail.test") as smtp:
        assert smtp.sendmail("bob@good.mail.test", ["alice@example.com"], MESSAGE) == {}
    assert len(postfix.wait_for_messages("alice")) == 1


# ------------------------------------------------------------------ sender


def test_good_sender_reaches_postfix(gw: GatewayThread, postfix: Any) -> None:
    with gw.client(xclient=OUTSIDE_IP, helo="good.mail.test") as smtp:
        assert smtp.sendmail("bob@good.mail.test", ["alice@example.com"], MESSAGE) == {}
        assert smtp.sendmail("bob@aonly.mail.test", ["alice@example.com"], MESSAGE) == {}
    delivered = postfix.wait_for_messages("alice", 2)
    assert len(delivered) == 2
    assert b"Return-Path: <bob@good.mail.test>" in b"".join(delivered)


def test_null_sender_reaches_postfix(gw: GatewayThread, postfix: Any) -> None:
    with gw.client(xclient=OUTSIDE_IP, helo="good.mail.test") as smtp:
        assert smtp.sendmail("", ["alice@example.com"], MESSAGE) == {}
    (delivered,) = postfix.wait_for_messages("alice")
    assert delivered.startswith(b"Return-Path: <>")


@pytest.mark.parametrize("domain", [
    "stra\u00dfe.mail.test",
    "STRA\u1e9eE.Mail.Test",  # with a capital sharp s: the same domain, the DNS ignores case
])
def test_internationalised_sender_domain_is_looked_up_by_idna2008(gw: GatewayThread, postfix: Any, domain: str) -> None:
    # straße.mail.test is xn--strae-oqa.mail.test (IDNA2008), which has an MX;
    # IDNA2003 would ask for strasse.mail.test, which does not exist.
    with outside(gw) as sock:
        assert command(sock, "EHLO good.mail.test").startswith("250")
        assert command(sock, f"MAIL FROM:<bob@{domain}> SMTPUTF8") == "250 2.1.0 Ok"
        assert command(sock, "RCPT TO:<alice@example.com>").startswith("250 ")


@pytest.mark.parametrize("domain", [
    "good\u3002mail\u3002test",  # IDEOGRAPHIC FULL STOPs
    "\uff47ood.mail.test",  # a fullwidth g, which UTS #46 would map to good.mail.test
])
def test_a_sender_domain_that_is_no_idna2008_name_is_bad_syntax(gw: GatewayThread, postfix: Any, domain: str) -> None:
    # In SMTP only "." separates labels (RFC 5321 §4.1.2, RFC 6531 §3.3) and
    # a U-label is IDNA2008's (RFC 5890): the client must send good.mail.test,
    # mapping is for what a user types (RFC 5895), not what a server reads.
    with outside(gw) as sock:
        assert command(sock, "EHLO good.mail.test").startswith("250")
        assert command(sock, f"MAIL FROM:<bob@{domain}> SMTPUTF8") == (
            f"501 5.1.7 <bob@{domain}>: Sender address rejected: Invalid domain name"
        )
        assert command(sock, "MAIL FROM:<bob@good.mail.test> SMTPUTF8") == "250 2.1.0 Ok"
    assert domain not in postfix.maillog()


@pytest.mark.parametrize("address, code, text", [
    ("bob@missing.mail.test", 550, "5.1.8 <bob@missing.mail.test>: Sender address rejected: Domain not found"),
    ("bob@nodata.mail.test", 550, "5.1.8 <bob@nodata.mail.test>: Sender address rejected: Domain not found"),
    ("bob@nullmx.mail.test", 550, "5.7.27 <bob@nullmx.mail.test>: Sender address rejected: Domain does not accept mail (null MX)"),
    ("bob@localhost", 504, "5.5.2 <bob@localhost>: Sender address rejected: need fully-qualified address"),
])
def test_bad_sender_is_refused(gw: GatewayThread, postfix: Any, address: str, code: int, text: str) -> None:
    with gw.client(xclient=OUTSIDE_IP, helo="good.mail.test") as smtp:
        assert smtp.mail(address) == (code, text.encode())
        # The transaction did not start, and the session goes on.
        assert smtp.rcpt("alice@example.com") == (503, b"5.5.1 Error: need MAIL command")
        assert smtp.mail("bob@good.mail.test")[0] == 250


@pytest.mark.parametrize("fault", ["servfail", "timeout"])
def test_sender_dns_trouble_defers(gw: GatewayThread, dns: DNSServer, fault: str) -> None:
    getattr(dns, fault)(f"{fault}.mail.test")
    with gw.client(xclient=OUTSIDE_IP, helo="good.mail.test") as smtp:
        assert smtp.mail(f"bob@{fault}.mail.test") == (
            450, f"4.1.8 <bob@{fault}.mail.test>: Sender address rejected: Domain not found".encode()
        )


def test_trusted_sender_skips_the_checks(gw: GatewayThread, postfix: Any) -> None:
    with gw.client(xclient=TRUSTED_IP, helo="good.mail.test") as smtp:
        assert smtp.sendmail("bob@missing.mail.test", ["alice@example.com"], MESSAGE) == {}
    assert len(postfix.wait_for_messages("alice")) == 1


def test_refused_sender_never_reaches_postfix(gw: GatewayThread, postfix: Any) -> None:
    with gw.client(xclient=OUTSIDE_IP, helo="good.mail.test") as smtp, pytest.raises(smtplib.SMTPSenderRefused):
        smtp.sendmail("bob@nullmx.mail.test", ["alice@example.com"], MESSAGE)
    assert "nullmx.mail.test" not in postfix.maillog()
