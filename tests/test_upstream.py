"""The next hop's wire format: what the MTA is sent for a message."""

import aiosmtplib
import pytest

from gateway.replies import Reply
from gateway.upstream import _crlf, _dot_stuff, _judges_the_client


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
