"""Promise 1: nothing is lost.  Every fault gives the client a 4yz so it
retries; never a 250 for mail that went nowhere."""

import logging
import socket
import struct
import time

import pytest

from tests.fixtures.badmta import BadMTA
from tests.fixtures.gateway import OUTSIDE_IP, recv_reply
from tests.fixtures.postfix import free_port
from tests.fixtures.testplugins import BOOM_IP, Boom, Latch, Stall

MSG = b"Subject: x\r\n\r\nbody\r\n"


def test_upstream_down_gives_421_at_mail(start_gateway) -> None:
    gw = start_gateway(f"127.0.0.1:{free_port()}")
    with gw.client(xclient=OUTSIDE_IP) as smtp:
        assert not smtp.has_extn("dsn")  # nothing the next hop could not honour
        code, text = smtp.mail("bob@example.org")
    assert (code, text) == (421, b"4.4.1 gw.test.example Error: next hop unavailable, try again later")


@pytest.mark.parametrize("mode, logged", [
    ("silent-greeting", "no greeting within 1s"),
    ("refusing-greeting", "greeted with 554 5.3.2 bad.example not accepting mail"),
    # Only a 220 opens a session: a 421 greeting followed by 250s is no MTA to trust.
    ("busy-greeting", "greeted with 421 4.3.2 bad.example busy, try again later"),
])
def test_next_hop_that_does_not_greet_gives_421(start_gateway, caplog, mode: str, logged: str) -> None:
    with BadMTA(mode) as mta:
        gw = start_gateway(f"127.0.0.1:{mta.port}", upstream_connect_timeout=1.0)
        with caplog.at_level(logging.WARNING, "smtpgate"), gw.client(xclient=OUTSIDE_IP) as smtp:
            started = time.monotonic()
            code, text = smtp.mail("bob@example.org")
            waited = time.monotonic() - started
    assert (code, text) == (421, b"4.4.1 gw.test.example Error: next hop unavailable, try again later")
    assert waited < 5.0  # the limit (1 s), not the default (10 s)
    assert f"next hop unavailable: connect to 127.0.0.1:{mta.port}: {logged}" in caplog.text


@pytest.mark.parametrize("mode", ["drop-at-data-end", "silent-at-data-end"])
def test_upstream_failing_during_data_gives_451(start_gateway, mode: str) -> None:
    with BadMTA(mode) as mta:
        gw = start_gateway(f"127.0.0.1:{mta.port}", upstream_timeout=1.0, upstream_data_timeout=1.0)
        with gw.client(xclient=OUTSIDE_IP) as smtp:
            assert smtp.mail("bob@example.org")[0] == 250
            assert smtp.rcpt("alice@example.com")[0] == 250
            started = time.monotonic()
            assert smtp.data(MSG) == (451, b"4.4.1 Error: next hop failed during the transaction, try again later")
            assert time.monotonic() - started < 5.0  # the limit (1 s), not the default (600 s)
        assert len(mta.received) == 1


def test_the_reply_to_a_message_may_take_longer_than_a_command(start_gateway) -> None:
    # A content filter behind the MTA: the final reply comes after 1.5 s,
    # past upstream_timeout but within upstream_data_timeout.
    with BadMTA("slow-at-data-end", delay=1.5) as mta:
        gw = start_gateway(f"127.0.0.1:{mta.port}", upstream_timeout=1.0, upstream_data_timeout=5.0)
        with gw.client(xclient=OUTSIDE_IP) as smtp:
            assert smtp.sendmail("bob@example.org", ["alice@example.com"], MSG) == {}
        assert len(mta.received) == 1


@pytest.mark.parametrize("mode,stage,final", [
    ("250-to-data", "data", b""),          # a 250 to DATA is no 250 for the message
    ("garbage-at-data-end", "data", b"2500 queued\r\n"),  # "2500 queued" is no 250
    # A reply's code is every line's: aiosmtplib reads the last line's.
    ("garbage-at-data-end", "data", b"554-5.7.1 refused\r\n250 2.0.0 Ok\r\n"),
    ("garbage-at-data-end", "data", b"250-2.0.0 hmm\r\n2500 queued\r\n"),
    # RFC 5321 §4.3.2: a message is taken with 250; other 2yz/3yz say nothing.
    ("garbage-at-data-end", "data", b"221 2.0.0 Bye\r\n"),
    ("garbage-at-data-end", "data", b"354 more please\r\n"),
    ("double-at-rcpt", "rcpt", b""),       # two replies to one RCPT: out of step
])
def test_a_next_hop_out_of_step_is_never_taken_for_delivery(start_gateway, mode: str, stage: str, final: bytes) -> None:
    with BadMTA(mode, final=final) as mta:
        gw = start_gateway(f"127.0.0.1:{mta.port}")
        with gw.client(xclient=OUTSIDE_IP) as smtp:
            assert smtp.mail("bob@example.org")[0] == 250
            code, text = smtp.rcpt("alice@example.com")
            if stage == "rcpt":
                assert (code, text) == (421, b"4.4.1 gw.test.example Error: next hop unavailable, try again later")
                return
            assert code == 250
            assert smtp.data(MSG) == (451, b"4.4.1 Error: next hop failed during the transaction, try again later")


@pytest.mark.parametrize("stage", ["mail", "rcpt"])
@pytest.mark.parametrize("odd", [b"221 2.0.0 Bye\r\n", b"354 go ahead\r\n", b"252 2.1.5 maybe\r\n"])
def test_a_sender_or_recipient_is_taken_only_with_250_or_251(start_gateway, stage: str, odd: bytes) -> None:
    # RFC 5321 §4.3.2: any other 2yz or 3yz says nothing of the address and
    # leaves the dialogue in doubt.  The client, which pipelined the rest of
    # its transaction, must hear a 4yz and never reach DATA.
    with BadMTA(f"odd-at-{stage}", final=odd) as mta:
        gw = start_gateway(f"127.0.0.1:{mta.port}")
        with gw.raw() as sock:
            for line in (f"XCLIENT ADDR={OUTSIDE_IP}", "EHLO c.example.net"):
                sock.sendall(line.encode() + b"\r\n")
                assert recv_reply(sock)[:1] == b"2"
            sock.sendall(b"MAIL FROM:<bob@example.org>\r\nRCPT TO:<alice@example.com>\r\nDATA\r\n")
            if stage == "rcpt":
                assert recv_reply(sock) == b"250 ok\r\n"
            assert recv_reply(sock) == b"421 4.4.1 gw.test.example Error: next hop unavailable, try again later\r\n"
            assert sock.recv(100) == b""  # closed: nothing pipelined goes on
        assert not [c for c in mta.commands if c[:4].upper() in (b"DATA", b"BDAT")]
        assert mta.received == []


def test_a_refused_bdat_ends_that_connection(start_gateway) -> None:
    # RFC 3030 says a server reads a chunk it refuses; one that does not
    # would take the chunk's lines for commands.  What was sent is sent, but
    # nothing more goes on that connection: the next transaction gets a new one.
    body = b"Subject: x\r\n\r\nRSET\r\n"
    with BadMTA("bdat-refused") as mta:
        gw = start_gateway(f"127.0.0.1:{mta.port}")
        with gw.client(xclient=OUTSIDE_IP) as smtp:
            assert smtp.mail("bob@example.org")[0] == 250
            assert smtp.rcpt("alice@example.com")[0] == 250
            assert smtp.data(body) == (502, b"5.5.1 BDAT not today")
            assert smtp.mail("bob@example.org")[0] == 250  # on a new connection
        deadline = time.monotonic() + 3
        while mta.sessions < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert mta.sessions == 2


def test_a_421_from_the_next_hop_ends_the_session(start_gateway) -> None:
    with BadMTA("421-at-mail") as mta:
        gw = start_gateway(f"127.0.0.1:{mta.port}")
        sock = gw.raw()
        with sock:
            sock.sendall(b"EHLO c.example.net\r\n")
            recv_reply(sock)
            sock.sendall(b"MAIL FROM:<bob@example.org>\r\nRCPT TO:<alice@example.com>\r\nDATA\r\n")
            assert recv_reply(sock) == b"421 4.3.0 bad.example shutting down\r\n"
            assert sock.recv(100) == b""  # closed: no 503s for the pipelined commands


def test_upstream_silent_at_rcpt_gives_421_after_upstream_timeout(start_gateway) -> None:
    with BadMTA("silent-at-rcpt") as mta:
        gw = start_gateway(f"127.0.0.1:{mta.port}", upstream_timeout=1.0)
        with gw.client(xclient=OUTSIDE_IP) as smtp:
            assert smtp.mail("bob@example.org")[0] == 250
            started = time.monotonic()
            code, text = smtp.rcpt("alice@example.com")
            waited = time.monotonic() - started
    assert (code, text) == (421, b"4.4.1 gw.test.example Error: next hop unavailable, try again later")
    # The limit (the default is minutes); the bound leaves room for a loaded machine.
    assert 1.0 <= waited < 5.0


def test_client_disconnecting_mid_data_delivers_nothing(gateway, postfix) -> None:
    sock = gateway.raw()
    for line in (b"XCLIENT ADDR=" + OUTSIDE_IP.encode(), b"EHLO c.example.net", b"MAIL FROM:<bob@example.org>",
                 b"RCPT TO:<alice@example.com>", b"DATA"):
        sock.sendall(line + b"\r\n")
        assert recv_reply(sock)[:1] in (b"2", b"3")
    sock.sendall(b"Subject: half\r\n\r\nthe first half of a message\r\n")
    sock.close()
    # Postfix logs the aborted session once the gateway drops the upstream.
    postfix.wait_for_log(r"disconnect from unknown\[" + OUTSIDE_IP.replace(".", r"\.") + r"\]")
    assert postfix.messages("alice") == []
    assert postfix.deliveries() == []


def test_client_vanishing_while_its_message_is_judged_delivers_nothing(start_gateway, postfix) -> None:
    # The whole message is in, its checks are under way, and the client's
    # connection is reset: it never hears a 250, so it will send the message
    # again; the gateway must drop this copy, not pass it on as well.
    Latch.reset()
    gw = start_gateway(f"127.0.0.1:{postfix.port}", plugins={"latch": {}}, extra={"latch": Latch})
    sock = gw.raw()
    try:
        for line in (b"XCLIENT ADDR=" + OUTSIDE_IP.encode(), b"EHLO c.example.net", b"MAIL FROM:<bob@example.org>",
                     b"RCPT TO:<alice@example.com>", b"DATA"):
            sock.sendall(line + b"\r\n")
            assert recv_reply(sock)[:1] in (b"2", b"3")
        sock.sendall(b"Subject: judged\r\n\r\nwhole\r\n.\r\n")
        assert Latch.entered.wait(10)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close with a reset
    finally:
        sock.close()
    try:
        assert Latch.abandoned.wait(10), "the check went on for a client that was gone"
    finally:
        Latch.gate.set()
    postfix.wait_for_log(r"disconnect from unknown\[" + OUTSIDE_IP.replace(".", r"\.") + r"\]")
    assert postfix.messages("alice") == []
    assert postfix.deliveries() == []


def test_a_mail_the_next_hop_refuses_opens_no_transaction(start_gateway) -> None:
    # The next hop's refusal of the sender is the client's answer, and the
    # client has no transaction: its RCPT and DATA meet our 503, never a
    # next hop that (wrongly) answers them as if the MAIL had been taken.
    with BadMTA("refused-mail") as mta:
        gw = start_gateway(f"127.0.0.1:{mta.port}")
        with gw.client(xclient=OUTSIDE_IP) as smtp:
            assert smtp.mail("bob@example.org") == (550, b"5.7.1 <bob@example.org>: Sender address rejected: go away")
            assert smtp.rcpt("alice@example.com") == (503, b"5.5.1 Error: need MAIL command")
            assert smtp.docmd("DATA") == (503, b"5.5.1 Error: need MAIL command")
        assert [c for c in mta.commands if c[:4].upper() in (b"RCPT", b"DATA")] == []


def test_plugin_that_raises_gives_451_and_the_gateway_goes_on(start_gateway, postfix, caplog) -> None:
    gw = start_gateway(f"127.0.0.1:{postfix.port}", plugins={"boom": {}}, extra={"boom": Boom})
    with caplog.at_level(logging.ERROR, "smtpgate"):
        with gw.client(xclient=OUTSIDE_IP) as smtp:
            smtp.mail("bob@example.org")
            assert smtp.rcpt("boom@example.com") == (451, b"4.3.0 Error: internal policy failure, try again later")
            # Same session, next recipient: fine.
            assert smtp.rcpt("alice@example.com")[0] == 250
            assert smtp.data(MSG)[0] == 250
    assert "plugin=boom hook=rcpt raised" in caplog.text
    assert "RuntimeError: boom plugin exploded" in caplog.text
    with gw.client(xclient=OUTSIDE_IP) as smtp:  # and the next session works
        assert smtp.sendmail("bob@example.org", ["bob@example.com"], MSG) == {}
    postfix.wait_for_messages("alice")
    postfix.wait_for_messages("bob")


@pytest.mark.parametrize("local, logged", [("exit", "SystemExit: 1"), ("cancel", "CancelledError")])
def test_a_plugin_raising_what_is_no_exception_takes_only_its_command_down(
    start_gateway, postfix, caplog, local: str, logged: str
) -> None:
    gw = start_gateway(f"127.0.0.1:{postfix.port}", plugins={"boom": {}}, extra={"boom": Boom})
    with caplog.at_level(logging.ERROR, "smtpgate"), gw.client(xclient=OUTSIDE_IP) as other:
        other.mail("carol@example.org")
        assert other.rcpt("alice@example.com")[0] == 250
        with gw.client(xclient=OUTSIDE_IP) as smtp:
            smtp.mail("bob@example.org")
            assert smtp.rcpt(f"{local}@example.com") == (451, b"4.3.0 Error: internal policy failure, try again later")
            assert smtp.rcpt("bob@example.com")[0] == 250
            assert smtp.data(MSG)[0] == 250
        assert other.data(MSG)[0] == 250  # the session beside it, on the same worker
    assert logged in caplog.text
    postfix.wait_for_messages("alice")
    postfix.wait_for_messages("bob")


def test_plugin_that_raises_at_connect_gives_421_and_a_close(start_gateway, postfix, caplog) -> None:
    # No greeting may be a 451 (RFC 5321 §4.3.2): the temporary failure is
    # a 421 and the connection closes; the client retries later.
    gw = start_gateway(f"127.0.0.1:{postfix.port}", plugins={"boom": {}}, extra={"boom": Boom})
    with caplog.at_level(logging.ERROR, "smtpgate"):
        sock = gw.raw()
        sock.sendall(f"XCLIENT ADDR={BOOM_IP}\r\n".encode())
        assert recv_reply(sock) == b"421 4.3.0 Error: internal policy failure, try again later\r\n"
        assert sock.recv(100) == b""  # closed
        sock.close()
    assert "plugin=boom hook=connect raised" in caplog.text
    assert "RuntimeError: boom plugin exploded at connect" in caplog.text
    with gw.client(xclient=OUTSIDE_IP) as smtp:  # the next client is served
        assert smtp.sendmail("bob@example.org", ["alice@example.com"], MSG) == {}
    postfix.wait_for_messages("alice")


def test_plugin_overrunning_its_budget_gives_451(start_gateway, postfix) -> None:
    gw = start_gateway(
        f"127.0.0.1:{postfix.port}", plugins={"stall": {"seconds": 5.0}}, extra={"stall": Stall}, hook_timeout=0.3
    )
    with gw.client(xclient=OUTSIDE_IP) as smtp:
        assert smtp.mail("bob@example.org") == (451, b"4.3.0 Error: internal policy failure, try again later")


def test_only_what_the_next_hop_honours_is_offered_and_passed_on(start_gateway) -> None:
    # This next hop offers neither 8BITMIME nor SIZE.
    with BadMTA("silent-at-data-end") as mta:
        gw = start_gateway(f"127.0.0.1:{mta.port}")
        with gw.client(xclient=OUTSIDE_IP) as smtp:
            assert not smtp.has_extn("8bitmime") and smtp.has_extn("size")  # SIZE is our own limit
            assert smtp.mail("bob@example.org", ["BODY=8BITMIME"]) == (555, b"5.5.4 Unsupported option: BODY=8BITMIME")
            assert smtp.mail("bob@example.org", ["SIZE=100"])[0] == 250
        assert b"MAIL FROM:<bob@example.org>" in mta.commands  # without SIZE=


def test_without_smtputf8_a_utf8_address_is_a_syntax_error(start_gateway) -> None:
    # Nobody was offered SMTPUTF8, so nobody can be told to declare it: a
    # UTF-8 address is bad syntax, in RCPT as in MAIL (RFC 6531 §3.7.4.1
    # keeps 553 5.6.7 for a transaction that could have declared it).
    with BadMTA("silent-at-data-end") as mta:
        gw = start_gateway(f"127.0.0.1:{mta.port}")
        with gw.client(xclient=OUTSIDE_IP) as smtp:
            assert not smtp.has_extn("smtputf8")
            smtp.command_encoding = "utf-8"  # as a client that sends UTF-8 regardless
            assert smtp.mail("b\u00f6b@example.org") == (501, b"5.1.7 Bad sender address syntax")
            assert smtp.mail("bob@example.org")[0] == 250
            assert smtp.rcpt("\u00fc@example.com") == (501, b"5.1.3 Bad recipient address syntax")
        assert not any(b"RCPT" in line for line in mta.commands)


def test_a_reply_no_command_asked_for_ends_that_connection(start_gateway) -> None:
    # A late or extra reply (here after the reply to BDAT LAST) puts the
    # dialogue out of step: left on the connection, it or its remainder
    # would be read as the reply to a later command, a 250 for a message
    # the next hop refused.  The next transaction gets a new connection.
    with BadMTA("extra-after-bdat", delay=0.1, final=b"250 2.0.0 Ok: one more\r\n") as mta:
        gw = start_gateway(f"127.0.0.1:{mta.port}")
        with gw.client(xclient=OUTSIDE_IP) as smtp:
            assert smtp.sendmail("bob@example.org", ["alice@example.com"], MSG) == {}
            time.sleep(0.5)  # the extra reply is in
            assert smtp.sendmail("bob@example.org", ["alice@example.com"], MSG) == {}
        assert mta.sessions == 2
        assert len(mta.received) == 2
