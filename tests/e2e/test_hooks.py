"""Every stage's hook, through the network: what a refusal looks like to
the client, and that the next hop never sees a refused command."""

import logging
import socket
import time

import pytest

from tests.fixtures.gateway import recv_reply
from tests.fixtures.testplugins import Blocker, Gatekeeper


@pytest.fixture
def gw(start_gateway, postfix):
    Gatekeeper.disconnects.clear()
    return start_gateway(f"127.0.0.1:{postfix.port}", plugins={"gate": {}}, extra={"gate": Gatekeeper})


def say(sock, line: bytes) -> bytes:
    sock.sendall(line + b"\r\n")
    return recv_reply(sock)


def test_connect_refusal_answers_every_command_but_quit(gw, postfix) -> None:
    sock = gw.raw()
    with sock:
        assert say(sock, b"XCLIENT ADDR=192.0.2.66") == b"554 5.7.1 Service unavailable; Client host [192.0.2.66] blocked\r\n"
        # RFC 5321 §3.1: 503 to everything but QUIT, in Postfix's words.
        denied = b"503 5.7.0 Error: access denied for unknown[192.0.2.66]\r\n"
        for line in (b"EHLO c.example.net", b"MAIL FROM:<a@example.org>", b"NOOP", b"RSET"):
            assert say(sock, line) == denied
        assert say(sock, b"QUIT") == b"221 2.0.0 Bye\r\n"
    assert postfix.clients() == []


@pytest.mark.parametrize("ip,reply,closes", [
    ("192.0.2.68", b"421 4.7.1 Client host [192.0.2.68] under review\r\n", True),
    ("192.0.2.69", b"554 5.7.1 Client host [192.0.2.69] refused\r\n", False),
])
def test_connect_refusal_takes_a_code_a_greeting_may_have(gw, ip, reply, closes) -> None:
    # RFC 5321 §4.3.2: only 220, 554, or 421 and a close, in place of the greeting.
    sock = gw.raw()
    with sock:
        assert say(sock, f"XCLIENT ADDR={ip}".encode()) == reply
        if closes:
            assert sock.recv(10) == b""
        else:
            assert say(sock, b"EHLO c.example.net").startswith(b"503 5.7.0 ")


def test_connect_defer_with_disconnect_closes(gw) -> None:
    sock = gw.raw()
    with sock:
        assert say(sock, b"XCLIENT ADDR=192.0.2.67") == b"421 4.7.0 Try again later\r\n"
        assert sock.recv(10) == b""


def test_helo_refusal_leaves_the_client_without_helo(gw) -> None:
    sock = gw.raw()
    with sock:
        assert say(sock, b"EHLO bad.example") == b"550 5.7.1 <bad.example>: Helo command rejected: go away\r\n"
        assert say(sock, b"MAIL FROM:<a@example.org>") == b"503 5.5.1 Error: send HELO/EHLO first\r\n"


def test_data_refusal_never_reaches_postfix_and_the_session_goes_on(gw, postfix) -> None:
    with gw.client(xclient="203.0.113.7") as smtp:
        smtp.mail("bob@example.org")
        smtp.rcpt("alice@example.com")
        assert smtp.data(b"Subject: v\r\n\r\nEICAR\r\n") == (554, b"5.7.0 Message content rejected")
        assert smtp.sendmail("bob@example.org", ["alice@example.com"], b"Subject: ok\r\n\r\nclean\r\n") == {}
    (delivered,) = postfix.wait_for_messages("alice")
    assert b"EICAR" not in delivered


def _assert_no_message_sent(postfix, ip: str) -> None:
    """Postfix's summary of the session from ``ip`` has no DATA or BDAT."""
    summary = postfix.wait_for_log(r"disconnect from unknown\[" + ip.replace(".", r"\.") + r"\].*")[0]
    assert " mail=1 " in summary and "data=" not in summary and "bdat=" not in summary, summary
    assert postfix.messages("alice") == []


def _transaction(gw, ip: str) -> socket.socket:
    """A raw connection from ``ip`` with a transaction open for alice."""
    sock = gw.raw()
    assert say(sock, f"XCLIENT ADDR={ip}".encode()).startswith(b"220 ")
    assert say(sock, b"EHLO c.example.net").startswith(b"250-")
    assert say(sock, b"MAIL FROM:<bob@example.org>") == b"250 2.1.0 Ok\r\n"
    assert say(sock, b"RCPT TO:<alice@example.com>") == b"250 2.1.5 Ok\r\n"
    return sock


@pytest.mark.parametrize("rcpt, reply", [
    ("hangup@example.com", b"550 5.7.1 Recipient refused; goodbye\r\n"),
    # A DEFER that closes says so with 421 (RFC 5321 §3.8).
    ("later@example.com", b"421 4.7.1 Recipient held; come back later\r\n"),
])
def test_a_refusal_with_disconnect_ends_the_session_at_rcpt(gw, postfix, rcpt, reply) -> None:
    with _transaction(gw, "203.0.113.9") as sock:
        assert say(sock, f"RCPT TO:<{rcpt}>".encode()) == reply
        sock.settimeout(5)
        assert sock.recv(100) == b""
    # Postfix saw the transaction abandoned: it was never sent the message.
    _assert_no_message_sent(postfix, "203.0.113.9")


def test_a_refusal_with_disconnect_ends_the_session_at_data(gw, postfix) -> None:
    with _transaction(gw, "203.0.113.10") as sock:
        assert say(sock, b"DATA").startswith(b"354 ")
        assert say(sock, b"Subject: x\r\n\r\nHANGUP\r\n.") == b"554 5.7.0 Message refused; goodbye\r\n"
        sock.settimeout(5)
        assert sock.recv(100) == b""
    _assert_no_message_sent(postfix, "203.0.113.10")


def test_a_refusal_with_disconnect_ends_the_session_at_vrfy(gw) -> None:
    sock = gw.raw()
    with sock:
        assert say(sock, b"EHLO c.example.net").startswith(b"250-")
        assert say(sock, b"VRFY hangup") == b"550 5.7.1 Not you again\r\n"
        sock.settimeout(5)
        assert sock.recv(100) == b""


def test_disconnect_hook_runs(gw) -> None:
    with gw.client(xclient="203.0.113.8"):
        pass
    deadline = time.monotonic() + 5
    while "203.0.113.8" not in Gatekeeper.disconnects and time.monotonic() < deadline:
        time.sleep(0.02)
    assert "203.0.113.8" in Gatekeeper.disconnects


def test_connect_refusal_replaces_the_greeting(start_gateway, postfix) -> None:
    gw = start_gateway(f"127.0.0.1:{postfix.port}", plugins={"gate": {}}, extra={"gate": Gatekeeper},
                       proxy_protocol=True)
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as sock:
        sock.sendall(b"PROXY TCP4 192.0.2.66 192.0.2.1 40000 25\r\n")
        assert recv_reply(sock) == b"554 5.7.1 Service unavailable; Client host [192.0.2.66] blocked\r\n"
        assert say(sock, b"EHLO c.example.net") == b"503 5.7.0 Error: access denied for unknown[192.0.2.66]\r\n"
        assert say(sock, b"QUIT") == b"221 2.0.0 Bye\r\n"
    assert "192.0.2.66" not in postfix.maillog()


def test_blocking_work_in_a_plugin_is_reported_and_the_mail_still_goes(start_gateway, postfix, caplog) -> None:
    # A short command timeout makes the gateway's watch tick often, so a
    # 1.4 s stall shows as the loop falling more than 1 s behind.
    gw = start_gateway(f"127.0.0.1:{postfix.port}", command_timeout=2.0,
                       plugins={"blocker": {}}, extra={"blocker": Blocker})
    with caplog.at_level(logging.WARNING, "smtpgate"), gw.client(xclient="203.0.113.7") as smtp:
        assert smtp.sendmail("bob@example.org", ["alice@example.com"], b"Subject: slow\r\n\r\nx\r\n") == {}
    postfix.wait_for_messages("alice", count=1)
    assert "plugin=blocker hook=mail held the event loop for 1." in caplog.text
    assert "the event loop was blocked for about 1." in caplog.text
