"""Through the gateway to the real Postfix: what arrives, and what the client
hears, must be what Postfix alone would give."""

import smtplib

from tests.fixtures.gateway import OUTSIDE_IP, TRUSTED_IP, recv_reply
from tests.fixtures.postfix import QUEUED

MESSAGE = (
    b"From: Bob <bob@example.org>\r\n"
    b"To: Alice <alice@example.com>\r\n"
    b"Subject: byte for byte\r\n"
    b"\r\n"
    b"first line\r\n"
    b".a line that starts with a dot\r\n"
    b"..two dots\r\n"
    b"\xc3\xa4 8-bit \xff text\r\n"
    b"trailing spaces   \r\n"
    + b"x" * 1500 + b"\r\n"
    b"last line\r\n"
)


def body_of(delivered: bytes) -> bytes:
    """The message after the headers Postfix prepends (Return-Path,
    X-Original-To, Delivered-To, Received), Maildir LF line ends."""
    return delivered[delivered.index(b"\nFrom: Bob") + 1 :]


def test_message_reaches_postfix_byte_identical(gateway, postfix) -> None:
    with gateway.client(xclient=OUTSIDE_IP) as smtp:
        refused = smtp.sendmail("bob@example.org", ["alice@example.com"], MESSAGE, mail_options=["BODY=8BITMIME"])
    assert refused == {}
    (delivered,) = postfix.wait_for_messages("alice")
    assert body_of(delivered) == MESSAGE.replace(b"\r\n", b"\n")


def test_message_goes_as_one_bdat_when_postfix_offers_chunking(gateway, postfix) -> None:
    with gateway.client(xclient=OUTSIDE_IP) as smtp:
        smtp.sendmail("bob@example.org", ["alice@example.com"], MESSAGE)
    (delivered,) = postfix.wait_for_messages("alice")
    assert body_of(delivered) == MESSAGE.replace(b"\r\n", b"\n")
    commands = postfix.wait_for_commands(OUTSIDE_IP)
    assert commands["bdat"] == "1"
    assert "data" not in commands


def test_without_chunking_the_message_goes_by_data_byte_identical(start_gateway, postfix_without_chunking) -> None:
    postfix = postfix_without_chunking
    gateway = start_gateway(f"127.0.0.1:{postfix.port}")
    with gateway.client(xclient=OUTSIDE_IP) as smtp:
        refused = smtp.sendmail("bob@example.org", ["alice@example.com"], MESSAGE, mail_options=["BODY=8BITMIME"])
    assert refused == {}
    (delivered,) = postfix.wait_for_messages("alice")
    assert body_of(delivered) == MESSAGE.replace(b"\r\n", b"\n")
    commands = postfix.wait_for_commands(OUTSIDE_IP)
    assert commands["data"] == "1"
    assert "bdat" not in commands


def test_postfix_records_the_real_client_via_xclient(gateway, postfix) -> None:
    with gateway.client(xclient=OUTSIDE_IP, helo="mx.client.example.net") as smtp:
        smtp.sendmail("bob@example.org", ["alice@example.com"], MESSAGE)
    record = postfix.wait_for_client(OUTSIDE_IP)
    assert record["name"] == "unknown"
    (delivered,) = postfix.wait_for_messages("alice")
    assert b"from mx.client.example.net (unknown [203.0.113.7])" in delivered


def test_a_client_that_says_helo_is_received_with_smtp_as_by_postfix(gateway, postfix) -> None:
    # RFC 5321 §4.4: the Received header's "with" names the protocol the
    # client spoke. Postfix takes the one of the greeting that follows
    # XCLIENT, whatever PROTO said: the gateway must greet as the client did.
    smtp = smtplib.SMTP("127.0.0.1", gateway.port, local_hostname="mx.client.example.net", timeout=10)
    with smtp:
        assert smtp.docmd("XCLIENT", f"ADDR={OUTSIDE_IP} NAME=[UNAVAILABLE]")[0] == 220
        assert smtp.helo("mx.client.example.net")[0] == 250
        assert smtp.sendmail("bob@example.org", ["alice@example.com"], MESSAGE) == {}
    (delivered,) = postfix.wait_for_messages("alice")
    assert b"from mx.client.example.net (unknown [203.0.113.7])\n\tby postfix.test (Postfix) with SMTP id" in delivered
    assert body_of(delivered) == MESSAGE.replace(b"\r\n", b"\n")
    commands = postfix.wait_for_commands(OUTSIDE_IP)
    assert commands["helo"] == "1"


def test_user_unknown_reply_is_postfix_verbatim(gateway, postfix) -> None:
    with gateway.client(xclient=OUTSIDE_IP) as smtp:
        smtp.mail("bob@example.org")
        code, text = smtp.rcpt("nobody@example.com")
    assert code == 550
    assert text == (
        b"5.1.1 <nobody@example.com>: Recipient address rejected: "
        b"User unknown in virtual mailbox table"
    )


def test_several_recipients_and_rset(gateway, postfix) -> None:
    with gateway.client(xclient=OUTSIDE_IP) as smtp:
        smtp.mail("bob@example.org")
        assert smtp.rcpt("carol@example.com")[0] == 250
        assert smtp.rset()[0] == 250
        refused = smtp.sendmail("bob@example.org", ["alice@example.com", "bob@example.com"], MESSAGE)
        assert refused == {}
    assert len(postfix.wait_for_messages("alice")) == 1
    assert len(postfix.wait_for_messages("bob")) == 1
    assert postfix.messages("carol") == []


def test_dsn_and_smtputf8_parameters_reach_postfix(gateway, postfix) -> None:
    with gateway.client(xclient=TRUSTED_IP) as smtp:
        assert smtp.has_extn("dsn") and smtp.has_extn("smtputf8")
        code, _ = smtp.mail("bob@example.org", ["RET=HDRS", "ENVID=abc123", "SMTPUTF8"])
        assert code == 250
        code, _ = smtp.rcpt("alice@example.com", ["NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;alice@example.com"])
        assert code == 250
        code, _ = smtp.rcpt("\u00fc@b\u00fccher.example")  # relayed (trusted) to discard
        assert code == 250
        assert smtp.data(MESSAGE)[0] == 250
    postfix.wait_for_messages("alice")
    record = postfix.wait_for_delivery("\u00fc@b\u00fccher.example")
    assert record["status"] == "sent"


def test_pipelined_client_gets_replies_in_order(gateway, postfix) -> None:
    sock = gateway.raw()
    with sock:
        sock.sendall(b"XCLIENT ADDR=" + OUTSIDE_IP.encode() + b" NAME=[UNAVAILABLE]\r\n")
        assert recv_reply(sock).startswith(b"220 ")
        sock.sendall(b"EHLO client.example.net\r\n")
        assert b"250-PIPELINING" in recv_reply(sock)
        sock.sendall(
            b"MAIL FROM:<bob@example.org>\r\nRCPT TO:<nobody@example.com>\r\n"
            b"RCPT TO:<alice@example.com>\r\nDATA\r\n"
        )
        replies = b""
        while replies.count(b"\r\n") < 4:
            replies += sock.recv(4096)
        lines = replies.split(b"\r\n")
        assert lines[0].startswith(b"250 2.1.0")
        assert lines[1].startswith(b"550 5.1.1 <nobody@example.com>")
        assert lines[2].startswith(b"250 2.1.5")
        assert lines[3].startswith(b"354 ")
        sock.sendall(MESSAGE + b".\r\nQUIT\r\n")
        tail = b""
        while b"221" not in tail:
            chunk = sock.recv(4096)
            if not chunk:
                break
            tail += chunk
        assert QUEUED.match(tail), tail
    postfix.wait_for_messages("alice")
