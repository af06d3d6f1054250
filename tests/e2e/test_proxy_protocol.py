"""PROXY protocol v1/v2 on the listener: the client behind the load
balancer is the one every check and Postfix see."""

import socket
import struct
import time

from tests.fixtures.gateway import TRUSTED_IP, recv_reply


def conversation(sock: socket.socket) -> None:
    assert recv_reply(sock).startswith(b"220 ")
    for line in (b"EHLO lb-client.example.net", b"MAIL FROM:<bob@example.org>", b"RCPT TO:<alice@example.com>", b"DATA"):
        sock.sendall(line + b"\r\n")
        assert recv_reply(sock)[:1] in (b"2", b"3")
    sock.sendall(b"Subject: proxied\r\n\r\nx\r\n.\r\nQUIT\r\n")
    assert recv_reply(sock).startswith(b"250 ")


def test_proxy_v1(start_gateway, postfix) -> None:
    gw = start_gateway(f"127.0.0.1:{postfix.port}", proxy_protocol=True)
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as sock:
        sock.sendall(b"PROXY TCP4 203.0.113.9 192.0.2.1 40000 25\r\n")
        conversation(sock)
    assert postfix.wait_for_client("203.0.113.9")["name"] == "unknown"


def test_proxy_v2(start_gateway, postfix) -> None:
    gw = start_gateway(f"127.0.0.1:{postfix.port}", proxy_protocol=True)
    addresses = socket.inet_aton("203.0.113.10") + socket.inet_aton("192.0.2.1") + struct.pack("!HH", 40000, 25)
    header = b"\r\n\r\n\x00\r\nQUIT\n" + bytes([0x21, 0x11]) + struct.pack("!H", len(addresses)) + addresses
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as sock:
        sock.sendall(header)
        conversation(sock)
    postfix.wait_for_client("203.0.113.10")


def test_missing_proxy_header_closes_the_connection(start_gateway, postfix) -> None:
    gw = start_gateway(f"127.0.0.1:{postfix.port}", proxy_protocol=True)
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as sock:
        sock.sendall(b"EHLO direct.example.net\r\n")
        assert sock.recv(100) == b""


def test_a_scoped_address_in_the_header_is_refused(start_gateway, postfix) -> None:
    # fe80::1%eth0 names a host on the balancer's link, not the client;
    # aiosmtpd's PROXY reader refuses it as malformed.
    gw = start_gateway(f"127.0.0.1:{postfix.port}", proxy_protocol=True)
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as sock:
        sock.sendall(b"PROXY TCP6 fe80::1%eth0 2001:db8::1 40000 25\r\n")
        assert sock.recv(100) == b""


def say(sock: socket.socket, line: bytes) -> bytes:
    sock.sendall(line + b"\r\n")
    return recv_reply(sock)


def test_xclient_is_judged_on_the_client_behind_the_balancer(start_gateway, postfix) -> None:
    # The balancer (127.0.0.1) is in xclient_hosts; the client it carries is
    # not, so it may not claim a trusted address and relay through us.
    gw = start_gateway(f"127.0.0.1:{postfix.port}", proxy_protocol=True, xclient_hosts=["127.0.0.0/8"])
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as sock:
        sock.sendall(b"PROXY TCP4 203.0.113.9 192.0.2.1 40000 25\r\n")
        assert recv_reply(sock).startswith(b"220 ")
        assert b"XCLIENT" not in say(sock, b"EHLO c.example.net")
        assert say(sock, f"XCLIENT ADDR={TRUSTED_IP}".encode()) == b"550 5.7.0 Error: insufficient authorization\r\n"
        assert say(sock, b"MAIL FROM:<bob@example.org>").startswith(b"250 ")
        assert say(sock, b"RCPT TO:<victim@remote.example>") == b"554 5.7.1 <victim@remote.example>: Relay access denied\r\n"
    assert "victim@remote.example" not in postfix.maillog()


def test_xclient_from_an_authorised_host_behind_the_balancer(start_gateway, postfix) -> None:
    gw = start_gateway(f"127.0.0.1:{postfix.port}", proxy_protocol=True, xclient_hosts=["192.0.2.0/24"])
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as sock:
        sock.sendall(b"PROXY TCP4 192.0.2.25 192.0.2.1 40000 25\r\n")
        assert recv_reply(sock).startswith(b"220 ")
        assert b"XCLIENT" in say(sock, b"EHLO front.example.net")
        assert say(sock, b"XCLIENT ADDR=203.0.113.77 NAME=[UNAVAILABLE]").startswith(b"220 ")
        conversation_after_greeting(sock)
    postfix.wait_for_client("203.0.113.77")


def conversation_after_greeting(sock: socket.socket) -> None:
    for line in (b"EHLO real-client.example.net", b"MAIL FROM:<bob@example.org>", b"RCPT TO:<alice@example.com>", b"DATA"):
        assert say(sock, line)[:1] in (b"2", b"3")
    assert say(sock, b"Subject: behind a balancer\r\n\r\nx\r\n.").startswith(b"250 ")
    say(sock, b"QUIT")


def test_connections_waiting_for_their_header_are_counted_and_bounded(start_gateway, postfix) -> None:
    gw = start_gateway(f"127.0.0.1:{postfix.port}", proxy_protocol=True, proxy_timeout=1.0,
                       max_connections=2, max_connections_per_ip=2)
    silent = [socket.create_connection(("127.0.0.1", gw.port), timeout=10) for _ in range(2)]
    try:
        time.sleep(0.2)  # both are accepted and waiting for a header
        with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as third:
            assert recv_reply(third) == b"421 4.7.0 gw.test.example Error: too many connections\r\n"
        started = time.monotonic()
        for sock in silent:
            assert sock.recv(100) == b""  # closed once proxy_timeout is over
        assert time.monotonic() - started < 3
    finally:
        for sock in silent:
            sock.close()
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as sock:
        sock.sendall(b"PROXY TCP4 203.0.113.9 192.0.2.1 40000 25\r\n")
        conversation(sock)


def test_a_peer_outside_proxy_hosts_cannot_name_a_client(start_gateway, postfix) -> None:
    # Only the balancers in proxy_hosts speak PROXY; a client reaching the
    # port directly is served as itself, and its header line is no command.
    gw = start_gateway(f"127.0.0.1:{postfix.port}", proxy_protocol=True, proxy_hosts=["192.0.2.0/24"],
                       trusted_networks=[f"{TRUSTED_IP}/32"])
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as sock:
        assert recv_reply(sock).startswith(b"220 gw.test.example ")
        reply = say(sock, f"PROXY TCP4 {TRUSTED_IP} 192.0.2.1 40000 25".encode())
        assert reply.startswith(b"500 5.5.2 "), reply
        assert say(sock, b"EHLO direct.example.net").startswith(b"250-")
        assert say(sock, b"MAIL FROM:<bob@example.org>").startswith(b"250 ")
        assert say(sock, b"RCPT TO:<victim@remote.example>") == b"554 5.7.1 <victim@remote.example>: Relay access denied\r\n"
    assert "victim@remote.example" not in postfix.maillog()


def test_a_balancer_in_proxy_hosts_names_its_client(start_gateway, postfix) -> None:
    gw = start_gateway(f"127.0.0.1:{postfix.port}", proxy_protocol=True, proxy_hosts=["127.0.0.0/8"])
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as sock:
        sock.sendall(b"EHLO direct.example.net\r\n")
        assert sock.recv(100) == b""  # a listed balancer must send the header
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as sock:
        sock.sendall(b"PROXY TCP4 203.0.113.11 192.0.2.1 40000 25\r\n")
        conversation(sock)
    postfix.wait_for_client("203.0.113.11")
