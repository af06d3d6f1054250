"""The next hop's wire format: what the MTA is sent for a message."""

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

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


def test_a_multiline_reply_read_again_is_read_alike() -> None:
    # Multi-line replies are kept once read (the EHLO offer of every
    # connection); a malformed one must fail every read, not only the first.
    offer = b"250-mx.example\r\n250-PIPELINING\r\n250 DSN\r\n"
    assert read_reply(offer) == read_reply(offer) == (250, "mx.example\nPIPELINING\nDSN")
    for _ in range(2):
        with pytest.raises(aiosmtplib.SMTPResponseException):
            read_reply(b"250-2.0.0 hmm\r\n2500 queued\r\n")
    # Too long to be kept: read all the same.
    long_offer = b"".join(b"250-X-EXTENSION-%03d\r\n" % i for i in range(60)) + b"250 DSN\r\n"
    assert len(long_offer) > 1024
    response = read_reply(long_offer)
    assert response is not None and response.message.split("\n")[-2:] == ["X-EXTENSION-059", "DSN"]


async def _next_hop_offering(extensions: list[str]) -> tuple[asyncio.Server, asyncio.Event]:
    """A next hop that greets, answers EHLO with ``extensions``, HELO,
    XCLIENT as Postfix does, and QUIT; the event is set once its session
    has ended."""
    ended = asyncio.Event()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(b"220 mta.example.org ESMTP\r\n")
            while line := await reader.readline():
                if line.upper().startswith(b"EHLO"):
                    lines = ["mta.example.org", *extensions]
                    writer.write("".join(f"250{'-' if i < len(lines) - 1 else ' '}{text}\r\n"
                                         for i, text in enumerate(lines)).encode())
                elif line.upper().startswith(b"HELO"):
                    writer.write(b"250 mta.example.org\r\n")
                elif line.upper().startswith(b"XCLIENT"):
                    offers = any(e.startswith("XCLIENT") for e in extensions)
                    writer.write(b"220 mta.example.org ESMTP\r\n" if offers
                                 else b"550 5.7.0 Error: insufficient authorization\r\n")
                elif line.upper().startswith(b"QUIT"):
                    writer.write(b"221 2.0.0 Bye\r\n")
                    break
                else:
                    writer.write(b"502 5.5.1 no\r\n")
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()
            ended.set()

    return await asyncio.start_server(serve, "127.0.0.1", 0), ended


async def test_a_next_hop_without_xclient_is_logged_once_per_worker(caplog: pytest.LogCaptureFixture) -> None:
    # Postfix without smtpd_authorized_xclient_hosts for us takes every
    # client for the gateway: its restrictions and mynetworks judge us.
    import ipaddress

    from gateway.config import Endpoint, GatewaySettings
    from gateway.session import Session
    from gateway.upstream import NextHopMemory, SMTPUpstream

    settings = GatewaySettings(hostname="gw.example.org")
    memory = NextHopMemory()
    client = Session(client_ip=ipaddress.ip_address("203.0.113.7"), helo="mail.example.net")
    # Once offered, later sessions go straight to XCLIENT; refused, they
    # look again with our EHLO, and a lost offer is said again.
    for offered, warnings in ((["PIPELINING"], 1), (["PIPELINING"], 1),
                              (["XCLIENT NAME ADDR HELO"], 1), (["PIPELINING"], 2)):
        server, ended = await _next_hop_offering(offered)
        port = server.sockets[0].getsockname()[1]
        upstream = SMTPUpstream(Endpoint("127.0.0.1", port), settings, memory)
        with caplog.at_level("WARNING", logger="smtpgate.upstream"):
            await upstream.connect()
            await upstream.introduce(client)
            await upstream.close()
        await asyncio.wait_for(ended.wait(), 5)
        server.close()
        await server.wait_closed()
        said = [r.getMessage() for r in caplog.records if "does not offer us XCLIENT" in r.getMessage()]
        assert len(said) == warnings, (offered, said)
    assert said[0].startswith("next hop 127.0.0.1:") and "smtpd_authorized_xclient_hosts" in said[0]


def _settings():
    from gateway.config import GatewaySettings

    return GatewaySettings(hostname="gw.example.org", upstream_connect_timeout=5.0)


@contextlib.asynccontextmanager
async def _fake_next_hop(
    talk: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
) -> AsyncIterator[tuple[int, asyncio.Event]]:
    """A loopback next hop whose sessions ``talk``: its port, and an event
    set once a session has ended (its connection closed by it)."""
    ended = asyncio.Event()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await talk(reader, writer)
        finally:
            writer.close()
            ended.set()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1], ended
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
async def test_the_next_hop_is_reached_with_nagle_off(host: str) -> None:
    # An address is connected to without create_connection's resolving and
    # wait for the connect (SMTPUpstream._open), a name with it: either way
    # the same TCP connection, small commands sent at once.
    import socket

    from gateway.config import Endpoint
    from gateway.upstream import SMTPUpstream

    async def greet(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 mta.example ESMTP\r\n")
        await reader.readline()
        writer.write(b"250-mta.example\r\n250 PIPELINING\r\n")
        assert await reader.read() == b"QUIT\r\n"

    async with _fake_next_hop(greet) as (port, done):
        upstream = SMTPUpstream(Endpoint.parse(f"{host}:{port}", maildir_ok=False), _settings())
        await upstream.connect()
        sock = upstream._smtp.transport.get_extra_info("socket")
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        assert upstream.extensions == frozenset({"pipelining"})
        await upstream.close()
        await asyncio.wait_for(done.wait(), 5)


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "[::1]"])
async def test_a_refused_connection_is_logged_as_asyncio_words_it(host: str) -> None:
    import socket

    from gateway.config import Endpoint
    from gateway.upstream import SMTPUpstream, UpstreamError

    family = socket.AF_INET6 if host.startswith("[") else socket.AF_INET
    try:
        with socket.socket(family) as probe:
            probe.bind((host.strip("[]"), 0))
            port = probe.getsockname()[1]
    except OSError:
        pytest.skip(f"no {host} here")
    address = ("::1", port, 0, 0) if family == socket.AF_INET6 else ("127.0.0.1", port)
    upstream = SMTPUpstream(Endpoint.parse(f"{host}:{port}", maildir_ok=False), _settings())
    with pytest.raises(UpstreamError) as failed:
        await upstream.connect()
    assert str(failed.value) == f"connect to {host}:{port}: [Errno 111] Connect call failed {address}"


@pytest.mark.parametrize("line", ["MAIL FROM:<a@example.org>\r\nRCPT TO:<x@remote.example>",
                                  "RCPT TO:<x@example.com>\nDATA", "MAIL FROM:<a@example.org>\r"])
async def test_a_line_break_inside_a_command_never_reaches_the_next_hop(line: str) -> None:
    # The SMTP front refuses such commands; this is the last guard, for any
    # other way a line could be built: one command must not become two.
    from gateway.config import Endpoint
    from gateway.upstream import SMTPUpstream, UpstreamError

    heard: list[bytes] = []

    async def mta(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 mta.example ESMTP\r\n")
        while command := await reader.readline():
            heard.append(command)
            writer.write(b"250-mta.example\r\n250 PIPELINING\r\n" if command.startswith(b"EHLO")
                         else b"250 2.0.0 Ok\r\n")
            await writer.drain()

    async with _fake_next_hop(mta) as (port, done):
        upstream = SMTPUpstream(Endpoint("127.0.0.1", port), _settings())
        await upstream.connect()
        with pytest.raises(UpstreamError):
            await upstream.command(line)
        await upstream.close()
        await asyncio.wait_for(done.wait(), 5)
    assert heard == [b"EHLO gw.example.org\r\n", b"QUIT\r\n"]
