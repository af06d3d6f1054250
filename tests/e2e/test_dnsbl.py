"""plugins.dnsbl through the gateway to the real Postfix, with the loopback
DNS server as the lists (tests/zones/bl.test.zone, wl.test.zone,
rhs.test.zone) and XCLIENT to impersonate outside clients."""

from __future__ import annotations

import socket
import time
from typing import Any

import pytest

from tests.fixtures.gateway import OUTSIDE_IP, recv_reply

LISTED_IP = "192.0.2.99"  # 99.2.0.192.bl.test -> 127.0.0.2, with a TXT reason
ALLOWED_IP = "192.0.2.96"  # in bl.test and in wl.test
PBL_IP = "192.0.2.98"  # 127.0.0.10 in bl.test
REASON = "Listed for testing, see https://bl.test/q?ip=192.0.2.99"
ZONES = {
    "bl.test": {"codes": ["127.0.0.2-127.0.0.9"]},
    "wl.test": {"type": "allow"},
    "rhs.test": {"type": "rhs"},
}
MSG = b"From: bob@example.org\r\nSubject: dnsbl\r\n\r\nhello\r\n"


def start(start_gateway: Any, postfix: Any, dns: Any, zones: Any = None, scoring: Any = None,
          dns_timeout: float = 1.0, **options: Any) -> Any:
    kw = {"scoring": scoring} if scoring else {}
    return start_gateway(
        f"127.0.0.1:{postfix.port}",
        plugins={"dnsbl": {"zones": zones or ZONES, **options}},
        dns={"nameservers": [dns.nameserver], "timeout": dns_timeout},
        **kw,
    )


def talk(sock: socket.socket, line: str) -> bytes:
    sock.sendall(line.encode() + b"\r\n")
    return recv_reply(sock)


def test_listed_client_gets_postfix_reply_at_rcpt(start_gateway: Any, postfix: Any, dns: Any) -> None:
    gw = start(start_gateway, postfix, dns)
    with gw.raw() as sock:
        assert talk(sock, f"XCLIENT ADDR={LISTED_IP} NAME=[UNAVAILABLE]").startswith(b"220 ")
        assert talk(sock, "EHLO client.example.net").startswith(b"250-")
        assert talk(sock, "MAIL FROM:<bob@example.org>").startswith(b"250 ")
        assert talk(sock, "RCPT TO:<alice@example.com>") == (
            f"554 5.7.1 Service unavailable; Client host [{LISTED_IP}] blocked using bl.test; {REASON}\r\n".encode()
        )
        assert talk(sock, "DATA") == b"554 5.5.1 Error: no valid recipients\r\n"  # as Postfix says
        assert talk(sock, "QUIT").startswith(b"221 ")
    time.sleep(0.2)
    assert postfix.messages("alice") == []
    # Postfix never heard of the recipient: the gateway refused it.
    assert postfix.rejections() == []
    assert "alice@example.com" not in postfix.maillog()


def test_unlisted_client_mail_arrives(start_gateway: Any, postfix: Any, dns: Any) -> None:
    gw = start(start_gateway, postfix, dns)
    with gw.client(xclient=OUTSIDE_IP) as smtp:
        assert smtp.sendmail("bob@example.org", ["alice@example.com"], MSG) == {}
    (delivered,) = postfix.wait_for_messages("alice")
    assert b"Subject: dnsbl" in delivered


def test_listed_client_can_still_write_to_postmaster(start_gateway: Any, postfix: Any, dns: Any) -> None:
    gw = start(start_gateway, postfix, dns)
    with gw.client(xclient=LISTED_IP) as smtp:
        refused = smtp.sendmail("bob@example.org", ["alice@example.com", "postmaster@example.com"], MSG)
    assert set(refused) == {"alice@example.com"}
    assert refused["alice@example.com"][0] == 554
    (delivered,) = postfix.wait_for_messages("postmaster")
    assert b"Subject: dnsbl" in delivered
    assert postfix.messages("alice") == []


def test_allow_list_beats_block_list(start_gateway: Any, postfix: Any, dns: Any) -> None:
    gw = start(start_gateway, postfix, dns)
    with gw.client(xclient=ALLOWED_IP, helo="bot.spamhelo.example") as smtp:
        # listed in bl.test, HELO and sender in rhs.test: the allow list wins
        assert smtp.sendmail("bob@spam.example", ["alice@example.com"], MSG) == {}
    postfix.wait_for_messages("alice")


def test_listed_sender_domain(start_gateway: Any, postfix: Any, dns: Any) -> None:
    gw = start(start_gateway, postfix, dns)
    with gw.client(xclient=OUTSIDE_IP) as smtp:
        assert smtp.mail("bob@spam.example")[0] == 250
        assert smtp.rcpt("alice@example.com") == (
            554, b"5.7.1 Service unavailable; Sender address [spam.example] blocked using rhs.test; Spam domain"
        )
        smtp.rset()
        # the next transaction, from a clean sender, goes through
        assert smtp.sendmail("bob@example.org", ["alice@example.com"], MSG) == {}
    assert len(postfix.wait_for_messages("alice")) == 1


def test_listed_helo_name(start_gateway: Any, postfix: Any, dns: Any) -> None:
    gw = start(start_gateway, postfix, dns)
    with gw.client(xclient=OUTSIDE_IP, helo="bot.spamhelo.example") as smtp:
        smtp.mail("bob@example.org")
        assert smtp.rcpt("alice@example.com") == (
            554, b"5.7.1 Service unavailable; Helo command [bot.spamhelo.example] blocked using rhs.test"
        )


def test_without_delay_reject_every_command_is_refused(start_gateway: Any, postfix: Any, dns: Any) -> None:
    gw = start(start_gateway, postfix, dns, delay_reject=False)
    line = f"554 5.7.1 Service unavailable; Client host [{LISTED_IP}] blocked using bl.test; {REASON}\r\n".encode()
    with gw.raw() as sock:
        assert talk(sock, f"XCLIENT ADDR={LISTED_IP} NAME=[UNAVAILABLE]") == line
        denied = f"503 5.7.0 Error: access denied for unknown[{LISTED_IP}]\r\n".encode()
        assert talk(sock, "EHLO client.example.net") == denied
        assert talk(sock, "MAIL FROM:<bob@example.org>") == denied
        assert talk(sock, "QUIT").startswith(b"221 ")
    assert all(c["addr"] != LISTED_IP for c in postfix.clients())


def test_blocklist_outage_does_not_stop_mail(start_gateway: Any, postfix: Any, dns: Any) -> None:
    dns.timeout("bl.test")
    # The lists' own limit (0.3 s), not the resolver's (30 s), bounds the wait.
    gw = start(start_gateway, postfix, dns, timeout=0.3, dns_timeout=30.0)
    started = time.monotonic()
    with gw.client(xclient=LISTED_IP) as smtp:
        assert smtp.sendmail("bob@example.org", ["alice@example.com"], MSG) == {}
    assert time.monotonic() - started < 10.0
    postfix.wait_for_messages("alice")


def test_scores_reach_the_scoring_headers(start_gateway: Any, postfix: Any, dns: Any) -> None:
    zones = {"pbl": {"zone": "bl.test", "codes": ["127.0.0.10-127.0.0.11"], "action": 2.5}}
    gw = start(start_gateway, postfix, dns, zones=zones, scoring={"tag": 2.0})
    with gw.client(xclient=PBL_IP) as smtp:
        assert smtp.sendmail("bob@example.org", ["alice@example.com"], MSG) == {}
    (delivered,) = postfix.wait_for_messages("alice")
    assert b"X-Spam-Score: 2.5\n" in delivered
    assert b"X-Spam-Status: Yes, score=2.5 required=2.0 tests=dnsbl:dnsbl=listed_pbl:127.0.0.10(2.5)\n" in delivered


@pytest.mark.parametrize("skip", [True, False])
def test_allow_listed_client_skips_helo_and_sender_checks(start_gateway: Any, postfix: Any, dns: Any, skip: bool) -> None:
    gw = start_gateway(
        f"127.0.0.1:{postfix.port}",
        plugins={
            "dnsbl": {"zones": {"wl.test": {"type": "allow"}}},
            "helo": {"skip_allowlisted": skip},
            "sender": {"skip_allowlisted": skip},
        },
        dns={"nameservers": [dns.nameserver], "timeout": 1.0},
    )
    with gw.raw() as sock:
        assert talk(sock, f"XCLIENT ADDR={ALLOWED_IP} NAME=[UNAVAILABLE]").startswith(b"220 ")
        assert talk(sock, "HELO localhost") == (
            b"250 gw.test.example\r\n" if skip
            else b"550 5.7.1 <localhost>: Helo command rejected: You are not localhost\r\n"
        )
    with gw.raw() as sock:
        assert talk(sock, f"XCLIENT ADDR={ALLOWED_IP} NAME=[UNAVAILABLE]").startswith(b"220 ")
        assert talk(sock, "EHLO client.example.net").startswith(b"250-")
        assert talk(sock, "MAIL FROM:<bob@missing.mail.test>") == (
            b"250 2.1.0 Ok\r\n" if skip
            else b"550 5.1.8 <bob@missing.mail.test>: Sender address rejected: Domain not found\r\n"
        )


def test_allow_listing_ends_with_xclient_naming_another_client(start_gateway: Any, postfix: Any, dns: Any) -> None:
    gw = start_gateway(
        f"127.0.0.1:{postfix.port}",
        plugins={"dnsbl": {"zones": {"wl.test": {"type": "allow"}}}, "helo": {}},
        dns={"nameservers": [dns.nameserver], "timeout": 1.0},
    )
    with gw.raw() as sock:
        assert talk(sock, f"XCLIENT ADDR={ALLOWED_IP} NAME=[UNAVAILABLE]").startswith(b"220 ")
        assert talk(sock, "HELO localhost") == b"250 gw.test.example\r\n"
        assert talk(sock, f"XCLIENT ADDR={OUTSIDE_IP} NAME=[UNAVAILABLE]").startswith(b"220 ")
        assert talk(sock, "HELO localhost").startswith(b"550 5.7.1 <localhost>")


@pytest.mark.parametrize(
    "code,options",
    [("127.0.0.255", {"bitmask": 3}), ("127.0.0.255", {}), ("127.0.0.1", {"bitmask": 3})],
)
def test_a_blocked_allow_list_allows_nobody(
    start_gateway: Any, postfix: Any, dns: Any, code: str, options: dict[str, Any]
) -> None:
    # list.dnswl.org, once it blocks our resolver, answers 127.0.0.255 to
    # every query (URIBL-style lists 127.0.0.1): no client is allow-listed.
    # Nor is any known not to be: a listed client gets a 451, as when the
    # allow list fails, not a 554 that bounces mail it might have let in.
    dns.add_zone("dnswl.test", f"* A {code}\n")
    zones = {**ZONES, "dnswl.test": {"type": "allow", **options}}
    gw = start(start_gateway, postfix, dns, zones=zones)
    with gw.raw() as sock:
        assert talk(sock, f"XCLIENT ADDR={LISTED_IP} NAME=[UNAVAILABLE]").startswith(b"220 ")
        assert talk(sock, "EHLO bot.spamhelo.example").startswith(b"250-")
        assert talk(sock, "MAIL FROM:<bob@example.org>") == b"250 2.1.0 Ok\r\n"
        assert talk(sock, "RCPT TO:<alice@example.com>") == (
            f"451 4.7.1 Service unavailable; Client host [{LISTED_IP}] blocked using bl.test; {REASON}\r\n".encode()
        )
        assert talk(sock, "QUIT").startswith(b"221 ")
    assert postfix.rejections() == []
    assert "alice@example.com" not in postfix.maillog()


HELO_LISTED = b"554 5.7.1 Service unavailable; Helo command [bot.spamhelo.example] blocked using rhs.test\r\n"


def test_a_refused_helo_stays_refused(start_gateway: Any, postfix: Any, dns: Any) -> None:
    gw = start(start_gateway, postfix, dns, delay_reject=False)
    with gw.raw() as sock:
        assert talk(sock, f"XCLIENT ADDR={OUTSIDE_IP} NAME=[UNAVAILABLE]").startswith(b"220 ")
        assert talk(sock, "HELO bot.spamhelo.example") == HELO_LISTED
        # another name does not wash the refusal out
        assert talk(sock, "HELO clean.example.org") == HELO_LISTED
        assert talk(sock, "EHLO clean.example.org") == HELO_LISTED
        assert talk(sock, "MAIL FROM:<bob@example.org>") == b"503 5.5.1 Error: send HELO/EHLO first\r\n"
        # XCLIENT names a new client: judged afresh
        assert talk(sock, f"XCLIENT ADDR={OUTSIDE_IP} NAME=[UNAVAILABLE]").startswith(b"220 ")
        assert talk(sock, "HELO clean.example.org") == b"250 gw.test.example\r\n"
        assert talk(sock, "MAIL FROM:<bob@example.org>") == b"250 2.1.0 Ok\r\n"
        assert talk(sock, "RCPT TO:<alice@example.com>") == b"250 2.1.5 Ok\r\n"
        assert talk(sock, "QUIT").startswith(b"221 ")


def test_a_helo_refusal_held_for_rcpt_stays_held(start_gateway: Any, postfix: Any, dns: Any) -> None:
    gw = start(start_gateway, postfix, dns)  # delay_reject = true
    with gw.raw() as sock:
        assert talk(sock, f"XCLIENT ADDR={OUTSIDE_IP} NAME=[UNAVAILABLE]").startswith(b"220 ")
        assert talk(sock, "HELO bot.spamhelo.example") == b"250 gw.test.example\r\n"
        assert talk(sock, "HELO clean.example.org") == b"250 gw.test.example\r\n"
        assert talk(sock, "MAIL FROM:<bob@example.org>") == b"250 2.1.0 Ok\r\n"
        assert talk(sock, "RCPT TO:<alice@example.com>") == HELO_LISTED
        assert talk(sock, "RSET") == b"250 2.0.0 Ok\r\n"
        assert talk(sock, "EHLO clean.example.org").startswith(b"250-")
        assert talk(sock, "MAIL FROM:<bob@example.org>") == b"250 2.1.0 Ok\r\n"
        assert talk(sock, "RCPT TO:<alice@example.com>") == HELO_LISTED
        assert talk(sock, "QUIT").startswith(b"221 ")
    assert "alice@example.com" not in postfix.maillog()


@pytest.mark.parametrize(
    "zone,test",
    [
        ({"score": 2}, "dnsbl=listed_rhs.test:127.0.0.2_helo=bot.spamhelo.example_(refused_at_RCPT)_(repeated)"),
        ({"action": 2.0}, "dnsbl=listed_rhs.test:127.0.0.2_helo=bot.spamhelo.example"),
    ],
    ids=["refused-at-rcpt", "score-only"],
)
def test_a_repeated_helo_counts_its_score_once(
    start_gateway: Any, postfix: Any, dns: Any, zone: dict[str, Any], test: str
) -> None:
    gw = start(start_gateway, postfix, dns, zones={"rhs.test": {"type": "rhs", **zone}}, scoring={"tag": 1.0})
    with gw.client(xclient=OUTSIDE_IP, helo="bot.spamhelo.example") as smtp:  # EHLO once
        assert smtp.ehlo("bot.spamhelo.example")[0] == 250  # and again
        # the postmaster may be written to, refused HELO or not
        assert smtp.sendmail("bob@example.org", ["postmaster@example.com"], MSG) == {}
    (delivered,) = postfix.wait_for_messages("postmaster")
    assert b"X-Spam-Score: 2.0\n" in delivered
    assert f"X-Spam-Status: Yes, score=2.0 required=1.0 tests=dnsbl:{test}(2)\n".encode() in delivered


def first_refusal(gw: Any, ip: str, helo: str = "client.example.net", sender: str = "bob@example.org") -> bytes:
    """RCPT's reply, or the first refusal before it."""
    with gw.raw() as sock:
        for line in (f"XCLIENT ADDR={ip} NAME=[UNAVAILABLE]", f"EHLO {helo}", f"MAIL FROM:<{sender}>",
                     "RCPT TO:<alice@example.com>"):
            reply = talk(sock, line)
            if reply[:1] != b"2":
                break
        talk(sock, "QUIT")
        return reply


@pytest.mark.parametrize("tempfail", ["continue", "defer"])
def test_an_allow_list_outage_defers_whom_it_might_have_let_in(start_gateway: Any, postfix: Any, dns: Any,
                                                              tempfail: str) -> None:
    # Postfix's permit_dnswl_client answers DEFER_IF_REJECT when its lookup
    # fails: a 554 here would bounce mail the allow list would have let in.
    dns.servfail("wl.test", subtree=True)
    gw = start(start_gateway, postfix, dns, actions={"tempfail": tempfail}, pause_after=0)
    assert first_refusal(gw, ALLOWED_IP) == (
        f"451 4.7.1 Service unavailable; Client host [{ALLOWED_IP}] blocked using bl.test; "
        "Listed, but allow-listed elsewhere\r\n").encode()
    dns.reset_faults()
    gw = start(start_gateway, postfix, dns, actions={"tempfail": tempfail})
    assert first_refusal(gw, ALLOWED_IP) == b"250 2.1.5 Ok\r\n"


def test_a_paused_block_list_defers_where_the_policy_says_defer(start_gateway: Any, postfix: Any, dns: Any) -> None:
    dns.servfail("bl.test", subtree=True)
    gw = start(start_gateway, postfix, dns, zones={"bl.test": {}}, actions={"tempfail": "defer"}, pause_after=1)
    failed = "451 4.4.3 Service unavailable; Client host [{}]: lookup in bl.test failed, try again later\r\n"
    assert first_refusal(gw, "192.0.2.90") == failed.format("192.0.2.90").encode()
    # Paused now, so not asked: still no pass for a client it may list.
    assert first_refusal(gw, LISTED_IP) == failed.format(LISTED_IP).encode()


def test_an_xclient_address_is_judged_and_shown_as_the_client_it_names(start_gateway: Any, postfix: Any,
                                                                      dns: Any) -> None:
    # IPv4-mapped: the IPv4 client, in the reply too, as at a connection.
    gw = start(start_gateway, postfix, dns)
    assert first_refusal(gw, f"IPV6:::ffff:{LISTED_IP}") == (
        f"554 5.7.1 Service unavailable; Client host [{LISTED_IP}] blocked using bl.test; {REASON}\r\n".encode())
    # Scoped: names no host beyond a link; Postfix's XCLIENT refuses it too.
    with gw.raw() as sock:
        assert talk(sock, "XCLIENT ADDR=IPV6:2001:db8::99%eth0") == (
            b"501 5.5.4 Bad XCLIENT attribute: ADDR=IPV6:2001:db8::99%eth0\r\n")


@pytest.mark.parametrize("delay_reject", [True, False])
@pytest.mark.parametrize("where", ["helo", "sender"])
def test_an_allow_list_outage_defers_domain_listings_too(start_gateway: Any, postfix: Any, dns: Any,
                                                          where: str, delay_reject: bool) -> None:
    # The allow list is asked at connect; had it answered, the client's HELO
    # and sender would not have been looked at.
    zones = {"wl.test": {"type": "allow"}, "rhs.test": {"type": "rhs"}}
    kw = {"helo": "bot.spamhelo.example"} if where == "helo" else {"sender": "bob@spam.example"}
    gw = start(start_gateway, postfix, dns, zones=zones, delay_reject=delay_reject)
    assert first_refusal(gw, ALLOWED_IP, **kw) == b"250 2.1.5 Ok\r\n"
    dns.servfail("wl.test", subtree=True)
    gw = start(start_gateway, postfix, dns, zones=zones, delay_reject=delay_reject, pause_after=0)
    assert first_refusal(gw, ALLOWED_IP, **kw)[:10] == b"451 4.7.1 "


def test_an_allow_list_that_lets_no_one_in_changes_nothing_when_down(start_gateway: Any, postfix: Any,
                                                                      dns: Any) -> None:
    zones = {"bl.test": {}, "wl.test": {"type": "allow", "action": "tag"}}
    gw = start(start_gateway, postfix, dns, zones=zones)
    up = first_refusal(gw, ALLOWED_IP)
    assert up[:10] == b"554 5.7.1 "
    dns.servfail("wl.test", subtree=True)
    gw = start(start_gateway, postfix, dns, zones=zones, pause_after=0)
    assert first_refusal(gw, ALLOWED_IP) == up
