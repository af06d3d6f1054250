"""Promise 2 through the network: no open relay by any address trick, no
mailbox disclosure through VRFY/EXPN.  What Postfix received is checked
too, not only what the client heard."""

import pytest

from tests.fixtures.gateway import OUTSIDE_IP, TRUSTED_IP, TRUSTED_NET, recv_reply

TRICKS = [
    "user%remote.example@example.com",
    "remote.example!user@example.com",
    '"user@remote.example"@example.com',
    "@example.com:user@remote.example",
    "@remote.example:user@example.com",
    "user@[192.0.2.1]",
    "user@sub.example.com",
    "user@example.com.remote.example",
    "user@remote.example",
]


@pytest.mark.parametrize("rcpt", TRICKS)
def test_relay_tricks_are_denied_for_outside_clients(gateway, postfix, rcpt: str) -> None:
    sock = gateway.raw()
    with sock:
        for line in (b"XCLIENT ADDR=" + OUTSIDE_IP.encode(), b"EHLO c.example.net", b"MAIL FROM:<bob@example.org>"):
            sock.sendall(line + b"\r\n")
            assert recv_reply(sock)[:1] == b"2"
        sock.sendall(b"RCPT TO:<" + rcpt.encode() + b">\r\n")
        reply = recv_reply(sock)
    shown = rcpt.split(":", 1)[1] if rcpt.startswith("@") else rcpt
    assert reply == f"554 5.7.1 <{shown}>: Relay access denied\r\n".encode()
    assert postfix.clients() == []  # Postfix never saw a transaction


@pytest.mark.parametrize("rcpt", ["user@example.com.", "user@remote.example@example.com"])
def test_malformed_tricks_are_refused_as_syntax(gateway, rcpt: str) -> None:
    with gateway.client(xclient=OUTSIDE_IP) as smtp:
        smtp.mail("bob@example.org")
        assert smtp.rcpt(rcpt) == (501, b"5.1.3 Bad recipient address syntax")


@pytest.mark.parametrize("client", [OUTSIDE_IP, TRUSTED_IP])
def test_a_routed_postmaster_is_no_bare_postmaster(gateway, postfix, client: str) -> None:
    # Only the bare <Postmaster> may go without a domain (RFC 5321 §4.5.1);
    # with a route in front it is no address at all, not even for a client
    # that may relay: the route would send it to whatever host it names.
    with gateway.client(xclient=client) as smtp:
        smtp.mail("bob@example.org")
        assert smtp.docmd("RCPT TO:<@remote.example:Postmaster>") == (501, b"5.1.3 Bad recipient address syntax")
    assert "remote.example" not in postfix.maillog()


def test_local_mail_is_accepted_from_anyone(gateway, postfix) -> None:
    with gateway.client(xclient=OUTSIDE_IP) as smtp:
        assert smtp.sendmail("bob@example.org", ["ALICE@EXAMPLE.COM", "Postmaster"], b"Subject: hi\r\n\r\nx\r\n") == {}
    postfix.wait_for_messages("alice")
    # The bare <Postmaster> reached Postfix as such (it qualifies it with its
    # own myorigin, which this test instance discards).
    postfix.wait_for_log(r"orig_to=<Postmaster>.*status=sent")


def test_trusted_clients_may_relay(gateway, postfix) -> None:
    with gateway.client(xclient=TRUSTED_IP) as smtp:
        assert smtp.sendmail("alice@example.com", ["friend@remote.example"], b"Subject: out\r\n\r\nx\r\n") == {}
    assert postfix.wait_for_delivery("friend@remote.example")["status"] == "sent"


def test_xclient_from_a_trusted_proxy_does_not_lend_it_its_trust(start_gateway, postfix) -> None:
    # The proxy itself may relay (it is in trusted_networks); the client it
    # names may not: XCLIENT narrows trust as well as widening it, or every
    # client behind a trusted front proxy would find an open relay.
    gw = start_gateway(f"127.0.0.1:{postfix.port}", trusted_networks=["127.0.0.0/8", TRUSTED_NET])
    sock = gw.raw()
    with sock:
        for line in (b"XCLIENT ADDR=" + OUTSIDE_IP.encode(), b"EHLO c.example.net", b"MAIL FROM:<bob@example.org>"):
            sock.sendall(line + b"\r\n")
            assert recv_reply(sock)[:1] == b"2"
        sock.sendall(b"RCPT TO:<friend@remote.example>\r\n")
        assert recv_reply(sock) == b"554 5.7.1 <friend@remote.example>: Relay access denied\r\n"
    assert "friend@remote.example" not in postfix.maillog()


def test_vrfy_and_expn_are_disabled_and_never_reach_postfix(gateway, postfix) -> None:
    with gateway.client(xclient=OUTSIDE_IP) as smtp:
        assert smtp.verify("alice@example.com") == (502, b"5.5.1 VRFY command is disabled")
        assert smtp.expn("staff") == (502, b"5.5.1 EXPN command is disabled")
        assert smtp.docmd("VRFY") == (501, b"5.5.4 Syntax: VRFY address")
    assert "VRFY" not in postfix.maillog() and "EXPN" not in postfix.maillog()


def test_vrfy_cannot_verify_reveals_nothing(start_gateway, postfix) -> None:
    gw = start_gateway(f"127.0.0.1:{postfix.port}", plugins={"commands": {"vrfy": "cannot-verify"}})
    with gw.client(xclient=OUTSIDE_IP) as smtp:
        known = smtp.verify("alice@example.com")
        unknown = smtp.verify("nobody@example.com")
    assert known == unknown == (252, b"2.5.2 Cannot VRFY user, but will accept message and attempt delivery")


def test_vrfy_that_answers_252_still_counts_as_junk(start_gateway, postfix) -> None:
    # A 252 is no error, so only the junk limit stops a harvester that asks
    # forever: past it each VRFY is an error, and max_errors ends the session.
    gw = start_gateway(f"127.0.0.1:{postfix.port}", plugins={"commands": {"vrfy": "cannot-verify"}},
                       max_errors=2, max_junk_commands=1)
    sock = gw.raw()
    with sock:
        for _ in range(2):  # the junk allowance, then error 1
            sock.sendall(b"VRFY alice@example.com\r\n")
            assert recv_reply(sock).startswith(b"252 2.5.2 ")
        sock.sendall(b"VRFY alice@example.com\r\n")  # error 2: the limit
        said = b""
        while chunk := sock.recv(4096):  # the 421 follows unasked, and the close
            said += chunk
        assert said == (b"252 2.5.2 Cannot VRFY user, but will accept message and attempt delivery\r\n"
                        b"421 4.7.0 gw.test.example Error: too many errors\r\n")
    assert "VRFY" not in postfix.maillog()
