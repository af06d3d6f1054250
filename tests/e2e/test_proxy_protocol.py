"""PROXY protocol v1/v2 on the listener: the client behind the load
balancer is the one every check and Postfix see."""

import socket
import struct

from tests.fixtures.gateway import recv_reply


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
