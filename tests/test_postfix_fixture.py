"""Self-test of the private Postfix fixture: the oracle the e2e tests rely on.

If these fail, every end-to-end result is suspect, so they pin the exact
Postfix behaviour the gateway tests assume.
"""

from __future__ import annotations

import smtplib
import socket
from pathlib import Path

from tests.fixtures.postfix import PostfixInstance, _group_members

# The `postfix` fixture comes from tests/conftest.py (pytest_plugins). Do not
# import it here as well: a second definition would start a second
# session-scoped Postfix.

SENDER = "sender@sender.test"

# CRLF on the wire, a folded header, a line that needs dot-stuffing and
# trailing whitespace: all must survive unchanged (apart from CRLF -> LF).
MESSAGE = (
    b"From: Sender <sender@sender.test>\r\n"
    b"To: Alice <alice@example.com>\r\n"
    b"Subject: fixture self-test\r\n"
    b"  folded subject line\r\n"
    b"Date: Mon, 23 Nov 2026 12:00:00 +0000\r\n"
    b"Message-ID: <selftest-1@sender.test>\r\n"
    b"\r\n"
    b"first line\r\n"
    b".leading dot survives\r\n"
    b"trailing space   \r\n"
    b"\r\n"
    b"last line\r\n"
)


def _smtp(pf: PostfixInstance) -> smtplib.SMTP:
    client = smtplib.SMTP(pf.host, pf.port, local_hostname="gw.test", timeout=10)
    client.ehlo()
    return client


def _xclient(
    client: smtplib.SMTP,
    addr: str,
    name: str = "client.example.net",
    helo: str = "outside.example.net",
) -> None:
    """XCLIENT as the gateway will send it.

    Postfix answers with a fresh 220 greeting. The EHLO that follows replaces
    XCLIENT's HELO= in what Postfix records, so it must carry the client's name.
    """
    code, reply = client.docmd(
        "XCLIENT", f"ADDR={addr} NAME={name} HELO={helo} PROTO=ESMTP"
    )
    assert code == 220, reply
    client.ehlo(helo)


def test_delivery_is_byte_identical_after_prepended_headers(
    postfix: PostfixInstance,
) -> None:
    with _smtp(postfix) as client:
        client.sendmail(SENDER, ["alice@example.com"], MESSAGE)
    [stored] = postfix.wait_for_messages("alice", 1)

    # Maildir stores lines with LF; otherwise the bytes are exactly ours.
    expected_tail = MESSAGE.replace(b"\r\n", b"\n")
    assert stored.endswith(expected_tail)
    assert b"\r" not in stored
    prepended = stored[: -len(expected_tail)].decode().splitlines()
    assert prepended[:3] == [
        f"Return-Path: <{SENDER}>",
        "X-Original-To: alice@example.com",
        "Delivered-To: alice@example.com",
    ]
    # Received (3 lines): helo from the second EHLO, client as Postfix saw it.
    assert prepended[3] == "Received: from gw.test (localhost [127.0.0.1])"
    assert prepended[4].startswith("\tby postfix.test (Postfix) with ESMTP id ")
    assert prepended[5].startswith("\tfor <alice@example.com>; ")
    assert len(prepended) == 6

    record = postfix.wait_for_delivery("alice@example.com")
    assert (record["status"], record["relay"], record["service"]) == (
        "sent",
        "virtual",
        "virtual",
    )
    assert postfix.messages("bob") == []


def test_unknown_user_rejected_at_rcpt(postfix: PostfixInstance) -> None:
    with _smtp(postfix) as client:
        assert client.mail(SENDER)[0] == 250
        code, reply = client.rcpt("nosuchuser@example.com")
    assert code == 550
    assert reply == (
        b"5.1.1 <nosuchuser@example.com>: Recipient address rejected: User unknown in virtual mailbox table"
    )


def test_xclient_client_is_recorded(postfix: PostfixInstance) -> None:
    with _smtp(postfix) as client:
        _xclient(client, "203.0.113.7")
        client.sendmail(SENDER, ["bob@example.com"], MESSAGE)
    [stored] = postfix.wait_for_messages("bob", 1)

    record = postfix.wait_for_client("203.0.113.7")
    assert record["name"] == "client.example.net"
    assert (
        postfix.wait_for_delivery("bob@example.com")["queue_id"] == record["queue_id"]
    )
    assert (
        b"Received: from outside.example.net (client.example.net [203.0.113.7])\n"
        in stored
    )


def test_relay_denied_for_outside_client(postfix: PostfixInstance) -> None:
    with _smtp(postfix) as client:
        _xclient(client, "203.0.113.7")
        assert client.mail(SENDER)[0] == 250
        code, reply = client.rcpt("someone@remote.test")
    assert (code, reply) == (554, b"5.7.1 <someone@remote.test>: Relay access denied")

    # Postfix logs the rejection after it answers: wait for the line.
    postfix.wait_for_log(r"reject: RCPT .*<someone@remote\.test>")
    [rejection] = postfix.rejections()
    assert rejection["addr"] == "203.0.113.7"
    assert rejection["reply"].startswith("554 5.7.1 ")
    assert rejection["to"] == "someone@remote.test"
    assert postfix.deliveries() == []


def test_relay_from_mynetworks_is_accepted_and_discarded(
    postfix: PostfixInstance,
) -> None:
    with _smtp(postfix) as client:
        _xclient(client, "198.51.100.5")
        refused = client.sendmail(SENDER, ["someone@remote.test"], MESSAGE)
    assert refused == {}

    record = postfix.wait_for_delivery("someone@remote.test")
    assert (record["status"], record["service"], record["relay"]) == (
        "sent",
        "discard",
        "none",
    )
    assert postfix.wait_for_client("198.51.100.5")["queue_id"] == record["queue_id"]


def test_clear_forgets_mail_and_log(postfix: PostfixInstance) -> None:
    with _smtp(postfix) as client:
        client.sendmail(SENDER, ["carol@example.com"], MESSAGE)
    postfix.wait_for_messages("carol", 1)
    postfix.clear()
    assert postfix.messages("carol") == []
    assert postfix.deliveries() == []
    assert postfix.maillog() == ""


def test_own_instance_starts_and_stops_cleanly(tmp_path: Path) -> None:
    with PostfixInstance(
        tmp_path / "pf", extra_main_cf={"smtpd_banner": "$myhostname ESMTP selftest"}
    ) as pf:
        master = pf._master_pid
        assert master is not None and pf.running
        with socket.create_connection((pf.host, pf.port), timeout=10) as sock:
            assert (
                sock.makefile("rb").readline() == b"220 postfix.test ESMTP selftest\r\n"
            )
            sock.sendall(b"QUIT\r\n")
    assert not pf.running
    assert _group_members(master) == []
