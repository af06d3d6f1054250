"""Property tests of the DATA path, without a network: no SMTP smuggling
through our DATA handling, and the next hop gets exactly the client's message.

The oracle is a small model of RFC 5321 written here, independently of the
gateway's code (:func:`model`):

* the message ends at the first ``<CR><LF>.<CR><LF>``, the CRLF that ended
  the DATA command counting as the first CRLF (§4.1.1.4);
* a line that starts with a dot loses that dot (§4.5.2);
* a bare CR or LF is rejected (Postfix's ``550 5.5.2 Error: bare <LF>
  received``) or, with ``bare_newline = "normalize"``, taken as a line end,
  as Postfix's ``smtpd_forbid_bare_newline = normalize`` does ("process them
  as if the client sent the standard <CR><LF>"): so a line that a bare
  newline starts loses its leading dot too, and ``<LF>.<LF>`` inside the
  message becomes an empty line, never an end;
* the size limit (``max_message_size``) applies to what the client sent,
  final CRLF included, less the dots that start a line (RFC 1870 §3: the
  size leaves dot-stuffing out), and is checked first.

The gateway's real reader (``SMTPSession._read_data``) is driven through the
``asyncio.StreamReader`` its constructor makes, fed in generated TCP-like
chunks; its buffer limit (``gateway.smtp._READ_LIMIT``, 64 KiB) is made
small in some examples so the over-long-line path is exercised with short
input.  What ``SMTPUpstream.data`` writes (one ``BDAT n LAST`` with CHUNKING,
else DATA dot-stuffed) is captured from a stand-in for aiosmtplib's protocol
and decoded back by receivers of three kinds: RFC 5321, one that takes a bare
LF as a line end (Postfix with ``smtpd_forbid_bare_newline = no``, the test
Postfix 3.7's setting), and one that also takes a bare CR.
"""

from __future__ import annotations

import asyncio
import re
import types
from dataclasses import dataclass
from unittest import mock

import aiosmtplib
from hypothesis import example, given, note, settings
from hypothesis import strategies as st

import gateway.smtp
from gateway import replies
from gateway.config import Endpoint, GatewaySettings
from gateway.replies import Reply
from gateway.smtp import SMTPSession
from gateway.upstream import SMTPUpstream, _crlf

CR, LF = 0x0D, 0x0A
END = b"\r\n.\r\n"

# --- the model ---------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """What the model says the gateway must make of a DATA stream."""

    #: The message (dot-stuffing undone, CRLF line ends), if it is accepted.
    message: bytes | None = None
    #: The reply instead of accepting it, if any.
    reply: Reply | None = None
    #: The client's bytes after the end of data: its next commands.
    rest: bytes = b""
    #: No end of data at all: the session ends with nothing delivered.
    incomplete: bool = False


def split_lines(data: bytes) -> tuple[list[bytes], bytes, bool, bool]:
    """``data`` cut at every CRLF, bare CR and bare LF: (lines, what
    follows the last line end, saw a bare LF, saw a bare CR)."""
    lines: list[bytes] = []
    line = bytearray()
    bare_lf = bare_cr = False
    i = 0
    while i < len(data):
        byte = data[i]
        if byte == CR and data[i + 1 : i + 2] == b"\n":
            lines.append(bytes(line))
            line.clear()
            i += 2
            continue
        if byte in (CR, LF):
            bare_lf |= byte == LF
            bare_cr |= byte == CR
            lines.append(bytes(line))
            line.clear()
        else:
            line.append(byte)
        i += 1
    return lines, bytes(line), bare_lf, bare_cr


def model(stream: bytes, bare_newline: str, max_size: int = 10_240_000) -> Outcome:
    """What RFC 5321 (and the policy) say ``stream``, the bytes after the
    354, is."""
    wire = b"\r\n" + stream  # the CRLF that ended "DATA"
    end = wire.find(END)
    if end < 0:
        return Outcome(incomplete=True)
    raw = wire[2 : end + 2]  # the message as sent: stuffed, each line with its end
    rest = wire[end + len(END) :]
    if len(raw) - (b"\r\n" + raw).count(b"\r\n.") > max_size:
        return Outcome(reply=replies.MESSAGE_TOO_BIG, rest=rest)
    lines, tail, bare_lf, bare_cr = split_lines(raw)
    assert tail == b""  # raw ends with the CRLF before the final dot
    if (bare_lf or bare_cr) and bare_newline == "reject":
        return Outcome(reply=replies.BARE_LF if bare_lf else replies.BARE_CR, rest=rest)
    message = b"".join((line[1:] if line.startswith(b".") else line) + b"\r\n" for line in lines)
    return Outcome(message=message, rest=rest)


def crlf_model(message: bytes) -> bytes:
    """A message as it must go to the next hop: every line end a CRLF, the
    last line ended too (the next hop stores lines)."""
    lines, tail, _, _ = split_lines(message)
    return b"".join(line + b"\r\n" for line in lines) + (tail + b"\r\n" if tail else b"")


def dot_ends(payload: bytes) -> dict[str, int | None]:
    """Where receivers of three kinds see the end of data in ``payload``
    (what follows the 354): the offset just after the end, or None."""
    found: dict[str, int | None] = {}
    for name, breaks in (("rfc5321", rb"\r\n"), ("bare LF too", rb"\r?\n"), ("bare CR too", rb"\r\n|\r|\n")):
        found[name] = None
        # The DATA command's own line end comes first.
        for match in re.finditer(rb"(?:" + breaks + rb")\.(?:" + breaks + rb")", b"\r\n" + payload):
            found[name] = match.end() - 2
            break
    return found


def decode_upstream(writes: list[bytes]) -> bytes:
    """The message a receiver takes from what ``SMTPUpstream.data`` wrote."""
    first = writes[0]
    bdat = re.match(rb"BDAT (\d+) LAST\r\n", first)
    if bdat is not None:
        assert len(writes) == 1, writes
        chunk = first[bdat.end() :]
        assert int(bdat[1]) == len(chunk), (bdat[0], len(chunk))
        return chunk
    assert writes[0] == b"DATA\r\n" and len(writes) == 2, writes
    payload = writes[1]
    # Every kind of receiver sees the end where we put it, and nowhere before.
    assert set(dot_ends(payload).values()) == {len(payload)}, dot_ends(payload)
    lines, tail, bare_lf, bare_cr = split_lines(payload[: -len(b".\r\n")])
    assert not (tail or bare_lf or bare_cr), payload
    return b"".join((line[1:] if line.startswith(b".") else line) + b"\r\n" for line in lines)


# --- driving the gateway's code ---------------------------------------------


def gateway_settings(bare_newline: str, max_size: int = 10_240_000) -> GatewaySettings:
    return GatewaySettings(hostname="gw.test.example", bare_newline=bare_newline,  # type: ignore[arg-type]
                           max_message_size=max_size)


async def read_data(
    stream: bytes, cuts: list[int], config: GatewaySettings, buffer_limit: int
) -> tuple[tuple[bytes, Reply | None] | None, bytes]:
    """Feed ``stream`` cut at ``cuts`` to a real session's ``_read_data``;
    returns what it returned (None: the stream ended first) and what it
    left unread."""
    stand_in = types.SimpleNamespace(settings=config, new_upstream=lambda deadline: None)
    with mock.patch.object(gateway.smtp, "_READ_LIMIT", buffer_limit):
        session = SMTPSession(stand_in)  # type: ignore[arg-type]
    # What connection_made hands aiosmtpd's callback, which names it _reader.
    reader = session._reader = session._stream_reader
    bounds = [0, *sorted(set(cuts)), len(stream)]
    chunks = [stream[a:b] for a, b in zip(bounds, bounds[1:]) if b > a]
    async with asyncio.timeout(5):
        task = asyncio.ensure_future(session._read_data())
        for chunk in chunks:
            await asyncio.sleep(0)  # the reader takes what has come so far
            reader.feed_data(chunk)
        await asyncio.sleep(0)
        reader.feed_eof()
        try:
            result = await task
        except asyncio.IncompleteReadError:
            result = None
        return result, await reader.read()


class RecordingWire:
    """Stands in for aiosmtplib's protocol under ``SMTPUpstream``: keeps
    what is written, answers as Postfix does."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.transport = None
        self.is_connected = True
        self.stray = b""  # the next hop never speaks out of turn here

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))

    async def read_response(self, timeout: float | None = None) -> aiosmtplib.SMTPResponse:
        if self.writes[-1] == b"DATA\r\n":
            return aiosmtplib.SMTPResponse(354, "End data with <CR><LF>.<CR><LF>")
        return aiosmtplib.SMTPResponse(250, "2.0.0 Ok: queued as 4AB12C0F3D")


async def send_upstream(message: bytes, chunking: bool) -> tuple[Reply, list[bytes]]:
    config = gateway_settings("reject")
    upstream = SMTPUpstream(Endpoint.parse("127.0.0.1:25", maildir_ok=False), config)
    wire = RecordingWire()
    upstream._smtp = wire  # type: ignore[assignment]
    upstream.extensions = frozenset({"chunking", "pipelining"} if chunking else {"pipelining"})
    envelope = None  # data() does not look at it
    reply = await upstream.data(envelope, message)  # type: ignore[arg-type]
    return reply, wire.writes


# --- generated streams -------------------------------------------------------

#: Pieces a DATA stream is built from: line ends of every kind, the end
#: markers real and smuggled, dots, NUL and 8-bit bytes, command text.
PIECES = [
    b"\r\n", b"\n", b"\r", b".", b"..", b"\r\n.\r\n", b"\n.\n", b"\r.\r", b"\n.\r\n", b"\r\n.\n",
    b"\r.\r\n", b"\r\n.\r", b"\r\n..\r\n", b"\n..\n", b"\x00", b"\xff\xfe\x80", b"\xc3\xa4",
    b"text", b" ", b"\t", b"From: bob@example.org", b"MAIL FROM:<evil@example.org>",
    b"RCPT TO:<bob@example.com>", b"DATA", b"QUIT", b"BDAT 5 LAST",
]
piece = st.one_of(
    st.sampled_from(PIECES),
    st.binary(max_size=6),
    st.integers(1, 3000).map(lambda n: b"y" * n),  # long lines
)
#: Lines as a conforming client sends them: CRLF only, dot-stuffed.
clean_line = st.lists(st.sampled_from([b".", b"..", b"x", b"\x00", b"\xe2\x82\xac", b" "]), max_size=5).map(
    lambda parts: b"".join(parts)
).map(lambda line: (b"." + line if line.startswith(b".") else line) + b"\r\n")
body = st.one_of(
    st.lists(piece, max_size=25).map(b"".join),
    st.lists(clean_line, max_size=10).map(b"".join),
    st.lists(st.one_of(clean_line, piece), max_size=15).map(b"".join),
)
ending = st.sampled_from([END, END, b".\r\n", b"", b"\n.\n", b"\r\n.\r"])
after = st.sampled_from([b"", b"QUIT\r\n", b"MAIL FROM:<evil@example.org>\r\n", b".\r\n", END])


@st.composite
def data_streams(draw: st.DrawFn) -> tuple[bytes, list[int]]:
    """A stream sent after the 354, and where TCP cut it."""
    stream = draw(body) + draw(ending) + draw(after)
    cuts = draw(st.lists(st.integers(0, len(stream)), max_size=12))
    return stream, cuts


# --- properties --------------------------------------------------------------


@settings(max_examples=300)
@given(
    data_streams(),
    st.sampled_from(["reject", "normalize"]),
    st.sampled_from([gateway.smtp._READ_LIMIT, 4, 5, 7, 16, 64]),
    st.one_of(st.just(10_240_000), st.integers(1, 120)),
)
@example((b"a\n.\nMAIL FROM:<evil@example.org>\r\n\r\n.\r\n", []), "normalize", 64, 10_240_000)
@example((b".\r\nQUIT\r\n", [1, 2]), "reject", gateway.smtp._READ_LIMIT, 10_240_000)
@example((b"x" * 40 + b"\r\n.\r\n", [41]), "reject", 5, 10_240_000)
def test_reader_agrees_with_the_model_for_every_chunking(
    stream_and_cuts: tuple[bytes, list[int]], bare_newline: str, buffer_limit: int, max_size: int
) -> None:
    stream, cuts = stream_and_cuts
    expected = model(stream, bare_newline, max_size)
    note(f"model: {expected}")
    result, left = asyncio.run(read_data(stream, cuts, gateway_settings(bare_newline, max_size), buffer_limit))
    if expected.incomplete:
        assert result is None
        return
    assert result is not None
    message, problem = result
    assert problem == expected.reply
    if problem is None:
        assert message == expected.message
    else:
        assert message == b""
    # The reader stopped exactly at the end of data: what follows is read
    # as the client's next commands, nothing inside the message is.
    assert left == expected.rest


@settings(max_examples=200)
@given(st.lists(piece, max_size=25).map(b"".join), st.booleans())
@example(b".", False)
@example(b"\r\n.", False)
@example(b"a\n.\nMAIL FROM:<evil@example.org>\n", False)
@example(b"a\r.\r", False)
@example(b"", True)
def test_what_goes_upstream_decodes_to_the_message(message: bytes, chunking: bool) -> None:
    # Any message, including headers a plugin wrote with a bare LF: the next
    # hop gets it with CRLF line ends and nothing else changed, and no
    # receiver, however lenient, finds an end of data before ours.
    reply, writes = asyncio.run(send_upstream(message, chunking))
    assert reply.code == 250
    assert decode_upstream(writes) == crlf_model(message)
    assert writes[0].startswith(b"BDAT " if chunking else b"DATA\r\n")


@settings(max_examples=150)
@given(data_streams(), st.sampled_from(["reject", "normalize"]), st.booleans())
def test_the_client_message_reaches_the_next_hop_unchanged(
    stream_and_cuts: tuple[bytes, list[int]], bare_newline: str, chunking: bool
) -> None:
    # Reader, then next hop, as smtp_DATA chains them (with no plugin
    # adding or removing header fields): the bytes a receiver decodes are
    # the model's message.
    stream, cuts = stream_and_cuts
    expected = model(stream, bare_newline)
    if expected.message is None:
        return  # rejected or incomplete: the test above checks those
    result, _ = asyncio.run(read_data(stream, cuts, gateway_settings(bare_newline), gateway.smtp._READ_LIMIT))
    assert result is not None and result[1] is None
    _, writes = asyncio.run(send_upstream(result[0], chunking))
    assert decode_upstream(writes) == expected.message


@settings(max_examples=150)
@given(data_streams(), st.sampled_from(["reject", "normalize"]))
def test_the_reader_hands_on_crlf_lines_only(stream_and_cuts: tuple[bytes, list[int]], bare_newline: str) -> None:
    # smtp_DATA passes what the reader made to the next hop with
    # data(crlf=True), which then does not repair line ends: none may need it.
    stream, cuts = stream_and_cuts
    result, _ = asyncio.run(read_data(stream, cuts, gateway_settings(bare_newline), gateway.smtp._READ_LIMIT))
    if result is None or result[1] is not None:
        return  # refused or incomplete: nothing goes on
    assert _crlf(result[0]) == result[0]


# --- the model itself, on cases whose answer is known -----------------------


def test_the_model_on_known_cases() -> None:
    assert model(b".\r\n", "reject") == Outcome(message=b"")
    assert model(b"a\r\n..b\r\n.\r\nQUIT\r\n", "reject") == Outcome(message=b"a\r\n.b\r\n", rest=b"QUIT\r\n")
    assert model(b"a\n.\nb\r\n.\r\n", "reject").reply == replies.BARE_LF
    assert model(b"a\r.\rb\r\n.\r\n", "reject").reply == replies.BARE_CR
    assert model(b"a\n.\nb\r\n.\r\n", "normalize") == Outcome(message=b"a\r\n\r\nb\r\n")
    assert model(b"a\n.\n", "normalize") == Outcome(incomplete=True)
    assert model(b"abc\r\n.\r\n", "reject", max_size=4) == Outcome(reply=replies.MESSAGE_TOO_BIG)
    assert model(b"..ab\r\n.\r\n", "reject", max_size=5) == Outcome(message=b".ab\r\n")
    assert model(b"..abc\r\n.\r\n", "reject", max_size=5) == Outcome(reply=replies.MESSAGE_TOO_BIG)
    assert dot_ends(b"a\n.\nb\r\n.\r\n") == {"rfc5321": 10, "bare LF too": 4, "bare CR too": 4}


def test_lines_that_end_in_a_dot_cost_no_read_each() -> None:
    # Read up to ".\r\n" alone, a stream of "x.\r\n" lines took a read per
    # four bytes (a 10 MB message, seconds of CPU); up to the whole end
    # marker, the reads depend on the buffer, not the lines.
    reads = 0
    readuntil = asyncio.StreamReader.readuntil

    async def counted(self: asyncio.StreamReader, separator: bytes = b"\n") -> bytes:
        nonlocal reads
        reads += 1
        return await readuntil(self, separator)

    lines = b"x.\r\n" * 10_000
    with mock.patch.object(asyncio.StreamReader, "readuntil", counted):
        result, rest = asyncio.run(read_data(lines + b".\r\nQUIT\r\n", [], gateway_settings("reject"), 65536))
    assert result == (lines, None) and rest == b"QUIT\r\n"
    assert reads == 1


def test_an_empty_message_ends_at_once() -> None:
    # The line end of the DATA command is the end marker's first CRLF: a
    # client that sends ".\r\n" and waits must get its reply.
    result, rest = asyncio.run(read_data(b".\r\nQUIT\r\n", [], gateway_settings("reject"), 65536))
    assert result == (b"", None) and rest == b"QUIT\r\n"
