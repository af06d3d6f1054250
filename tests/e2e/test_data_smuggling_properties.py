"""SMTP smuggling, generated: bodies full of non-standard end-of-data forms
and the commands of a second message behind them, through the gateway to the
real Postfix.

What a user and the postmaster see must be one of two things: the end of
data is answered 250, Postfix logged one MAIL, one RCPT and one BDAT (or
DATA) for the client, and one message arrived, the one the RFC 5321 model
of tests/test_data_properties.py reads from the stream; or the gateway
answered Postfix's ``550 5.5.2 Error: bare <LF> received`` (or ``<CR>``) and
nothing arrived.  Never a second message, never the smuggled sender.

Each example is a whole SMTP session and a delivery, so the examples are
few and not shrunk; tests/test_data_properties.py shrinks the same model
in memory.  The test Postfix is 3.7 with ``smtpd_forbid_bare_newline = no``:
it would itself take ``<LF>.<LF>`` for an end of data, so whatever the
gateway passes on must not contain one.
"""

from __future__ import annotations

import socket
import time

import pytest
from hypothesis import HealthCheck, Phase, assume, example, given, note, settings
from hypothesis import strategies as st

from tests.fixtures.gateway import OUTSIDE_IP, recv_reply
from tests.fixtures.postfix import QUEUED, USERS, PostfixInstance
from tests.test_data_properties import END, model

#: Starts every message: ends the header section, so nothing generated can
#: be taken for a header field (the gateway removes forged ones), and marks
#: where the message starts in the Maildir file, after Postfix's own fields.
PREFIX = b"Subject: smuggling probe\r\n\r\n"

#: End-of-data forms that are no end (RFC 5321 §4.1.1.4), but some receivers' end.
FAKE_ENDS = [
    b"\n.\n", b"\r.\r", b"\n.\r\n", b"\r\n.\n", b"\r.\r\n", b"\r\n.\r", b"\n.\r", b"\r.\n",
    b"\n..\n", b"\r\n..\r\n", b"\r\n.\r\r\n", b"\r\n\n.\n",
]
LINE_ENDS = [b"\r\n", b"\n", b"\r"]
#: The second message, line by line.
SMUGGLED = [
    b"MAIL FROM:<evil@example.org>", b"RCPT TO:<bob@example.com>", b"DATA",
    b"From: evil@example.org", b"Subject: smuggled", b"", b"evil", b".", b"QUIT",
]
#: Text around the attempts: dots, NUL, 8-bit bytes, a long line.
COVER = [b"cover", b"", b".", b"..", b".x", b"\x00", b"\xc3\xa4\xff", b" \t", b"z" * 3000]

#: A conforming client's message that quotes a session: dot-stuffed, CRLF only.
CLEAN = PREFIX + b"cover\r\n..\r\nMAIL FROM:<evil@example.org>\r\nRCPT TO:<bob@example.com>\r\nDATA\r\n\r\nevil\r\n" + END
#: SEC Consult's first form: <LF>.<LF>, then the second message.
CLASSIC = PREFIX + b"cover\n.\nMAIL FROM:<evil@example.org>\nRCPT TO:<bob@example.com>\nDATA\nevil\n.\n" + END
#: The same with bare CRs only (a receiver that takes CR for a line end).
CR_ONLY = PREFIX + b"cover\r.\rMAIL FROM:<evil@example.org>\rRCPT TO:<bob@example.com>\rDATA\revil\r.\r" + END


@st.composite
def smuggling_bodies(draw: st.DrawFn) -> bytes:
    parts: list[bytes] = []
    for _ in range(draw(st.integers(1, 3))):
        parts.append(draw(st.sampled_from(COVER)))
        parts.append(draw(st.sampled_from(FAKE_ENDS)))
        if draw(st.booleans()):
            commands = SMUGGLED  # the whole second message, in order
        else:
            commands = draw(st.lists(st.sampled_from(SMUGGLED), min_size=1, max_size=5))
        for command in commands:
            parts.append(command + draw(st.sampled_from(LINE_ENDS)))
    return b"".join(parts)


@st.composite
def streams(draw: st.DrawFn) -> tuple[bytes, list[bytes]]:
    """What the client sends after the 354, cut into what it writes at once."""
    stream = PREFIX + draw(smuggling_bodies()) + END
    # Only the final end is a real one: a CRLF.CRLF inside would make what
    # follows the client's own commands, not a smuggling attempt.
    assume(model(stream, "normalize").rest == b"")
    cuts = sorted(set(draw(st.lists(st.integers(1, len(stream) - 1), max_size=4))))
    bounds = [0, *cuts, len(stream)]
    return stream, [stream[a:b] for a, b in zip(bounds, bounds[1:])]


def body_of(delivered: bytes) -> bytes:
    """The message after the fields Postfix prepends (Return-Path, ...,
    Received), as the Maildir holds it: LF line ends."""
    return delivered[delivered.index(b"\n" + PREFIX.replace(b"\r\n", b"\n")) + 1 :]


def postfix_size(message: bytes) -> int:
    """The size Postfix reports for a BDAT chunk of ``message``: it stores a
    line in records of at most line_length_limit (2048) bytes and counts a
    CRLF after each (measured on Postfix 3.7: a 2048-byte line counts 2050,
    a 5000-byte one 5004)."""
    return len(message) + sum(2 * (len(line) // 2048) for line in message.split(b"\r\n"))


def send(gateway, chunks: list[bytes]) -> tuple[bytes, bytes]:
    """One session: a transaction whose DATA is ``chunks``; the reply to
    the end of data, and to QUIT."""
    with gateway.raw() as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for line in (b"XCLIENT ADDR=" + OUTSIDE_IP.encode() + b" NAME=[UNAVAILABLE]", b"EHLO client.example.net",
                     b"MAIL FROM:<bob@example.org>", b"RCPT TO:<alice@example.com>", b"DATA"):
            sock.sendall(line + b"\r\n")
            reply = recv_reply(sock)
            assert reply[:1] in (b"2", b"3"), (line, reply)
        for chunk in chunks:
            sock.sendall(chunk)
            time.sleep(0.002)  # so the gateway likely reads the pieces apart
        end = recv_reply(sock)
        sock.sendall(b"QUIT\r\n")
        return end, recv_reply(sock)


@pytest.fixture(params=["bdat", "data"])
def next_hop(request: pytest.FixtureRequest) -> tuple[str, PostfixInstance]:
    """Postfix offering CHUNKING (the message goes as one BDAT), or not
    (it goes by DATA, dot-stuffed by the gateway)."""
    if request.param == "bdat":
        return "bdat", request.getfixturevalue("postfix")
    return "data", request.getfixturevalue("postfix_without_chunking")


@pytest.fixture(params=["reject", "normalize"])
def bare_newline(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def gateway_for(start_gateway, next_hop, bare_newline: str):
    """The gateway with that policy in front of that Postfix, one for all
    the examples of a test (fixtures are not set up per example)."""
    return start_gateway(f"127.0.0.1:{next_hop[1].port}", bare_newline=bare_newline)


@settings(
    max_examples=8,
    phases=[Phase.explicit, Phase.generate],  # a Postfix round trip per example: no shrinking
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(sent=streams())
@example(sent=(CLEAN, [CLEAN]))
@example(sent=(CLASSIC, [CLASSIC[:40], CLASSIC[40:]]))
@example(sent=(CR_ONLY, [CR_ONLY]))
def test_one_message_or_a_rejection_never_a_smuggled_one(gateway_for, next_hop, bare_newline: str, sent) -> None:
    command, postfix = next_hop
    stream, chunks = sent
    expected = model(stream, bare_newline)
    note(f"stream: {stream!r}\nmodel: {expected}")
    postfix.clear()

    end, bye = send(gateway_for, chunks)

    assert bye == b"221 2.0.0 Bye\r\n"
    seen = postfix.wait_for_commands(OUTSIDE_IP)
    assert (seen.get("mail"), seen.get("rcpt")) == ("1", "1"), seen
    if expected.message is not None:
        assert QUEUED.match(end), end
        assert seen.get(command) == "1", seen
        assert ({"bdat", "data"} - {command}).isdisjoint(seen), seen
        (delivered,) = postfix.wait_for_messages("alice")
        assert body_of(delivered) == expected.message.replace(b"\r\n", b"\n")
        if command == "bdat":  # "250 2.0.0 Ok: N bytes queued as ..."
            assert int(end.split()[3]) == postfix_size(expected.message), end
    else:
        assert expected.reply is not None
        assert end == expected.reply.wire()
        assert "bdat" not in seen and "data" not in seen, seen
        assert postfix.messages("alice") == []
    for user in USERS:
        if user != "alice":
            assert postfix.messages(user) == []
    assert "evil@example.org" not in postfix.maillog()
