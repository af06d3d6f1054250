"""SMTP smuggling (SEC Consult, 2023): a second message hidden behind a
non-standard end-of-data must never reach the next hop as a message."""

import pytest

from tests.fixtures.gateway import OUTSIDE_IP, recv_reply
from tests.fixtures.postfix import QUEUED

SMUGGLED = (
    b"RCPT TO:<bob@example.com>\r\nDATA\r\nFrom: evil@example.org\r\nSubject: smuggled\r\n\r\nevil\r\n"
)

VARIANTS = {
    "lf-dot-lf": b"\n.\n",
    "cr-dot-cr": b"\r.\r",
    "lf-dot-crlf": b"\n.\r\n",
    "crlf-dot-lf": b"\r\n.\n",
    "cr-dot-crlf": b"\r.\r\n",
    "crlf-dot-cr": b"\r\n.\r",
}


def open_transaction(gateway):
    sock = gateway.raw()
    for line in (b"XCLIENT ADDR=" + OUTSIDE_IP.encode() + b" NAME=[UNAVAILABLE]", b"EHLO client.example.net",
                 b"MAIL FROM:<bob@example.org>", b"RCPT TO:<alice@example.com>", b"DATA"):
        sock.sendall(line + b"\r\n")
        reply = recv_reply(sock)
        assert reply[:1] in (b"2", b"3"), reply
    return sock


@pytest.mark.parametrize("ending", list(VARIANTS.values()), ids=list(VARIANTS))
def test_smuggled_message_is_rejected_and_nothing_arrives(gateway, postfix, ending: bytes) -> None:
    sock = open_transaction(gateway)
    with sock:
        sock.sendall(
            b"From: bob@example.org\r\nSubject: cover\r\n\r\ncover" + ending
            + b"MAIL FROM:<evil@example.org>\r\n" + SMUGGLED + b"\r\n.\r\n"
        )
        reply = recv_reply(sock)
        assert reply in (b"550 5.5.2 Error: bare <LF> received\r\n", b"550 5.5.2 Error: bare <CR> received\r\n")
        sock.sendall(b"QUIT\r\n")
        assert recv_reply(sock) == b"221 2.0.0 Bye\r\n"
    assert postfix.messages("alice") == []
    assert postfix.messages("bob") == []


@pytest.mark.parametrize("ending", list(VARIANTS.values()), ids=list(VARIANTS))
def test_normalize_mode_keeps_the_smuggled_text_inside_one_message(start_gateway, postfix, ending: bytes) -> None:
    gw = start_gateway(f"127.0.0.1:{postfix.port}", bare_newline="normalize")
    sock = open_transaction(gw)
    with sock:
        sock.sendall(b"Subject: cover\r\n\r\ncover" + ending + b"MAIL FROM:<evil@example.org>\r\n" + SMUGGLED + b"\r\n.\r\n")
        assert QUEUED.match(recv_reply(sock))
        sock.sendall(b"QUIT\r\n")
        recv_reply(sock)
    (delivered,) = postfix.wait_for_messages("alice")
    assert b"Subject: smuggled" in delivered  # as text inside the one message
    assert postfix.messages("bob") == []


def test_dot_stuffing_is_undone_and_redone(gateway, postfix) -> None:
    sock = open_transaction(gateway)
    with sock:
        sock.sendall(b"Subject: dots\r\n\r\n..\r\n...x\r\n.\r\n")
        assert recv_reply(sock).startswith(b"250 ")
    (delivered,) = postfix.wait_for_messages("alice")
    assert delivered.endswith(b"\n\n.\n..x\n")
