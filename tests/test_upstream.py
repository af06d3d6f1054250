"""The next hop's wire format: what the MTA is sent for a message."""

import asyncio

import aiosmtplib
import pytest

from gateway.replies import Reply
from gateway.upstream import _crlf, _dot_stuff, _judges_the_client, _NextHopProtocol


@pytest.mark.parametrize(
    ("message", "stuffed"),
    [
        (b"a\r\n.b\r\n", b"a\r\n..b\r\n"),
        (b".first\r\nsecond\r\n", b"..first\r\nsecond\r\n"),
        (b"a\r\n..\r\n.\r\n", b"a\r\n...\r\n..\r\n"),
        (b"no.dots.at.line.start\r\n", b"no.dots.at.line.start\r\n"),
        (b"", b""),
    ],
)
def test_dot_stuffing(message: bytes, stuffed: bytes) -> None:
    assert _dot_stuff(message) == stuffed


@pytest.mark.parametrize(
    ("message", "clean"),
    [
        (b"a\r\nb\r\n", b"a\r\nb\r\n"),
        (b"a\r\nb", b"a\r\nb\r\n"),
        (b"X-Folded: one\n\ttwo\r\nbody\r\n", b"X-Folded: one\r\n\ttwo\r\nbody\r\n"),
        (b"a\rb\r\n", b"a\r\nb\r\n"),
        (b"", b""),
    ],
)
def test_every_line_ends_in_crlf(message: bytes, clean: bytes) -> None:
    assert _crlf(message) == clean


async def test_a_failed_maildir_delivery_leaves_nothing_behind(tmp_path) -> None:
    from gateway.address import Address
    from gateway.config import GatewaySettings
    from gateway.session import Envelope
    from gateway.upstream import MaildirUpstream, UpstreamError

    box = MaildirUpstream(tmp_path, GatewaySettings(hostname="gw.example.org"))
    await box.connect()
    (tmp_path / "new").rmdir()
    (tmp_path / "new").write_text("")  # the rename into new/ fails
    with pytest.raises(UpstreamError):
        await box.data(Envelope(Address("bob", "example.org"), ()), b"Subject: x\r\n\r\nbody\r\n")
    assert list((tmp_path / "tmp").iterdir()) == []  # no half-delivered file either


@pytest.mark.parametrize(("code", "message", "judged"), [
    (554, "5.7.1 <unknown[203.0.113.66]>: Client host rejected: go away", True),
    (450, "4.7.25 Client host rejected: cannot find your hostname, [203.0.113.7]", True),
    (550, "5.7.0 Error: insufficient authorization", False),  # about us: not in xclient hosts
    (501, "5.5.4 Bad NAME syntax: -", False),  # about us: what we sent
    (421, "4.7.0 postfix.test Error: too many connections", False),  # ends the session anyway
    (220, "postfix.test ESMTP Postfix", False),
    (554, "go away", False),  # no enhanced code: nothing says it is about the client
])
def test_which_xclient_refusals_are_about_the_client(code: int, message: str, judged: bool) -> None:
    reply = _judges_the_client(aiosmtplib.SMTPResponse(code, message))
    assert (reply is not None) == judged
    if judged:
        assert reply == Reply.parse(code, message)


def read_reply(wire: bytes) -> aiosmtplib.SMTPResponse | None:
    """What the next hop's protocol reads from ``wire`` arrived at once."""
    loop = asyncio.new_event_loop()
    try:
        protocol = _NextHopProtocol(loop=loop)
        protocol._buffer = bytearray(wire)
        return protocol._read_response_from_buffer()
    finally:
        loop.close()


@pytest.mark.parametrize(("wire", "read"), [
    (b"250 2.1.0 Ok\r\n", (250, "2.1.0 Ok")),
    (b"250\r\n", (250, "")),
    (b"354 go ahead\n", (354, "go ahead")),
    (b"250-mx.example\r\n250-PIPELINING\r\n250 DSN\r\n", (250, "mx.example\nPIPELINING\nDSN")),
    (b"250-mx.example\r\n250-PIPE", None),  # the rest is on its way
    (b"250 Ok", None),
])
def test_replies_are_read_as_aiosmtplib_reads_them(wire: bytes, read: tuple[int, str] | None) -> None:
    response = read_reply(wire)
    assert (response and (response.code, response.message)) == read


@pytest.mark.parametrize("wire", [
    b"2500 queued\r\n",                          # no separator after the code
    b"554-5.7.1 refused\r\n250 2.0.0 Ok\r\n",    # aiosmtplib reads the last line's 250
    b"250-2.0.0 hmm\r\n2500 queued\r\n",
    b"250 2.1.5 Ok\r\n250 2.1.5 Ok\r\n",         # two replies to one command: out of step
    b"199 odd\r\n", b"600 odd\r\n", b"abc odd\r\n",
    b"250 " + b"x" * 9000 + b"\r\n",
])
def test_a_reply_that_is_not_one_well_formed_reply_fails_the_read(wire: bytes) -> None:
    with pytest.raises(aiosmtplib.SMTPResponseException):
        read_reply(wire)
