"""Protocol hygiene through a real socket: exact codes for misuse."""

import smtplib
import socket
from collections.abc import Iterator

import pytest

from tests.fixtures.gateway import OUTSIDE_IP, TRUSTED_IP, recv_reply
from tests.fixtures.postfix import PostfixInstance


def say(sock, line: bytes) -> bytes:
    sock.sendall(line + b"\r\n")
    return recv_reply(sock)


@pytest.fixture
def sock(gateway):
    s = gateway.raw()
    yield s
    s.close()


def test_banner_and_ehlo_name_the_policy_hostname(gateway) -> None:
    smtp = smtplib.SMTP("127.0.0.1", gateway.port, timeout=10)
    try:
        code, text = smtp.ehlo("client.example.net")
        assert code == 250
        lines = text.decode().split("\n")
        assert lines[0] == "gw.test.example"
        for ext in ("PIPELINING", "SIZE 10240000", "ENHANCEDSTATUSCODES", "8BITMIME", "DSN", "SMTPUTF8"):
            assert ext in lines
        assert not any(line.startswith(("STARTTLS", "AUTH", "CHUNKING")) for line in lines)
    finally:
        smtp.close()


def test_greeting(gateway) -> None:
    s = gateway.raw()
    s.close()


@pytest.mark.parametrize(
    "line,reply",
    [
        (b"MAIL FROM:<a@example.org>", b"503 5.5.1 Error: send HELO/EHLO first\r\n"),
        (b"RCPT TO:<alice@example.com>", b"503 5.5.1 Error: need MAIL command\r\n"),
        (b"DATA", b"503 5.5.1 Error: need MAIL command\r\n"),
        (b"FOO bar", b"500 5.5.2 Error: command not recognized\r\n"),
        # Not offered (yet): must not reach aiosmtpd's own implementations.
        (b"STARTTLS", b"500 5.5.2 Error: command not recognized\r\n"),
        (b"AUTH PLAIN AGFsaWNlAHNlY3JldA==", b"500 5.5.2 Error: command not recognized\r\n"),
        (b"BDAT 10 LAST", b"500 5.5.2 Error: command not recognized\r\n"),
        # Letters whose upper case is ASCII (dotless i, long s) make no verb.
        ("QU\u0131T".encode(), b"500 5.5.2 Error: command not recognized\r\n"),
        ("R\u017fET".encode(), b"500 5.5.2 Error: command not recognized\r\n"),
        # Control bytes inside a command never reach the next hop or the log.
        (b"MAIL FROM:<a\x00@example.org>", b"500 5.5.2 Error: bad syntax\r\n"),
        (b"HELO a\rb.example", b"500 5.5.2 Error: bad syntax\r\n"),
        (b"RSET now", b"501 5.5.4 Syntax: RSET\r\n"),
        (b"QUIT now", b"501 5.5.4 Syntax: QUIT\r\n"),
        (b"", b"500 5.5.2 Error: bad syntax\r\n"),
        (b"HELO", b"501 5.5.4 Syntax: HELO hostname\r\n"),
        (b"EHLO", b"501 5.5.4 Syntax: EHLO hostname\r\n"),
        (b"NOOP", b"250 2.0.0 Ok\r\n"),
        (b"RSET", b"250 2.0.0 Ok\r\n"),
        (b"X" * 3000, b"500 5.5.2 Error: line too long\r\n"),
        (b"X" * 100_000, b"500 5.5.2 Error: line too long\r\n"),
    ],
)
def test_misuse_gets_exact_replies(sock, line: bytes, reply: bytes) -> None:
    assert say(sock, line) == reply
    assert say(sock, b"NOOP") == b"250 2.0.0 Ok\r\n"  # the session goes on


def test_transaction_order(sock) -> None:
    assert say(sock, b"EHLO client.example.net").startswith(b"250-gw.test.example")
    assert say(sock, b"DATA") == b"503 5.5.1 Error: need MAIL command\r\n"
    assert say(sock, b"MAIL FROM:<bob@example.org>") == b"250 2.1.0 Ok\r\n"
    assert say(sock, b"MAIL FROM:<bob@example.org>") == b"503 5.5.1 Error: nested MAIL command\r\n"
    assert say(sock, b"DATA") == b"554 5.5.1 Error: no valid recipients\r\n"
    assert say(sock, b"RCPT TO:<nobody@example.com>").startswith(b"550 5.1.1 ")
    assert say(sock, b"DATA") == b"554 5.5.1 Error: no valid recipients\r\n"
    assert say(sock, b"QUIT") == b"221 2.0.0 Bye\r\n"


@pytest.mark.parametrize(
    "line,reply",
    [
        (b"MAIL FROM:<a b@example.org>", b"501 5.1.7 Bad sender address syntax\r\n"),
        (b"MAIL TO:<a@example.org>", b"501 5.5.4 Syntax: MAIL FROM:<address>\r\n"),
        (b"MAIL", b"501 5.5.4 Syntax: MAIL FROM:<address>\r\n"),
        (b"MAIL FROM:<a@example.org> FOO=bar", b"555 5.5.4 Unsupported option: FOO=bar\r\n"),
        (b"MAIL FROM:<a@example.org> SIZE=big", b"501 5.5.4 Bad message size syntax\r\n"),
        (b"MAIL FROM:<a@example.org> BODY=BINARYMIME", b"555 5.5.4 Unsupported option: BODY=BINARYMIME\r\n"),
        # A parameter with no value, or no keyword, is no bad address.
        (b"MAIL FROM:<a@example.org> SIZE=", b"501 5.5.4 Bad message size syntax\r\n"),
        (b"MAIL FROM:<a@example.org> =x", b"555 5.5.4 Unsupported option: =x\r\n"),
        (b"MAIL FROM:<a@example.org> SIZE=99999999999", b"552 5.3.4 Message size exceeds fixed limit\r\n"),
        # A digit to str.isdigit() but not to SMTP: a syntax error, not a 451.
        ("MAIL FROM:<a@example.org> SIZE=\u00b2".encode(), b"501 5.5.4 Bad message size syntax\r\n"),
        # RFC 6531: UTF-8 only in a transaction that says SMTPUTF8.
        ("MAIL FROM:<smtputf8@ex\u00e4mple.org>".encode(), b"553 5.6.7 Must declare SMTPUTF8 to send unicode address\r\n"),
        # ENVID is printable ASCII whatever else is declared (Postfix's words).
        ("MAIL FROM:<a@example.org> ENVID=\u00e4".encode(), b"501 5.5.4 Bad ENVID parameter syntax\r\n"),
    ],
)
def test_mail_syntax(sock, line: bytes, reply: bytes) -> None:
    say(sock, b"EHLO client.example.net")
    assert say(sock, line) == reply
    assert say(sock, b"NOOP") == b"250 2.0.0 Ok\r\n"  # the session goes on


def test_rcpt_syntax(sock) -> None:
    say(sock, b"EHLO client.example.net")
    say(sock, b"MAIL FROM:<bob@example.org>")
    assert say(sock, b"RCPT TO:<>") == b"501 5.1.3 Bad recipient address syntax\r\n"
    assert say(sock, b"RCPT TO:<a@b@example.com>") == b"501 5.1.3 Bad recipient address syntax\r\n"
    assert say(sock, b"RCPT TO:<alice@example.com> FOO") == b"555 5.5.4 Unsupported option: FOO\r\n"
    assert say(sock, b"RCPT TO:<alice@example.com> NOTIFY=") == b"501 5.5.4 Error: Bad NOTIFY parameter syntax\r\n"
    assert say(sock, b"RCPT FROM:<alice@example.com>") == b"501 5.5.4 Syntax: RCPT TO:<address>\r\n"
    assert say(sock, "RCPT TO:<\u00fc@example.com>".encode()) == (
        b"553 5.6.7 Must declare SMTPUTF8 to send unicode address\r\n")


def test_helo_client_may_not_use_esmtp_parameters(sock) -> None:
    assert say(sock, b"HELO client.example.net") == b"250 gw.test.example\r\n"
    assert say(sock, b"MAIL FROM:<a@example.org> SIZE=10") == b"555 5.5.4 Unsupported option: SIZE=10\r\n"


def test_help_and_quit(sock) -> None:
    assert say(sock, b"HELP").startswith(b"214 2.0.0 ")
    assert say(sock, b"QUIT") == b"221 2.0.0 Bye\r\n"
    assert sock.recv(10) == b""


TOO_MANY = b"421 4.7.0 gw.test.example Error: too many errors\r\n"


def until_closed(sock) -> bytes:
    """Everything the gateway still says, up to its close."""
    said = b""
    while chunk := sock.recv(4096):
        said += chunk
    return said


def test_too_many_errors_close_the_session(start_gateway, postfix) -> None:
    gw = start_gateway(f"127.0.0.1:{postfix.port}", max_errors=3)
    s = gw.raw()
    with s:
        assert say(s, b"BAD1") == b"500 5.5.2 Error: command not recognized\r\n"
        assert say(s, b"BAD2") == b"500 5.5.2 Error: command not recognized\r\n"
        # As Postfix: the third error is answered, then the session ends
        # before another command is read.
        s.sendall(b"BAD3\r\n")
        assert until_closed(s) == b"500 5.5.2 Error: command not recognized\r\n" + TOO_MANY


def test_refusals_count_as_errors_until_a_delivery(start_gateway, postfix) -> None:
    # A client trying relay tricks (or guessing mailboxes) one RCPT after
    # another is cut off as Postfix would cut it off; one that delivers
    # is forgiven its earlier mistakes.
    gw = start_gateway(f"127.0.0.1:{postfix.port}", max_errors=3)
    with gw.raw() as s:
        say(s, b"XCLIENT ADDR=" + OUTSIDE_IP.encode())
        assert say(s, b"EHLO client.example.net").startswith(b"250-")
        assert say(s, b"MAIL FROM:<bob@example.org>").startswith(b"250 ")
        assert say(s, b"RCPT TO:<a@remote.example>") == b"554 5.7.1 <a@remote.example>: Relay access denied\r\n"
        assert say(s, b"RCPT TO:<nosuchuser@example.com>").startswith(b"550 5.1.1 ")  # Postfix's refusal counts too
        assert say(s, b"RCPT TO:<alice@example.com>").startswith(b"250 ")
        assert say(s, b"DATA").startswith(b"354 ")
        assert say(s, b"Subject: forgiven\r\n\r\nhello\r\n.").startswith(b"250 ")
        assert say(s, b"MAIL FROM:<bob@example.org>").startswith(b"250 ")
        for mailbox in (b"b@remote.example", b"c@remote.example"):
            assert say(s, b"RCPT TO:<" + mailbox + b">").startswith(b"554 5.7.1 ")
        s.sendall(b"RCPT TO:<d@remote.example>\r\nRCPT TO:<alice@example.com>\r\n")  # pipelined
        assert until_closed(s) == b"554 5.7.1 <d@remote.example>: Relay access denied\r\n" + TOO_MANY
    (delivered,) = postfix.wait_for_messages("alice")
    assert b"Subject: forgiven\n" in delivered


def test_junk_commands_count_as_errors_past_their_limit(start_gateway, postfix) -> None:
    gw = start_gateway(f"127.0.0.1:{postfix.port}", max_errors=3, max_junk_commands=2)
    with gw.raw() as s:
        for verb in (b"NOOP", b"RSET", b"HELP", b"NOOP"):  # the last two are errors 1 and 2
            assert say(s, verb)[:1] == b"2"
        s.sendall(b"NOOP\r\n")
        assert until_closed(s) == b"250 2.0.0 Ok\r\n" + TOO_MANY


def test_xclient_only_from_authorised_hosts(start_gateway, postfix) -> None:
    gw = start_gateway(f"127.0.0.1:{postfix.port}", xclient_hosts=[])
    s = gw.raw()
    with s:
        ehlo = say(s, b"EHLO client.example.net")
        assert b"XCLIENT" not in ehlo
        assert say(s, b"XCLIENT ADDR=" + OUTSIDE_IP.encode()) == b"550 5.7.0 Error: insufficient authorization\r\n"


def test_xclient_syntax(sock) -> None:
    assert say(sock, b"XCLIENT ADDR=not-an-ip") == b"501 5.5.4 Bad XCLIENT attribute: ADDR=not-an-ip\r\n"
    assert say(sock, b"XCLIENT FOO=bar") == b"501 5.5.4 Bad XCLIENT attribute: FOO=bar\r\n"
    # We take no word for who authenticated: LOGIN is refused, not ignored.
    assert say(sock, b"XCLIENT LOGIN=alice") == b"501 5.5.4 Bad XCLIENT attribute: LOGIN=alice\r\n"
    # xtext encodes any byte: a line break must not reach a log line or a plugin.
    assert say(sock, b"XCLIENT HELO=mx+0D+0Aforged") == b"501 5.5.4 Bad XCLIENT attribute: HELO=mx+0D+0Aforged\r\n"
    # Its octets are UTF-8: U+0085 (NEXT LINE) is a control too, and 0xFF no text.
    for bad in (b"HELO=mx+C2+85forged", b"HELO=mx+FF"):
        assert say(sock, b"XCLIENT " + bad) == b"501 5.5.4 Bad XCLIENT attribute: " + bad + b"\r\n"
    for unknown in (b"[UNAVAILABLE]", b"[TEMPUNAVAIL]"):
        assert say(sock, b"XCLIENT ADDR=" + unknown + b" NAME=[UNAVAILABLE]") == (
            b"501 5.5.4 Bad XCLIENT attribute: ADDR=" + unknown + b": the client's address is required\r\n"
        )
    assert say(sock, b"XCLIENT ADDR=IPV6:2001:db8::1 NAME=mail.example.net HELO=mx.example.net").startswith(b"220 ")
    assert say(sock, b"MAIL FROM:<a@example.org>") == b"503 5.5.1 Error: send HELO/EHLO first\r\n"


@pytest.fixture(scope="module")
def postfix_dual_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostfixInstance]:
    """A Postfix that takes IPv6 clients too, as one behind a dual-stack
    gateway must (the shared one is IPv4 only)."""
    with PostfixInstance(tmp_path_factory.mktemp("postfix-dual"), extra_main_cf={"inet_protocols": "all"}) as pf:
        yield pf


def _xclient_code(port: int, attribute: str) -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        recv_reply(s)
        assert say(s, b"EHLO gw.test.example")[:4] == b"250-"
        return int(say(s, b"XCLIENT " + attribute.encode())[:3])


@pytest.mark.parametrize("attribute", [
    "DESTADDR=192.0.2.1", "DESTADDR=IPV6:2001:db8::25", "DESTADDR=ipv6:2001:db8::25", "DESTADDR=[UNAVAILABLE]",
    "DESTADDR=[unavailable]", "DESTADDR=bogus", "DESTADDR=192.0.2", "DESTADDR=192.0.2.256", "DESTADDR=IPV6:192.0.2.1",
    "DESTADDR=IPV6:[2001:db8::25]", "DESTADDR=IPV6:fe80::1%eth0", "DESTADDR=[TEMPUNAVAIL]",
    "DESTPORT=25", "DESTPORT=00025", "DESTPORT=65535", "DESTPORT=[UNAVAILABLE]", "DESTPORT=x", "DESTPORT=-1",
    "DESTPORT=+25", "DESTPORT=000025", "DESTPORT=123456", "DESTPORT=[TEMPUNAVAIL]",
    "PORT=00025", "PORT=000025",
    # XCLIENT_README: an IPv6 address is prefixed with IPV6:, and only it.
    "ADDR=192.0.2.9", "ADDR=IPV6:2001:db8::9", "ADDR=ipv6:2001:db8::9", "ADDR=IPV6:::ffff:192.0.2.9",
    "ADDR=2001:db8::9", "ADDR=::ffff:192.0.2.9", "ADDR=IPV6:192.0.2.9", "ADDR=IPV6:fe80::1%eth0",
])
def test_xclient_takes_what_postfix_takes(gateway, postfix_dual_stack, attribute: str) -> None:
    # Postfix's own XCLIENT is the reference for what a front proxy may say
    # (XCLIENT_README): 220 where it takes the value, 501 5.5.4 where not.
    expected = _xclient_code(postfix_dual_stack.port, attribute)
    assert expected in (220, 501)
    assert _xclient_code(gateway.port, attribute) == expected


def test_xclient_inside_a_transaction_is_refused(gateway, postfix) -> None:
    # Whom the open transaction was judged as stays whom it is delivered as:
    # XCLIENT may not swap the client between MAIL and DATA.
    s = gateway.raw()
    with s:
        assert say(s, b"XCLIENT ADDR=" + OUTSIDE_IP.encode())[:4] == b"220 "
        assert say(s, b"EHLO client.example.net")[:4] == b"250-"
        assert say(s, b"MAIL FROM:<bob@example.org>")[:4] == b"250 "
        assert say(s, b"XCLIENT ADDR=" + TRUSTED_IP.encode()) == b"503 5.5.1 Error: MAIL transaction in progress\r\n"
        assert say(s, b"RCPT TO:<friend@remote.example>") == (
            b"554 5.7.1 <friend@remote.example>: Relay access denied\r\n"
        )
    assert "friend@remote.example" not in postfix.maillog()


HELO_REFUSED = b"550 5.7.1 <[127.0.0.1]>: Helo command rejected: You are not localhost\r\n"


def test_a_refused_helo_leaves_the_transaction_as_it_was(start_gateway, postfix) -> None:
    # RFC 5321 §4.1.4: only an acceptable EHLO resets the state (Postfix's
    # refused HELO returns before its mail_reset()).  What the refusal does
    # hold: no new transaction without an acceptable greeting, and no other
    # name is acceptable any more (the helo plugin's rule).
    gw = start_gateway(f"127.0.0.1:{postfix.port}", plugins={"helo": {}})
    with gw.raw() as s:
        assert say(s, b"XCLIENT ADDR=" + OUTSIDE_IP.encode())[:4] == b"220 "
        assert say(s, b"EHLO good.example.net")[:4] == b"250-"
        assert say(s, b"MAIL FROM:<bob@example.org>") == b"250 2.1.0 Ok\r\n"
        assert say(s, b"RCPT TO:<alice@example.com>") == b"250 2.1.5 Ok\r\n"
        assert say(s, b"EHLO [127.0.0.1]") == HELO_REFUSED
        assert say(s, b"RCPT TO:<carol@example.com>") == b"250 2.1.5 Ok\r\n"
        assert say(s, b"DATA")[:4] == b"354 "
        assert say(s, b"Subject: still here\r\n\r\nbody\r\n.").startswith(b"250 2.0.0 Ok: ")
        assert say(s, b"EHLO good.example.net") == HELO_REFUSED
        assert say(s, b"MAIL FROM:<bob@example.org>") == b"503 5.5.1 Error: send HELO/EHLO first\r\n"
    assert len(postfix.wait_for_messages("alice")) == len(postfix.wait_for_messages("carol")) == 1


def _replies_sent(monkeypatch) -> list[bytes]:
    """What the gateway (in this process) passes to send() from now on,
    its replies only: its commands to the next hop are left out."""
    sent: list[bytes] = []
    send = socket.socket.send

    def counting(sock: socket.socket, data: bytes, *flags: int) -> int:
        if bytes(data[:3]).isdigit():
            sent.append(bytes(data))
        return send(sock, data, *flags)

    monkeypatch.setattr(socket.socket, "send", counting)
    return sent


def test_the_replies_to_a_pipelined_group_go_out_together(gateway, postfix, monkeypatch) -> None:
    # RFC 2920 §3.1, as Postfix does it: while the next command is here
    # already, a reply waits for it; the group costs one send(), not one each.
    with gateway.raw() as s:
        assert say(s, b"XCLIENT ADDR=" + OUTSIDE_IP.encode())[:4] == b"220 "
        assert say(s, b"EHLO client.example.net")[:4] == b"250-"
        sent = _replies_sent(monkeypatch)
        s.sendall(b"MAIL FROM:<bob@example.org>\r\nRCPT TO:<alice@example.com>\r\n"
                  b"RCPT TO:<nobody@example.com>\r\nDATA\r\n")
        replies = [recv_reply(s) for _ in range(4)]
        assert replies[:2] == [b"250 2.1.0 Ok\r\n", b"250 2.1.5 Ok\r\n"]
        assert replies[2].startswith(b"550 5.1.1 <nobody@example.com>: ")
        assert replies[3] == b"354 End data with <CR><LF>.<CR><LF>\r\n"
        assert sent == [b"".join(replies)]
        s.sendall(b"Subject: pipelined\r\n\r\nbody\r\n.\r\nQUIT\r\n")
        assert recv_reply(s).startswith(b"250 2.0.0 Ok: ")
        assert recv_reply(s) == b"221 2.0.0 Bye\r\n"
        assert len(sent) == 2
    postfix.wait_for_messages("alice")


def test_replies_held_for_a_pipelined_group_are_bounded(start_gateway, postfix, monkeypatch) -> None:
    gw = start_gateway(f"127.0.0.1:{postfix.port}", max_junk_commands=1000)
    with gw.raw() as s:
        sent = _replies_sent(monkeypatch)
        s.sendall(b"NOOP\r\n" * 500)
        assert [recv_reply(s) for _ in range(500)] == [b"250 2.0.0 Ok\r\n"] * 500
        # At most 4096 octets held, then sent with the reply that would overflow them.
        assert 2 <= len(sent) <= 4 and max(map(len, sent)) <= 4096 + len(b"250 2.0.0 Ok\r\n")


def test_a_354_is_not_held_back_by_message_text_sent_with_data(gateway, postfix) -> None:
    # DATA ends a group (RFC 2920 §3.1), but a client that sends the start
    # of its message with it, then waits for the 354, must still get it.
    with gateway.raw(timeout=3) as s:
        for line in (b"XCLIENT ADDR=" + OUTSIDE_IP.encode(), b"EHLO client.example.net",
                     b"MAIL FROM:<bob@example.org>", b"RCPT TO:<alice@example.com>"):
            assert say(s, line)[:1] == b"2"
        s.sendall(b"DATA\r\nSubject: early\r\n")
        assert recv_reply(s) == b"354 End data with <CR><LF>.<CR><LF>\r\n"
        assert say(s, b"\r\nbody\r\n.").startswith(b"250 2.0.0 Ok: ")
    postfix.wait_for_messages("alice")


def test_replies_held_when_the_session_ends_are_sent_first(gateway) -> None:
    # A QUIT in the middle of a group ends the session with replies held.
    with gateway.raw() as s:
        s.sendall(b"NOOP\r\nQUIT\r\nNOOP\r\n")
        assert [recv_reply(s), recv_reply(s)] == [b"250 2.0.0 Ok\r\n", b"221 2.0.0 Bye\r\n"]
        assert s.recv(100) == b""
