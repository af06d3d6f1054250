"""PROXY protocol headers, generated: valid ones of both versions, and the
same with a byte changed, added or cut, or plain noise.

What the balancer's side sees must be one of two things: a 220 greeting,
and then the checks judged the client the header names (IPv4-mapped
addresses as IPv4, as everywhere); or the connection closed without a word.
Never an internal error, and every connection stops counting against the limits
once it is over, whatever its header was.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import socket
import struct
import time
from collections.abc import Iterator

import pytest
from hypothesis import Phase, example, given, note, settings
from hypothesis import strategies as st

from gateway import Plugin, hookimpl

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


class SeenClients(Plugin):
    """Notes the client address each connection was judged as."""

    seen: list[str] = []

    @hookimpl
    def connect(self, session):
        SeenClients.seen.append(str(session.client_ip))


def _as_seen(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    mapped = getattr(ip, "ipv4_mapped", None)
    return str(mapped or ip)


@st.composite
def v1_headers(draw: st.DrawFn) -> tuple[bytes, str]:
    version = draw(st.sampled_from([4, 6]))
    src, dst = draw(st.ip_addresses(v=version)), draw(st.ip_addresses(v=version))
    sport, dport = draw(st.integers(0, 65535)), draw(st.integers(0, 65535))
    return f"PROXY TCP{version} {src} {dst} {sport} {dport}\r\n".encode(), _as_seen(src)


@st.composite
def v2_headers(draw: st.DrawFn) -> tuple[bytes, str]:
    version = draw(st.sampled_from([4, 6]))
    src, dst = draw(st.ip_addresses(v=version)), draw(st.ip_addresses(v=version))
    ports = struct.pack("!HH", draw(st.integers(0, 65535)), draw(st.integers(0, 65535)))
    body = src.packed + dst.packed + ports
    # Type-length-value fields a balancer may add (ALPN, authority, unique id, NOOP).
    for kind, value in draw(st.lists(st.tuples(st.sampled_from([0x01, 0x02, 0x04, 0x05]), st.binary(max_size=20)), max_size=3)):
        body += struct.pack("!BH", kind, len(value)) + value
    family = 0x11 if version == 4 else 0x21
    return V2_SIGNATURE + bytes([0x21, family]) + struct.pack("!H", len(body)) + body, _as_seen(src)


valid_headers = st.one_of(v1_headers(), v2_headers())


@st.composite
def damaged_headers(draw: st.DrawFn) -> bytes:
    header, _ = draw(valid_headers)
    how = draw(st.sampled_from(["cut", "change", "insert", "noise"]))
    if how == "noise":
        return draw(st.binary(max_size=120))
    at = draw(st.integers(0, len(header) - 1))
    if how == "cut":
        return header[:at]
    byte = bytes([draw(st.integers(0, 255))])
    if how == "change":
        return header[:at] + byte + header[at + 1:]
    return header[:at] + byte + header[at:]


def named_clients(header: bytes) -> set[str]:
    """Every client a parser may read from ``header``: the addresses written
    in it (v1), or at the source field's place (v2); and the connection's
    own (loopback) where the header says to use that: v1 ``UNKNOWN``, v2
    ``LOCAL`` or an unspecified family."""
    names = set()
    for token in header.replace(b"\r", b" ").replace(b"\n", b" ").split(b" "):
        try:
            names.add(_as_seen(ipaddress.ip_address(token.decode())))
        except (ValueError, UnicodeDecodeError):
            pass
    if b"UNKNOWN" in header:
        names.add("127.0.0.1")
    if header.startswith(V2_SIGNATURE) and len(header) >= 14:
        if header[12] & 0x0F == 0 or header[13] >> 4 == 0:
            names.add("127.0.0.1")
        for size in (4, 16):
            if len(header) >= 16 + size:
                names.add(_as_seen(ipaddress.ip_address(header[16:16 + size])))
    return names


GREETED = re.compile(rb"220 gw\.test\.example [^\r\n]*\r\n221 2\.0\.0 Bye\r\n")


def talk(port: int, header: bytes) -> bytes:
    """Send the header and a QUIT, say no more, and read to the end."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(header + b"QUIT\r\n")
        sock.shutdown(socket.SHUT_WR)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
        return received


@pytest.fixture
def balanced(start_gateway, tmp_path, caplog) -> Iterator:
    """A gateway behind a (pretend) balancer, and a check after each
    example that nothing is still counted."""
    gw = start_gateway(
        f"maildir:{tmp_path / 'maildir'}", proxy_protocol=True, proxy_timeout=1.0,
        plugins={"seen": {}}, extra={"seen": SeenClients},
    )

    def settled() -> None:
        deadline = time.monotonic() + 3
        while gw.gateway.counts.total() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert gw.gateway.counts.total() == 0, "a finished connection is still counted"

    with caplog.at_level(logging.WARNING):
        yield gw, settled
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


@settings(max_examples=40, phases=[Phase.explicit, Phase.generate], deadline=None)
@given(header=valid_headers)
def test_a_valid_header_names_the_client(balanced, header: tuple[bytes, str]) -> None:
    gw, settled = balanced
    raw, client = header
    note(repr(raw))
    SeenClients.seen.clear()
    received = talk(gw.port, raw)
    assert GREETED.fullmatch(received), received
    assert SeenClients.seen == [client]
    settled()


@settings(max_examples=80, phases=[Phase.explicit, Phase.generate], deadline=None)
@given(header=damaged_headers())
@example(header=b"")
@example(header=b"PROXY TCP4 203.0.113.9 192.0.2.1 40000 25\n")  # LF only
@example(header=b"PROXY TCP4 203.0.113.9 192.0.2.1 40000\r\n")  # a port missing
@example(header=b"PROXY TCP4 203.0.113.9 192.0.2.1 40000 99999\r\n")
@example(header=b"PROXY TCP4 2001:db8::1 192.0.2.1 40000 25\r\n")  # family and address differ
@example(header=b"PROXY " + b"x" * 200 + b"\r\n")  # longer than v1 allows
@example(header=V2_SIGNATURE + bytes([0x21, 0x11]) + struct.pack("!H", 65535))  # says more than comes
@example(header=V2_SIGNATURE + bytes([0x31, 0x11]) + struct.pack("!H", 12) + bytes(12))  # version 3
def test_a_damaged_header_gets_a_greeting_or_a_closed_connection(balanced, header: bytes) -> None:
    gw, settled = balanced
    note(repr(header))
    SeenClients.seen.clear()
    received = talk(gw.port, header)
    # A header that is still valid after the change (a digit for a digit)
    # is greeted, and the client is one it names; what follows it is the
    # client's (a v2 length made shorter leaves bytes before the QUIT).
    # Anything else is closed on without an answer.
    if received:
        assert received.startswith(b"220 gw.test.example "), received
        (seen,) = SeenClients.seen
        assert seen in named_clients(header)
    else:
        assert SeenClients.seen == []
    settled()
