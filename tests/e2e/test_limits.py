"""Size, recipient, connection and time limits, through the network."""

import select
import socket
import threading
import time

import pytest

from gateway.config import READ_BUFFER
from tests.fixtures.gateway import OUTSIDE_IP, recv_reply


def test_oversized_message_gets_552_and_nothing_arrives(start_gateway, postfix) -> None:
    gw = start_gateway(f"127.0.0.1:{postfix.port}", max_message_size=10_000)
    with gw.client(xclient=OUTSIDE_IP) as smtp:
        assert "10000" in smtp.esmtp_features["size"]
        # No SIZE= announced: the limit is enforced on what actually arrives.
        assert smtp.mail("bob@example.org")[0] == 250
        assert smtp.rcpt("alice@example.com")[0] == 250
        assert smtp.data(b"Subject: big\r\n\r\n" + b"x" * 20_000) == (552, b"5.3.4 Message size exceeds fixed limit")
        # The session goes on and a small message is fine.
        assert smtp.sendmail("bob@example.org", ["alice@example.com"], b"Subject: small\r\n\r\nok\r\n") == {}
    (delivered,) = postfix.wait_for_messages("alice")
    assert b"Subject: small" in delivered


def test_the_size_limit_is_exact(start_gateway, postfix) -> None:
    gw = start_gateway(f"127.0.0.1:{postfix.port}", max_message_size=10_000)

    def message(size: int) -> bytes:  # exactly `size` bytes, its last CRLF included
        head = b"Subject: exact\r\n\r\n"
        return head + b"x" * (size - len(head) - 2) + b"\r\n"

    with gw.client(xclient=OUTSIDE_IP) as smtp:
        assert smtp.sendmail("bob@example.org", ["alice@example.com"], message(10_000)) == {}
        smtp.mail("bob@example.org")
        smtp.rcpt("alice@example.com")
        assert smtp.data(message(10_001)) == (552, b"5.3.4 Message size exceeds fixed limit")
    (delivered,) = postfix.wait_for_messages("alice")
    assert b"Subject: exact" in delivered


def test_dot_stuffing_does_not_count_towards_the_size(start_gateway, postfix) -> None:
    # RFC 1870 §3: the size is the message's, not its stuffed transmission.
    # 100 lines that start with a dot: 100 more bytes on the wire.
    gw = start_gateway(f"127.0.0.1:{postfix.port}", max_message_size=1_000)
    head = b"Subject: dots\r\n\r\n"
    message = head + b".x\r\n" * 100
    message += b"y" * (1_000 - len(message) - 2) + b"\r\n"
    assert len(message) == 1_000
    with gw.client(xclient=OUTSIDE_IP) as smtp:  # smtplib stuffs the dots
        assert smtp.sendmail("bob@example.org", ["alice@example.com"], message, ["SIZE=1000"]) == {}
        smtp.mail("bob@example.org")
        smtp.rcpt("alice@example.com")
        assert smtp.data(message.replace(b"yy", b"yyy", 1)) == (552, b"5.3.4 Message size exceeds fixed limit")
    (delivered,) = postfix.wait_for_messages("alice")
    assert delivered.count(b".x\n") == 100 and b"..x" not in delivered  # Maildir: LF line ends


def test_announced_size_over_the_limit(start_gateway, postfix) -> None:
    gw = start_gateway(f"127.0.0.1:{postfix.port}", max_message_size=10_000)
    with gw.client(xclient=OUTSIDE_IP) as smtp:
        assert smtp.mail("bob@example.org", ["SIZE=10001"]) == (552, b"5.3.4 Message size exceeds fixed limit")


def test_recipient_limit(start_gateway, postfix) -> None:
    gw = start_gateway(f"127.0.0.1:{postfix.port}", max_recipients=2)
    with gw.client(xclient=OUTSIDE_IP) as smtp:
        smtp.mail("bob@example.org")
        assert smtp.rcpt("alice@example.com")[0] == 250
        assert smtp.rcpt("bob@example.com")[0] == 250
        assert smtp.rcpt("carol@example.com") == (452, b"4.5.3 Error: too many recipients")
        assert smtp.data(b"Subject: two\r\n\r\nx\r\n")[0] == 250
    postfix.wait_for_messages("alice")
    postfix.wait_for_messages("bob")
    assert postfix.messages("carol") == []


def test_temporary_refusals_count_against_max_errors(start_gateway, postfix) -> None:
    # A 4yz is a refusal like a 5yz: a client that keeps hitting the
    # recipient limit is cut off after max_errors, not served forever.
    gw = start_gateway(f"127.0.0.1:{postfix.port}", max_recipients=1, max_errors=2)
    sock = gw.raw()
    with sock:
        for line in (b"XCLIENT ADDR=" + OUTSIDE_IP.encode(), b"EHLO c.example.net",
                     b"MAIL FROM:<bob@example.org>", b"RCPT TO:<alice@example.com>"):
            sock.sendall(line + b"\r\n")
            assert recv_reply(sock)[:1] == b"2"
        sock.sendall(b"RCPT TO:<carol@example.com>\r\n")
        assert recv_reply(sock) == b"452 4.5.3 Error: too many recipients\r\n"
        sock.sendall(b"RCPT TO:<carol@example.com>\r\n")
        # The second 452 reached the limit: the 421 follows unasked, and the close.
        said = b""
        while chunk := sock.recv(4096):
            said += chunk
        assert said == (b"452 4.5.3 Error: too many recipients\r\n"
                        b"421 4.7.0 gw.test.example Error: too many errors\r\n")
    assert postfix.messages("alice") == []


def test_the_221_is_sent_only_once_the_place_is_free(gateway, monkeypatch) -> None:
    # A client may reconnect the moment it reads 221; another worker must not
    # still count it then.  The gateway is held inside release(): by then
    # nothing of the 221 may have been sent.
    releasing, go_on = threading.Event(), threading.Event()
    release = gateway.gateway.release

    def held_release(ip: str) -> None:
        releasing.set()
        go_on.wait(10)
        release(ip)

    monkeypatch.setattr(gateway.gateway, "release", held_release)
    sock = gateway.raw()
    with sock:
        sock.sendall(b"QUIT\r\n")
        try:
            assert releasing.wait(10)
            readable, _, _ = select.select([sock], [], [], 0)  # a look, not a wait
        finally:
            go_on.set()
        assert readable == [], "the 221 went out while the place was still counted"
        assert recv_reply(sock) == b"221 2.0.0 Bye\r\n"


def test_connections_per_client_ip(start_gateway, postfix) -> None:
    # Not an XCLIENT host: those count in the total only (below).
    gw = start_gateway(f"127.0.0.1:{postfix.port}", max_connections_per_ip=2, xclient_hosts=[])
    first, second = gw.raw(), gw.raw()
    third = socket.create_connection(("127.0.0.1", gw.port), timeout=5)
    try:
        assert recv_reply(third) == b"421 4.7.0 gw.test.example Error: too many connections from 127.0.0.1\r\n"
        assert third.recv(10) == b""
    finally:
        for s in (first, second, third):
            s.close()
    # Slots are given back when clients leave.
    _wait_for_a_free_place(gw, 5, "connection slots were not released")


def _wait_for_a_free_place(gw, within: float, failure: str) -> None:
    """Connect until the gateway greets with 220 (bounded by ``within`` s)."""
    deadline = time.monotonic() + within
    while True:
        with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as sock:
            if recv_reply(sock).startswith(b"220 "):
                return
        assert time.monotonic() < deadline, failure
        time.sleep(0.05)


def test_a_front_proxy_allowed_xclient_counts_in_the_total_only(start_gateway, postfix) -> None:
    # As Postfix exempts XCLIENT hosts from its per-client connection limit:
    # a proxy speaks for many clients, and max_connections_per_ip would cap
    # the whole site behind it.  The total still holds.
    gw = start_gateway(f"127.0.0.1:{postfix.port}", max_connections_per_ip=1, max_connections=3)
    held = [gw.raw() for _ in range(3)]  # each got its 220
    try:
        with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as fourth:
            assert recv_reply(fourth) == b"421 4.7.0 gw.test.example Error: too many connections\r\n"
        for sock in held:
            sock.sendall(b"XCLIENT ADDR=203.0.113.7\r\n")
            assert recv_reply(sock).startswith(b"220 ")
    finally:
        for sock in held:
            sock.close()
    # Their places are given back, in the total.
    _wait_for_a_free_place(gw, 5, "connection places were not released")


def test_command_timeout(start_gateway, postfix) -> None:
    gw = start_gateway(f"127.0.0.1:{postfix.port}", command_timeout=0.5)
    started = time.monotonic()  # before the connection: the limit starts with it
    s = gw.raw()
    with s:
        assert recv_reply(s) == b"421 4.4.2 gw.test.example Error: timeout exceeded\r\n"
        assert s.recv(10) == b""
    # The limit (the default is minutes); the bound leaves room for a loaded machine.
    assert 0.5 <= time.monotonic() - started < 5.0


def test_data_timeout_delivers_nothing(start_gateway, postfix) -> None:
    gw = start_gateway(f"127.0.0.1:{postfix.port}", data_timeout=0.5)
    s = gw.raw()
    with s:
        for line in (b"XCLIENT ADDR=" + OUTSIDE_IP.encode(), b"EHLO c.example.net", b"MAIL FROM:<bob@example.org>",
                     b"RCPT TO:<alice@example.com>", b"DATA"):
            s.sendall(line + b"\r\n")
            assert recv_reply(s)[:1] in (b"2", b"3")
        s.sendall(b"Subject: slow\r\n\r\nand then nothing")
        assert recv_reply(s) == b"421 4.4.2 gw.test.example Error: timeout exceeded\r\n"
    postfix.wait_for_log(r"disconnect from unknown\[203\.0\.113\.7\]")
    assert postfix.messages("alice") == []


def test_total_connection_limit(start_gateway, postfix) -> None:
    gw = start_gateway(f"127.0.0.1:{postfix.port}", max_connections=1)
    first = gw.raw()
    with first, socket.create_connection(("127.0.0.1", gw.port), timeout=5) as second:
        assert recv_reply(second) == b"421 4.7.0 gw.test.example Error: too many connections\r\n"


def test_data_timeout_is_on_silence_not_on_a_whole_message(start_gateway, postfix) -> None:
    # As Postfix's smtpd_timeout: a client that keeps sending, however
    # slowly, is not cut off; the limit is on each wait for its next bytes.
    gw = start_gateway(f"127.0.0.1:{postfix.port}", data_timeout=1.0)
    sock = gw.raw()
    with sock:
        for line in (f"XCLIENT ADDR={OUTSIDE_IP}".encode(), b"EHLO c.example.net", b"MAIL FROM:<bob@example.org>",
                     b"RCPT TO:<alice@example.com>", b"DATA"):
            sock.sendall(line + b"\r\n")
            assert recv_reply(sock)[:1] in (b"2", b"3")
        sock.sendall(b"Subject: slow but steady\r\n\r\n")
        for i in range(8):  # 3.2 s in all, never 1 s without a byte
            sock.sendall(b"line %d\r\n" % i)
            time.sleep(0.4)
        sock.sendall(b".\r\n")
        assert recv_reply(sock).startswith(b"250 2.0.0 Ok")
    (message,) = postfix.wait_for_messages("alice")
    assert message.endswith(b"line 7\n")


def _held_by_a_client_that_stops_reading(gw, backlog: int) -> socket.socket:
    """A connection whose client sends EHLO after EHLO without reading a
    reply, until more than ``backlog`` bytes of replies wait in the gateway
    beyond what the kernel holds; then it stops sending too."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", gw.port))
    sock.settimeout(5)
    assert recv_reply(sock).startswith(b"220 ")
    (session,) = gw.gateway.sessions
    deadline = time.monotonic() + 20
    while session.transport.get_write_buffer_size() <= backlog:
        assert time.monotonic() < deadline, "the gateway's replies never backed up"
        sock.sendall(b"EHLO client.example.net\r\n" * 20)
        time.sleep(0.001)
    return sock


# A few replies waiting; or so many that the gateway waits for the socket.
@pytest.mark.parametrize("backlog", [0, READ_BUFFER])
def test_a_client_that_stops_reading_is_timed_out(start_gateway, postfix, backlog) -> None:
    # As Postfix's smtpd_timeout limits each write too: a client that does
    # not read its replies loses its session after command_timeout, and its
    # place with it.
    gw = start_gateway(f"127.0.0.1:{postfix.port}", command_timeout=1.0, max_connections_per_ip=1, xclient_hosts=[])
    with _held_by_a_client_that_stops_reading(gw, backlog):
        _wait_for_a_free_place(gw, 8, "the client that stopped reading kept its place")


def _gateway_holds(gw, client: socket.socket) -> bool:
    """Whether the gateway's end of ``client``'s connection is still open
    (the kernel's table of TCP sockets, /proc/net/tcp)."""
    ours = f"0100007F:{gw.port:04X} 0100007F:{client.getsockname()[1]:04X} 01"
    with open("/proc/net/tcp") as table:
        return any(ours in line for line in table)


def test_a_connection_does_not_outlive_its_session_unread(start_gateway, postfix) -> None:
    # After QUIT the place is free at once; the connection itself waits for
    # the client to read its last replies, but no longer than command_timeout:
    # else a client could hold any number of connections past the limits.
    gw = start_gateway(f"127.0.0.1:{postfix.port}", command_timeout=1.0)
    with _held_by_a_client_that_stops_reading(gw, 0) as sock:
        sock.sendall(b"QUIT\r\n")
        deadline = time.monotonic() + 8
        while _gateway_holds(gw, sock):
            assert time.monotonic() < deadline, "the gateway kept the connection of a session that was over"
            time.sleep(0.2)


def test_a_graceful_stop_closes_the_connection_of_a_client_that_reads_nothing(start_gateway, postfix) -> None:
    # A close would wait for the client to read its replies; Python 3.12's
    # Server.wait_closed() waits for every close, so the stop would never end.
    gw = start_gateway(f"127.0.0.1:{postfix.port}", shutdown_timeout=1.0)
    with _held_by_a_client_that_stops_reading(gw, 0) as sock:
        gw.stop()
        assert not _gateway_holds(gw, sock)
