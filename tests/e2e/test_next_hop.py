"""The dialogue with the next hop, as Postfix records it: how many
commands each message costs the MTA, and what happens when what the
gateway remembers about the MTA is out of date."""

import logging
import smtplib
import time
from collections.abc import Iterator
from ipaddress import ip_address

import pytest

from gateway.session import Session
from gateway.upstream import NextHopMemory, SMTPUpstream
from tests.fixtures.gateway import OUTSIDE_IP, make_policy, recv_reply
from tests.fixtures.postfix import PostfixInstance
from tests.fixtures.testplugins import Gatekeeper

SECOND_IP = "203.0.113.8"
MESSAGE = b"From: bob@example.org\r\nTo: alice@example.com\r\nSubject: hop\r\n\r\nbody\r\n"


def test_gateway_ehlo_is_skipped_once_xclient_is_known(gateway, postfix) -> None:
    for client in (OUTSIDE_IP, SECOND_IP):
        with gateway.client(xclient=client) as smtp:
            smtp.sendmail("bob@example.org", ["alice@example.com"], MESSAGE)
    first = postfix.wait_for_commands(OUTSIDE_IP)
    second = postfix.wait_for_commands(SECOND_IP)
    # The first session greets Postfix as the gateway to learn that it
    # offers XCLIENT; later ones go straight to XCLIENT and the client's EHLO.
    assert first["ehlo"] == "2"
    assert second["ehlo"] == "1"
    assert second["bdat"] == "1"
    assert len(postfix.wait_for_messages("alice", count=2)) == 2
    assert postfix.wait_for_client(SECOND_IP)["addr"] == SECOND_IP


def test_second_xclient_in_a_session_reaches_postfix(gateway, postfix) -> None:
    # Postfix does not offer XCLIENT again once it has been used on a
    # connection, so the new client needs a new connection to Postfix.
    with gateway.client(xclient=OUTSIDE_IP) as smtp:
        smtp.sendmail("bob@example.org", ["alice@example.com"], MESSAGE)
        assert smtp.docmd("XCLIENT", f"ADDR={SECOND_IP} NAME=[UNAVAILABLE]")[0] == 220
        assert smtp.ehlo("mx.second.example.net")[0] == 250
        smtp.sendmail("carol@example.org", ["alice@example.com"], MESSAGE)
    assert postfix.wait_for_client(SECOND_IP)["addr"] == SECOND_IP
    second = next(m for m in postfix.wait_for_messages("alice", count=2) if b"<carol@example.org>" in m)
    assert b"from mx.second.example.net (unknown [203.0.113.8])" in second


def test_new_helo_name_in_a_session_reaches_postfix(gateway, postfix) -> None:
    with gateway.client(xclient=OUTSIDE_IP, helo="first.example.net") as smtp:
        smtp.sendmail("bob@example.org", ["alice@example.com"], MESSAGE)
        assert smtp.ehlo("second.example.net")[0] == 250
        smtp.sendmail("carol@example.org", ["alice@example.com"], MESSAGE)
    messages = postfix.wait_for_messages("alice", count=2)
    first = next(m for m in messages if b"<bob@example.org>" in m)
    second = next(m for m in messages if b"<carol@example.org>" in m)
    assert b"from first.example.net (unknown [203.0.113.7])" in first
    assert b"from second.example.net (unknown [203.0.113.7])" in second


def test_ehlo_after_a_helo_transaction_offers_what_a_first_ehlo_would(gateway, postfix) -> None:
    # Postfix greeted with the client's HELO offers nothing; that is no
    # reason to offer the client nothing once it says EHLO itself.
    with gateway.client(xclient=OUTSIDE_IP) as smtp:
        offered = smtp.ehlo_resp
    with smtplib.SMTP("127.0.0.1", gateway.port, local_hostname="client.example.net", timeout=10) as smtp:
        assert smtp.docmd("XCLIENT", f"ADDR={SECOND_IP} NAME=[UNAVAILABLE]")[0] == 220
        assert smtp.helo()[0] == 250
        assert smtp.sendmail("bob@example.org", ["alice@example.com"], MESSAGE) == {}
        assert smtp.ehlo() == (250, offered)
        assert smtp.mail("b\u00f8b@example.org", ["BODY=8BITMIME", "SMTPUTF8"]) == (250, b"2.1.0 Ok")
        assert smtp.rcpt("carol@example.com", ["NOTIFY=NEVER"]) == (250, b"2.1.5 Ok")
        assert smtp.data(MESSAGE)[0] == 250
    (helo,) = postfix.wait_for_messages("alice")
    (ehlo,) = postfix.wait_for_messages("carol")
    assert b"(unknown [203.0.113.8])\n\tby " in helo and b"with SMTP id" in helo
    assert b"with UTF8SMTP id" in ehlo or b"with ESMTP id" in ehlo
    # Greeted with HELO, Postfix was sent DATA, not the BDAT it offers
    # only after EHLO, whatever the gateway now offers its client.
    by_helo = postfix.wait_for_commands(SECOND_IP)
    assert by_helo["helo"] == "1" and by_helo["data"] == "1" and "bdat" not in by_helo


@pytest.fixture(scope="module")
def postfix_without_xclient(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostfixInstance]:
    """A Postfix that no longer lets the gateway's address use XCLIENT."""
    with PostfixInstance(
        tmp_path_factory.mktemp("postfix-noxclient"),
        extra_main_cf={"smtpd_authorized_xclient_hosts": ""},
    ) as instance:
        yield instance


async def test_stale_memory_of_xclient_falls_back_to_ehlo(postfix_without_xclient) -> None:
    settings = make_policy(f"127.0.0.1:{postfix_without_xclient.port}").gateway
    memory = NextHopMemory(extensions=frozenset({"xclient"}), xclient=frozenset({"ADDR", "NAME", "HELO", "PROTO"}))
    upstream = SMTPUpstream(settings.upstream_endpoint, settings, memory)
    session = Session(client_ip=ip_address(OUTSIDE_IP), helo="client.example.net")
    try:
        await upstream.connect()
        await upstream.introduce(session)
        assert (await upstream.command("MAIL FROM:<bob@example.org>")).code == 250
    finally:
        await upstream.close()
    # Learnt from the EHLO that followed the refused XCLIENT.
    assert memory.xclient == frozenset()
    assert "xclient" not in upstream.extensions


@pytest.fixture(scope="module")
def postfix_discarding_chunking_for_one_client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostfixInstance]:
    """A Postfix that offers CHUNKING to the gateway but not to OUTSIDE_IP
    (smtpd_discard_ehlo_keyword_address_maps), and refuses BDAT from a
    client it did not offer CHUNKING to, EHLO or not."""
    base = tmp_path_factory.mktemp("postfix-discard-per-client")
    (base / "discard.cidr").write_text(f"{OUTSIDE_IP} chunking\n")
    with PostfixInstance(
        base, extra_main_cf={"smtpd_discard_ehlo_keyword_address_maps": f"cidr:{base / 'discard.cidr'}"}
    ) as instance:
        yield instance


def test_extensions_come_from_the_ehlo_after_xclient(start_gateway, postfix_discarding_chunking_for_one_client) -> None:
    # Postfix recomputes what it offers for the client XCLIENT names.  The
    # EHLO after XCLIENT is what tells us; skipping it to save a round trip
    # would send BDAT and turn the message into a 521.
    postfix = postfix_discarding_chunking_for_one_client
    gateway = start_gateway(f"127.0.0.1:{postfix.port}")
    for client in (SECOND_IP, OUTSIDE_IP):
        with gateway.client(xclient=client) as smtp:
            assert smtp.sendmail("bob@example.org", ["alice@example.com"], MESSAGE) == {}
    assert len(postfix.wait_for_messages("alice", count=2)) == 2
    assert postfix.wait_for_commands(SECOND_IP)["bdat"] == "1"
    discarded = postfix.wait_for_commands(OUTSIDE_IP)
    assert discarded["data"] == "1"
    assert "bdat" not in discarded


REFUSED_IP = "203.0.113.66"
DEFERRED_IP = "203.0.113.67"


@pytest.fixture(scope="module")
def postfix_judging_clients_at_once(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostfixInstance]:
    """A Postfix with ``smtpd_delay_reject = no``: it applies its client
    restrictions as soon as XCLIENT names the client, and answers XCLIENT
    with their verdict instead of its greeting."""
    base = tmp_path_factory.mktemp("postfix-no-delay-reject")
    (base / "clients.cidr").write_text(f"{REFUSED_IP} REJECT go away\n{DEFERRED_IP} DEFER come back later\n")
    (base / "helo.regexp").write_text("/^refused\\.example\\.net$/ REJECT not that name\n")
    with PostfixInstance(base, extra_main_cf={
        "smtpd_delay_reject": "no",
        "smtpd_client_restrictions": f"check_client_access cidr:{base / 'clients.cidr'}",
        "smtpd_helo_restrictions": f"check_helo_access regexp:{base / 'helo.regexp'}",
    }) as instance:
        yield instance


@pytest.mark.parametrize(("client", "helo", "reply"), [
    (REFUSED_IP, "client.example.net", (554, b"5.7.1 <unknown[203.0.113.66]>: Client host rejected: go away")),
    (DEFERRED_IP, "client.example.net",
     (450, b"4.7.1 <unknown[203.0.113.67]>: Client host rejected: come back later")),
    (OUTSIDE_IP, "refused.example.net",
     (554, b"5.7.1 <refused.example.net>: Helo command rejected: not that name")),
])
def test_the_next_hops_refusal_of_the_client_is_the_answer_to_mail(
    start_gateway, postfix_judging_clients_at_once, client: str, helo: str, reply: tuple[int, bytes]
) -> None:
    # Not "421 next hop unavailable": a 554 the client would retry for days.
    postfix = postfix_judging_clients_at_once
    postfix.clear()
    gateway = start_gateway(f"127.0.0.1:{postfix.port}")
    with gateway.client(xclient=client, helo=helo) as smtp:
        assert smtp.mail("bob@example.org") == reply
        # Again on a fresh connection, where the gateway goes from Postfix's
        # banner straight to XCLIENT: the same answer, and the session goes on.
        assert smtp.mail("bob@example.org") == reply
        assert smtp.noop()[0] == 250
    with gateway.client(xclient=OUTSIDE_IP) as smtp:  # a client Postfix takes
        assert smtp.sendmail("bob@example.org", ["alice@example.com"], MESSAGE) == {}
    assert len(postfix.wait_for_messages("alice", count=1)) == 1


def test_clients_turned_away_before_mail_never_reach_postfix(start_gateway, postfix) -> None:
    gateway = start_gateway(f"127.0.0.1:{postfix.port}", plugins={"gate": {}}, extra={"gate": Gatekeeper})
    with gateway.client(xclient=OUTSIDE_IP) as smtp:  # the first session learns what Postfix offers
        assert smtp.sendmail("bob@example.org", ["alice@example.com"], MESSAGE) == {}
    postfix.wait_for_messages("alice", count=1)
    # A HELO our checks refuse, a prober asking VRFY, one that leaves after EHLO.
    with gateway.client(xclient=SECOND_IP, helo="ok.example.net") as smtp:
        assert smtp.ehlo("bad.example")[0] == 550
    with gateway.client(xclient=SECOND_IP) as smtp:
        assert smtp.verify("alice")[0] == 502
    with gateway.client(xclient=SECOND_IP) as smtp:
        # What it is offered comes from what Postfix told the first session.
        assert {"dsn", "smtputf8", "8bitmime"} <= set(smtp.esmtp_features)
    with gateway.client(xclient=OUTSIDE_IP) as smtp:
        assert smtp.sendmail("carol@example.org", ["alice@example.com"], MESSAGE) == {}
    postfix.wait_for_messages("alice", count=2)
    connects = [line for line in postfix.smtpd_log_lines() if " connect from " in line]
    assert len(connects) == 2, connects
    assert SECOND_IP not in postfix.maillog()


def test_a_data_command_the_next_hop_refuses_leaves_no_transaction_behind(start_gateway, tmp_path) -> None:
    # Without CHUNKING the message goes by DATA, which Postfix's
    # smtpd_data_restrictions may refuse; Postfix's transaction is then
    # still open, and ours is over: the next MAIL must not be "nested".
    with PostfixInstance(tmp_path / "pf", extra_main_cf={
        "smtpd_discard_ehlo_keywords": "chunking",
        "smtpd_data_restrictions": "reject_multi_recipient_bounce",
    }) as postfix:
        gateway = start_gateway(f"127.0.0.1:{postfix.port}")
        with gateway.client(xclient=OUTSIDE_IP) as smtp:
            smtp.mail("")
            smtp.rcpt("alice@example.com")
            smtp.rcpt("bob@example.com")
            assert smtp.data(MESSAGE) == (550, b"5.5.3 <DATA>: Data command rejected: Multi-recipient bounce")
            assert smtp.rset() == (250, b"2.0.0 Ok")
            assert smtp.mail("bob@example.org") == (250, b"2.1.0 Ok")
            assert smtp.rcpt("alice@example.com") == (250, b"2.1.5 Ok")
            assert smtp.data(MESSAGE)[0] == 250
            # And with no RSET in between: the refusal ended the transaction.
            smtp.mail("")
            smtp.rcpt("alice@example.com")
            smtp.rcpt("bob@example.com")
            assert smtp.data(MESSAGE)[0] == 550
            assert smtp.mail("bob@example.org") == (250, b"2.1.0 Ok")
        assert len(postfix.wait_for_messages("alice", count=1)) == 1


def test_what_postfix_withholds_from_one_client_is_still_offered_to_the_next(start_gateway, tmp_path) -> None:
    # Postfix's discard map takes DSN and SMTPUTF8 from OUTSIDE_IP only.
    # What it offered that client must not become the worker's offer to
    # everyone after it (a UTF-8 sender refused with a 5yz).
    (tmp_path / "discard.cidr").write_text(f"{OUTSIDE_IP} dsn, smtputf8\n")
    with PostfixInstance(tmp_path / "pf", extra_main_cf={
        "smtpd_discard_ehlo_keyword_address_maps": f"cidr:{tmp_path / 'discard.cidr'}",
    }) as postfix:
        gateway = start_gateway(f"127.0.0.1:{postfix.port}")
        with gateway.client(xclient=OUTSIDE_IP) as smtp:
            assert smtp.sendmail("bob@example.org", ["alice@example.com"], MESSAGE) == {}
        with gateway.client(xclient=SECOND_IP) as smtp:
            assert smtp.has_extn("smtputf8") and smtp.has_extn("dsn")
            assert smtp.mail("b\u00f8b@example.org", ["SMTPUTF8"]) == (250, b"2.1.0 Ok")
            assert smtp.rcpt("alice@example.com", ["NOTIFY=NEVER"]) == (250, b"2.1.5 Ok")
            assert smtp.data(MESSAGE)[0] == 250
        assert len(postfix.wait_for_messages("alice", count=2)) == 2


def test_the_next_hop_is_kept_awake_while_a_slow_message_arrives(start_gateway, tmp_path) -> None:
    # The message reaches Postfix only once it is in and judged; on a slow
    # link that took longer than Postfix's smtpd_timeout (300 s; 2 s here),
    # and the message failed on every retry.
    with PostfixInstance(tmp_path / "pf", extra_main_cf={"smtpd_timeout": "2s"}) as postfix:
        gateway = start_gateway(f"127.0.0.1:{postfix.port}", upstream_keepalive=0.5)
        sock = gateway.raw()
        with sock:
            for command in (f"XCLIENT ADDR={OUTSIDE_IP}", "EHLO client.example.net", "MAIL FROM:<bob@example.org>",
                            "RCPT TO:<alice@example.com>", "DATA"):
                sock.sendall(command.encode() + b"\r\n")
                assert recv_reply(sock)[:1] in (b"2", b"3")
            sock.sendall(b"Subject: slow link\r\n\r\n")
            for i in range(5):
                time.sleep(1)
                sock.sendall(b"line %d\r\n" % i)
            sock.sendall(b".\r\n")
            assert recv_reply(sock).startswith(b"250 2.0.0 Ok: ")
        (message,) = postfix.wait_for_messages("alice")
        assert message.endswith(b"line 4\n")
        noops = int(postfix.wait_for_commands(OUTSIDE_IP)["noop"])
        assert 6 <= noops <= 12  # one each 0.5 s (checked each tick, 0.05 s here)


def test_a_keepalive_the_next_hop_refuses_is_reported_as_such(start_gateway, tmp_path, caplog) -> None:
    # Postfix counts NOOPs as junk; past its limits it answers 421. The
    # message then fails (451, retried), and the log says why.
    with PostfixInstance(tmp_path / "pf", extra_main_cf={
        "smtpd_junk_command_limit": "1", "smtpd_hard_error_limit": "1",
    }) as postfix:
        gateway = start_gateway(f"127.0.0.1:{postfix.port}", upstream_keepalive=0.2)
        with caplog.at_level(logging.WARNING, "smtpgate"), gateway.raw() as sock:
            for command in (f"XCLIENT ADDR={OUTSIDE_IP}", "EHLO client.example.net", "MAIL FROM:<bob@example.org>",
                            "RCPT TO:<alice@example.com>", "DATA"):
                sock.sendall(command.encode() + b"\r\n")
                assert recv_reply(sock)[:1] in (b"2", b"3")
            sock.sendall(b"Subject: slow\r\n\r\n")
            time.sleep(1)
            sock.sendall(b"body\r\n.\r\n")
            assert recv_reply(sock) == b"451 4.4.1 Error: next hop failed during the transaction, try again later\r\n"
        (line,) = [line for line in caplog.text.splitlines() if "next hop failed during DATA: NOOP" in line]
        assert "421 4.7.0" in line  # Postfix's own answer, "too many errors"
        assert postfix.messages("alice") == []


def test_dsn_the_next_hop_withholds_from_the_client_does_not_cost_its_message(start_gateway, tmp_path, caplog) -> None:
    # Postfix's DSN_README: no DSN for outside clients (against probes of
    # where mail ends up), by smtpd_discard_ehlo_keyword_address_maps.
    # The gateway, which Postfix still offers DSN, offers it at EHLO before
    # it knows who the client will be to Postfix; the client's DSN request
    # met "501 5.7.1 DSN support is disabled" at MAIL or RCPT and the
    # message bounced.  It goes now as from a client not offered DSN.
    (tmp_path / "discard.cidr").write_text(f"{OUTSIDE_IP} silent-discard, dsn\n")
    with PostfixInstance(tmp_path / "pf", extra_main_cf={
        "smtpd_discard_ehlo_keyword_address_maps": f"cidr:{tmp_path / 'discard.cidr'}",
    }) as postfix:
        gateway = start_gateway(f"127.0.0.1:{postfix.port}")
        with caplog.at_level(logging.INFO, "smtpgate"):
            for client in (OUTSIDE_IP, SECOND_IP):
                with gateway.client(xclient=client) as smtp:
                    assert smtp.has_extn("dsn")
                    assert smtp.mail("bob@example.org", ["RET=HDRS", "ENVID=x"]) == (250, b"2.1.0 Ok")
                    assert smtp.rcpt("alice@example.com", ["NOTIFY=SUCCESS", "ORCPT=rfc822;alice@example.com"]) == (
                        250, b"2.1.5 Ok")
                    assert smtp.data(MESSAGE)[0] == 250
        assert len(postfix.wait_for_messages("alice", count=2)) == 2
        # The client Postfix offers DSN to keeps its request: a success notice.
        postfix.wait_for_log(r"sender delivery status notification: ")
        postfix.settle()
        assert postfix.maillog().count("sender delivery status notification: ") == 1
    assert "next hop withholds DSN from this client: not passing on RET=HDRS ENVID=x" in caplog.text
