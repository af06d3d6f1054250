"""The next hop's wire format: what the MTA is sent for a message."""

import pytest

from gateway.upstream import _crlf, _dot_stuff


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
