"""The SMTP front's dialogue under arbitrary command streams (hypothesis).

Sessions are drawn from valid, invalid and odd commands, sent one at a time
or several in one write (RFC 2920 pipelining), through the gateway to the
real Postfix.  Whatever the client sends, a mail administrator relies on:

1. one reply per command, in order, until QUIT's 221 or a 421 that ends the
   session (a multi-line reply counts once), and nothing after the close;
2. every reply well-formed (RFC 5321 §4.2), with an RFC 3463 enhanced code
   of the reply's class on every line, except where RFC 2034 §3 exempts it:
   the greeting (and the 220 that answers XCLIENT, a new greeting), any
   reply to HELO/EHLO, and 3yz (354);
3. nothing lost, nothing invented: the end of DATA is answered 2yz if and
   only if Postfix queued that message, with Postfix's own "queued as" reply,
   and Postfix queues no message the client was not told 250 for;
4. no internal error in the gateway's log, and the next session works.

Where the gateway alone decides (NOOP, HELP, RSET, VRFY, EXPN, unknown or
malformed lines, sequence errors, XCLIENT) the exact reply code is checked
against a small model of the session, and the error limit (``max_errors``)
ends the session exactly when the count of 4yz/5yz replies (and of junk
commands past ``max_junk_commands``) since the last delivery reaches it.
Two gateways run side by side: the default policy and a strict one (low
limits, bare newlines normalised), each example using one of them.
"""

from __future__ import annotations

import itertools
import logging
import re
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from hypothesis import event, given, note, settings
from hypothesis import strategies as st

from gateway import replies
from tests.fixtures.gateway import OUTSIDE_IP, TRUSTED_IP, GatewayThread, recv_reply
from tests.fixtures.postfix import QUEUED, PostfixInstance

#: Every socket read; a missing reply fails the example after this long.
#: Passing runs never wait it out, so it is set for a slow CI machine (Postfix
#: itself sleeps 1 s per reply once a session has made 10 errors).
TIMEOUT = 5.0
#: Every bounded wait for the gateway or Postfix to finish.
SETTLE = 5.0
#: Upper bound on socket reads for one reply (the longest is EHLO's).
MAX_READS = 1000

HOSTNAME = "gw.test.example"
TOO_MANY_ERRORS = replies.TOO_MANY_ERRORS.format(hostname=HOSTNAME).wire().rstrip(b"\r\n")

#: Limits of the second gateway: low enough for sessions this short to meet them.
STRICT = {
    "max_errors": 6,
    "max_junk_commands": 3,
    "max_line_length": 512,
    "max_message_size": 2000,
    "max_recipients": 2,
    "bare_newline": "normalize",
}

_LINE = re.compile(rb"([2-5][0-9][0-9])(?:([ -])(.*))?", re.DOTALL)
_ENHANCED = re.compile(rb"([245])\.[0-9]{1,3}\.[0-9]{1,3}(?: |\Z)")
_LOOKS_ENHANCED = re.compile(rb"[0-9]+\.[0-9]+\.[0-9]+(?: |\Z)")
_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_QUEUE_ID = re.compile(rb"queued as ([0-9A-Za-z]+)")
_QMGR_FROM = re.compile(r"([0-9A-Za-z]+): from=<")
_NOTIFICATION = re.compile(r"notification: ([0-9A-Za-z]+)$")


# --- what the client sends -------------------------------------------------


@dataclass(frozen=True)
class Cmd:
    """One command line (without its line end) and what the model knows of it.

    ``kind`` names the command for the model (see :class:`Model`); ``body``
    is what a DATA sends after a 354, the final ``.`` included.
    """

    line: bytes
    kind: str
    end: bytes = b"\r\n"
    body: bytes = b""

    def wire(self) -> bytes:
        return self.line + self.end


def verb(name: str) -> st.SearchStrategy[bytes]:
    """A verb as clients write it: mostly upper case (RFC 5321 §2.4)."""
    return st.sampled_from([name, name, name.lower(), name.title()]).map(str.encode)


line_end = st.sampled_from([b"\r\n", b"\r\n", b"\r\n", b"\n"])

# A name too long for Postfix's XCLIENT HELO= still lets mail through (the
# gateway sends [UNAVAILABLE] there; the EHLO that follows has the name).
HELO_NAMES = [
    "client.example.net", "mx-1.example.org", "x", "localhost", "[127.0.0.1]",
    "[IPv6:2001:db8::1]", "-", "under_score.example", "ex\u00e4mple.net", "a\tb",
    "  padded.example  ", "a" * 300,
]
HELO_BAD = [None, "a b", "  "]

SENDERS = [
    "<bob@example.org>", "<>", "<alice@example.com>", "bob@example.org",
    "<@relay.example:bob@example.org>", "<bob@[192.0.2.1]>", '<"b o b"@example.org>',
    "<bob@example.org", "<a b@example.org>", "<bob>", "<\u00fc@example.org>",
    "<bob@example.org>junk", "<<>>",
]
GOOD_SENDERS = SENDERS[:7]
MAIL_PARAMS = [
    "SIZE=100", "SIZE=3000", "SIZE=99999999999", "SIZE=x", "SIZE=", "BODY=7BIT",
    "BODY=8BITMIME", "BODY=BINARYMIME", "SMTPUTF8", "SMTPUTF8=yes", "RET=FULL",
    "RET=HDRS", "RET=NONE", "ENVID=probe+2B1", "ENVID=\u00e4", "FOO=bar", "X-UNKNOWN", "=x",
]
GOOD_MAIL_PARAMS = ["SIZE=100", "BODY=7BIT", "BODY=8BITMIME", "SMTPUTF8", "RET=HDRS", "ENVID=probe+2B1"]
RECIPIENTS = [
    "<alice@example.com>", "<bob@example.com>", "<ALICE@Example.COM>", "<Postmaster>",
    "<carol@remote.example>", "<nobody@example.com>", "<bob@example.com.>", "<a@b@example.com>",
    "<>", "alice@example.com", "<@relay.example:bob@example.com>",
    "<alice%remote.example@example.com>", "<\u00fc@example.com>", "<alice@example.com",
]
GOOD_RECIPIENTS = RECIPIENTS[:5]
RCPT_PARAMS = [
    "NOTIFY=SUCCESS", "NOTIFY=FAILURE,DELAY", "NOTIFY=NEVER", "NOTIFY=NEVER,SUCCESS",
    "NOTIFY=bogus", "ORCPT=rfc822;alice@example.com", "ORCPT=bad", "FOO=1",
]
XCLIENT_GOOD = [
    f"ADDR={OUTSIDE_IP}", f"ADDR={TRUSTED_IP}", "ADDR=127.0.0.1", "ADDR=IPV6:::ffff:192.0.2.9",
    "NAME=mail.example.net", "NAME=[UNAVAILABLE]", "NAME=[TEMPUNAVAIL]", "REVERSE_NAME=mail.example.net",
    "REVERSE_NAME=[TEMPUNAVAIL]", "PORT=2525", "PORT=[UNAVAILABLE]", "HELO=mx.example.net",
    "HELO=[UNAVAILABLE]", "PROTO=ESMTP", "PROTO=smtp", "DESTADDR=192.0.2.1", "DESTPORT=25",
]
# Values Postfix's own XCLIENT refuses are refused here too (taken, they
# would make the next hop unavailable for the client).  An IPv6 ADDR is left
# out: this Postfix (inet_protocols = ipv4) refuses it, reported as 421.
XCLIENT_BAD = [
    "ADDR=not-an-ip", "PORT=x", "PROTO=LMTP", "FOO=bar", "ADDR", "NAME",
    "NAME=a+20b", "NAME=-", "NAME=a..b", "NAME=12.34", "PORT=-1", "PORT=99999",
    "NAME=" + "a" * 300, "HELO=" + "a" * 300,
    # Every check judges the address; and we take no word for who logged in.
    "ADDR=[UNAVAILABLE]", "ADDR=[TEMPUNAVAIL]", "LOGIN=user",
    "DESTADDR=bogus", "DESTPORT=x", "ADDR=::ffff:192.0.2.9",
]
#: (verb, arguments, kind): the commands the gateway answers alone.
SIMPLE = [
    ("NOOP", ["", " ignored argument"], "noop"), ("HELP", ["", " MAIL"], "help"), ("RSET", [""], "rset"),
    ("RSET", [" now"], "rset-arg"), ("VRFY", [" alice", " <alice@example.com>"], "vrfy"),
    ("VRFY", [""], "vrfy-noarg"), ("EXPN", [" staff"], "expn"), ("EXPN", [""], "expn-noarg"),
    ("QUIT", [" now"], "quit-arg"),
]
#: Lines that are no command at all.
UNKNOWN = [
    b"FOO", b"STARTTLS", b"AUTH PLAIN AGFsaWNlAHNlY3JldA==", b"BDAT 10 LAST", b"TURN",
    b"ETRN example.com", b"\xffFOO", b"MAILFROM:<bob@example.org>", b" NOOP", b"NOOP\tx", b"",
    b"X" * 3000,
    # Not UTF-8: Postfix's "500 5.5.2 Error: bad UTF-8 syntax", whatever the verb.
    b"EHLO \xff\xfe.example", b"XCLIENT NAME=\xff", b"VRFY \xff", b"MAIL FROM:<\xc3@example.org> SMTPUTF8",
]
#: Commands answered otherwise but for a control byte (CR, NUL, ESC, DEL).
CONTROL = [
    b"NOOP \x00", b"HELO a\rb.example", b"EHLO x\x7f.example", b"MAIL FROM:<a\x00@example.org>",
    b"RSET \x00", b"VRFY a\x1bb", b"DATA \x00", b"QUIT \x00",
]

BODY_LINES = [
    b"Subject: probe", b"From: bob@example.org", b"", b"hello", b".", b"..", b".leading dot",
    b"MAIL FROM:<evil@example.org>", b"RSET", b"QUIT", "Gr\u00fc\u00dfe".encode(), b"nul\x00byte",
    b"\tfolded", b"x" * 200,
]


@st.composite
def bodies(draw: st.DrawFn) -> bytes:
    """A message as a client sends it: dot-stuffed, ended by CRLF.CRLF.

    Lines end mostly in CRLF, sometimes in a bare LF or CR (the default
    gateway refuses those, the strict one normalises them); some bodies
    are over the strict gateway's size limit.
    """
    out = b""
    for text, end in draw(st.lists(st.tuples(st.sampled_from(BODY_LINES), line_end | st.just(b"\r")), max_size=6)):
        # Stuffed whatever follows: "." then a bare CR then an empty line
        # ended by LF would otherwise end the message early.
        out += (b"." + text if text.startswith(b".") else text) + end
    if draw(st.integers(0, 5)) == 0:
        out += b"y" * 76 * 40 + b"\r\n"
    if out and not out.endswith(b"\r\n"):
        out += b"\r\n"
    return out + b".\r\n"


@st.composite
def helo(draw: st.DrawFn, valid: bool | None = None) -> list[Cmd]:
    good = draw(st.booleans()) if valid is None else valid
    name = draw(st.sampled_from(HELO_NAMES if good else HELO_BAD))
    line = draw(st.sampled_from(["EHLO", "HELO"]).flatmap(verb))
    if name is not None:
        line += b" " + name.encode()
    return [Cmd(line, "helo" if good else "helo-bad", draw(line_end))]


def _keyword(param: str) -> str:
    return param.split("=", 1)[0]


def _with_params(head: bytes, params: list[str]) -> bytes:
    return head + b"".join(b" " + p.encode() for p in params)


@st.composite
def mail(draw: st.DrawFn, valid: bool = False) -> list[Cmd]:
    keyword = "FROM:" if valid else draw(st.sampled_from(["FROM:", "FROM:", "from:", "FROM: ", "TO:", "FROM"]))
    sender = draw(st.sampled_from(GOOD_SENDERS if valid else SENDERS))
    # Duplicates allowed: Postfix's replies to them are passed on verbatim.
    params = draw(st.lists(st.sampled_from(GOOD_MAIL_PARAMS), max_size=3, unique_by=_keyword) if valid
                  else st.lists(st.sampled_from(MAIL_PARAMS), max_size=3))
    if draw(st.integers(0, 9)) == 0 and not valid:
        sender = "<" + "a" * 600 + "@example.org>"  # a line too long for the strict gateway
    line = _with_params(draw(verb("MAIL")) + b" " + f"{keyword}{sender}".encode(), params)
    return [Cmd(line, "mail", draw(line_end))]


@st.composite
def rcpt(draw: st.DrawFn, valid: bool = False) -> list[Cmd]:
    keyword = "TO:" if valid else draw(st.sampled_from(["TO:", "TO:", "to:", "TO: ", "FROM:"]))
    recipient = draw(st.sampled_from(GOOD_RECIPIENTS if valid else RECIPIENTS))
    params = draw(st.lists(st.sampled_from(RCPT_PARAMS[:3]), max_size=1) if valid
                  else st.lists(st.sampled_from(RCPT_PARAMS), max_size=2))
    line = _with_params(draw(verb("RCPT")) + b" " + f"{keyword}{recipient}".encode(), params)
    return [Cmd(line, "rcpt", draw(line_end))]


@st.composite
def data(draw: st.DrawFn, valid: bool = False) -> list[Cmd]:
    with_arg = not valid and draw(st.integers(0, 4)) == 0
    line = draw(verb("DATA")) + (b" now" if with_arg else b"")
    return [Cmd(line, "data-arg" if with_arg else "data", draw(line_end), draw(bodies()))]


@st.composite
def simple(draw: st.DrawFn, name: str, args: list[str], kind: str) -> list[Cmd]:
    arg = draw(st.sampled_from(args)).encode()
    return [Cmd(draw(verb(name)) + arg, kind, draw(line_end))]


@st.composite
def xclient(draw: st.DrawFn) -> list[Cmd]:
    attrs = draw(st.lists(st.sampled_from(XCLIENT_GOOD), min_size=1, max_size=3))
    bad = draw(st.booleans())
    if bad:
        attrs.insert(draw(st.integers(0, len(attrs))), draw(st.sampled_from(XCLIENT_BAD)))
        if draw(st.integers(0, 3)) == 0:
            attrs = []  # XCLIENT without attributes
    line = _with_params(draw(verb("XCLIENT")), attrs)
    return [Cmd(line, "xclient-bad" if bad else "xclient", draw(line_end))]


@st.composite
def junk(draw: st.DrawFn) -> list[Cmd]:
    """Unknown verbs, empty lines, control bytes, over-long lines."""
    sort = draw(st.sampled_from(["unknown", "control", "long"]))
    if sort != "long":
        return [Cmd(draw(st.sampled_from(UNKNOWN if sort == "unknown" else CONTROL)), "junk", draw(line_end))]
    # A NOOP: over the strict gateway's limit, over both, over the reader's 64 KiB.
    length = draw(st.sampled_from([600, 2100, 70_000]))
    return [Cmd(b"NOOP " + b"x" * length, "noop", draw(line_end))]


@st.composite
def transaction(draw: st.DrawFn) -> list[Cmd]:
    """MAIL, RCPT and DATA that Postfix would accept, so messages do flow
    (unless what came before spoils it: no EHLO, a transaction open, ...);
    now and then abandoned with RSET instead of DATA, as address
    verification probes do."""
    cmds = [Cmd(draw(verb("EHLO")) + b" client.example.net", "helo", draw(line_end))] if draw(st.booleans()) else []
    cmds += draw(mail(valid=True))
    for part in draw(st.lists(rcpt(valid=True), min_size=1, max_size=2)):
        cmds += part
    if draw(st.integers(0, 3)) == 0:
        return cmds + [Cmd(draw(verb("RSET")), "rset", draw(line_end))]
    return cmds + draw(data(valid=True))


@st.composite
def sessions(draw: st.DrawFn) -> list[Cmd]:
    """Whole transactions, so that messages do reach Postfix in most
    sessions, mixed with a few odd commands, each of another sort (so that
    sixty sessions meet every sort), then QUIT."""
    odd = draw(st.lists(st.sampled_from(ODD), min_size=2, max_size=7, unique=True))
    parts = [draw(strategy) for strategy in odd] + draw(st.lists(transaction(), min_size=1, max_size=3))
    cmds = draw(helo(valid=True)) if draw(st.integers(0, 4)) else []
    for n in draw(st.permutations(range(len(parts)))):
        cmds += parts[n]
    return cmds + [Cmd(draw(verb("QUIT")), "quit", draw(line_end))]


ODD = [helo(), mail(), rcpt(), data(), xclient(), junk(), junk(), *(simple(*entry) for entry in SIMPLE)]


# --- what the gateway should say ------------------------------------------

#: Commands the gateway answers alone, always with this code.
EXACT = {"noop": 250, "help": 214, "rset": 250, "vrfy": 502, "expn": 502, "quit": 221, "helo": 250}
#: Commands that count as junk (max_junk_commands), whatever their reply.
JUNK = {"noop", "help", "rset", "rset-arg", "vrfy", "vrfy-noarg", "expn", "expn-noarg"}
#: Protocol errors, always with this code.
ERRORS = {"junk": 500, "rset-arg": 501, "vrfy-noarg": 501, "expn-noarg": 501, "quit-arg": 501,
          "data-arg": 501, "helo-bad": 501}


@dataclass(frozen=True)
class Expect:
    """What the model knows of the reply to one command."""

    #: The code, where the gateway alone decides.
    code: int | None = None
    #: A code it must not be.
    not_code: int | None = None
    #: A protocol error for certain (a MAIL or RCPT argument the model
    #: does not judge may be one too).
    error: bool = False


class Model:
    """What the session's state lets us predict, from the replies seen."""

    def __init__(self, gw: GatewayThread):
        self.max_errors = gw.policy.gateway.max_errors
        self.max_junk = gw.policy.gateway.max_junk_commands
        self.junk = 0
        self.max_line_length = gw.policy.gateway.max_line_length
        self.greeted = False
        self.transaction = False
        self.recipients = 0
        #: Every 4yz/5yz reply counts, and junk past its limit, until a
        #: delivery: counted from the replies seen, so exact.
        self.errors = 0

    def kind(self, cmd: Cmd) -> str:
        if cmd.kind != "body" and len(cmd.wire()) > self.max_line_length:
            return "junk"
        return cmd.kind

    def expect(self, cmd: Cmd) -> Expect:
        kind = self.kind(cmd)
        if kind in EXACT:
            return Expect(EXACT[kind])
        if kind in ERRORS:
            return Expect(ERRORS[kind], error=True)
        # Where the gateway has no sequence error to report, there is none:
        # Postfix, in step with it, says no 503 either.
        if kind == "mail":
            in_order = self.greeted and not self.transaction
            return Expect(not_code=503) if in_order else Expect(503, error=True)
        if kind == "rcpt":
            return Expect(not_code=503) if self.transaction else Expect(503, error=True)
        if kind == "data":
            if self.transaction:  # Postfix's 554 for a transaction without recipients
                return Expect(354) if self.recipients else Expect(554, error=True)
            return Expect(503, error=True)
        if kind in ("xclient", "xclient-bad"):
            if self.transaction:
                return Expect(503, error=True)
            return Expect(220) if kind == "xclient" else Expect(501, error=True)
        assert kind == "body"
        return Expect()

    def observe(self, cmd: Cmd, code: int) -> None:
        kind = self.kind(cmd)
        if kind in JUNK:
            self.junk += 1
            self.errors += self.junk > self.max_junk
        self.errors += code >= 400
        if kind == "body" and code == 250:
            self.errors = self.junk = 0
        if kind == "helo" and code == 250 or kind == "rset" and code == 250 or kind == "body":
            self.transaction, self.recipients = False, 0
        if kind == "helo" and code == 250:
            self.greeted = True
        elif kind == "mail" and code == 250:
            self.transaction, self.recipients = True, 0
        elif kind == "rcpt" and code < 400:
            self.recipients += 1
        elif kind == "xclient" and code == 220:
            self.greeted, self.transaction, self.recipients = False, False, 0


def check_reply(lines: list[bytes], *, exempt: bool) -> int:
    """Property 2 for one reply; its code."""
    codes = set()
    for n, line in enumerate(lines):
        match = _LINE.fullmatch(line)
        assert match, f"malformed reply line {line!r}"
        code, separator, text = match[1], match[2], match[3] or b""
        codes.add(code)
        assert separator == (b"-" if n < len(lines) - 1 else b" ") or (n == len(lines) - 1 and separator is None), (
            f"bad continuation in {lines!r}")
        assert not _CONTROL.search(text), f"control byte in reply {line!r}"
        enhanced = _ENHANCED.match(text)
        if not exempt:
            assert enhanced, f"no enhanced status code in {line!r} (RFC 2034 §3)"
        if enhanced or _LOOKS_ENHANCED.match(text):
            assert enhanced and enhanced[1] == code[:1], f"enhanced code of the wrong class in {line!r}"
    assert len(codes) == 1, f"one reply, several codes: {lines!r}"
    return int(codes.pop())


# --- the client ------------------------------------------------------------


class Wire:
    """A client socket reading one reply at a time: pipelined replies may
    arrive together, or split anywhere."""

    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        self.buf = b""
        self.eof = False

    def close(self) -> None:
        self.sock.close()

    def send(self, payload: bytes) -> None:
        try:
            self.sock.sendall(payload)
        except OSError:
            pass  # closed by the gateway: the replies it did send are still to be read

    def _fill(self) -> bool:
        if self.eof:
            return False
        try:
            chunk = self.sock.recv(65536)
        except ConnectionResetError:
            chunk = b""
        self.buf += chunk
        self.eof = not chunk
        return bool(chunk)

    def reply(self) -> list[bytes] | None:
        """The next reply's lines, or None once the gateway has closed."""
        lines: list[bytes] = []
        for _ in range(MAX_READS):
            while b"\r\n" in self.buf:
                line, self.buf = self.buf.split(b"\r\n", 1)
                lines.append(line)
                if line[3:4] != b"-":  # a last line, or garbage check_reply rejects
                    return lines
            if not self._fill():
                assert not lines and not self.buf, f"connection closed inside a reply: {lines!r} {self.buf!r}"
                return None
        raise AssertionError(f"no end to a reply after {MAX_READS} reads: {lines!r}")


def _show(data: bytes) -> str:
    return repr(data if len(data) <= 90 else data[:60] + b"...(%d bytes)" % len(data))


def converse(gw: GatewayThread, cmds: list[Cmd], pipelined: bool, sizes: list[int]) -> list[bytes]:
    """Run one session, checking properties 1 and 2 and the model as the
    replies come; the queue ids of the messages the client was told 250 for."""
    model = Model(gw)
    queued: list[bytes] = []
    transcript: list[str] = []

    def fail(message: str) -> str:
        return message + "\n" + "\n".join(transcript)

    wire = Wire(gw.port)
    try:
        greeting = wire.reply()
        assert greeting is not None and check_reply(greeting, exempt=True) == 220, greeting
        group_sizes = itertools.cycle(sizes if pipelined else [1])
        body: Cmd | None = None  # a message to send once its DATA got 354
        i = 0
        while i < len(cmds) or body is not None:
            group: list[Cmd] = []
            if body is not None:
                group.append(body)
                body = None
            if pipelined or not group:
                # The message goes in the same write as the commands after it.
                for _ in range(next(group_sizes)):
                    if i == len(cmds):
                        break
                    group.append(cmds[i])
                    i += 1
                    if group[-1].kind == "data":
                        break  # RFC 2920 §3.1: the client waits for DATA's 354
            wire.send(b"".join(c.wire() for c in group))
            transcript.append(f"C: {_show(b''.join(c.wire() for c in group))}")
            for cmd in group:
                try:
                    lines = wire.reply()
                except TimeoutError:
                    raise AssertionError(fail(f"no reply to {_show(cmd.line)} within {TIMEOUT:g}s")) from None
                assert lines is not None, fail(f"no reply to {_show(cmd.line)}: connection closed")
                transcript.append("S: " + " / ".join(_show(line) for line in lines))
                kind = model.kind(cmd)
                code = check_reply(lines, exempt=kind in ("helo", "helo-bad") or lines[0][:1] == b"3"
                                   or kind == "xclient" and lines[0][:3] == b"220")
                expect = model.expect(cmd)
                if code == 421:
                    # The only 421 while the next hop is up: the error limit,
                    # reached by the reply before, said before this command
                    # was read (as Postfix says it).
                    assert lines == [TOO_MANY_ERRORS], fail(f"unexpected 421 to {_show(cmd.line)}")
                    assert model.errors >= model.max_errors, fail(
                        f"421 after {model.errors} errors of {model.max_errors}")
                else:
                    assert model.errors < model.max_errors, fail(
                        f"error {model.errors} of at most {model.max_errors} did not end the session")
                    assert expect.code in (None, code) and code != expect.not_code, fail(
                        f"{_show(cmd.line)}: expected {expect}, got {code}")
                    assert not expect.error or code >= 400, fail(f"{_show(cmd.line)}: an error answered {code}")
                if kind == "body" and code < 400:
                    assert QUEUED.match(lines[0]), fail(f"end of data answered {lines[0]!r}, not by Postfix")
                    queue_id = _QUEUE_ID.search(lines[0])
                    assert queue_id is not None
                    queued.append(queue_id[1])
                if kind == "data" and code == 354:
                    body = Cmd(cmd.body, "body", b"")
                model.observe(cmd, code)
                event(f"reply {code}")
                event(f"command {kind}")
                if code == 421 or kind == "quit":
                    # Property 1: nothing after the reply that ends the session,
                    # and the end itself.
                    try:
                        assert wire.reply() is None, fail("a reply after the session ended")
                    except TimeoutError:
                        raise AssertionError(fail(f"still open {TIMEOUT:g}s after {code}")) from None
                    return queued
            if model.errors >= model.max_errors:
                # The group's last reply reached the limit: the 421 follows
                # unasked, and the session ends.
                try:
                    lines = wire.reply()
                    assert lines == [TOO_MANY_ERRORS], fail(f"after error {model.errors}: {lines!r}")
                    assert wire.reply() is None, fail("a reply after the session ended")
                except TimeoutError:
                    raise AssertionError(fail(f"no 421 {TIMEOUT:g}s after error {model.errors}")) from None
                transcript.append(f"S: {_show(lines[0])}")
                return queued
            assert wire.buf == b"", fail(f"more replies than commands: {wire.buf!r}")
        raise AssertionError(fail("the session did not end at QUIT"))
    finally:
        wire.close()


# --- Postfix's side and the gateway's log -----------------------------------


def settle(gateways: list[GatewayThread], postfix: PostfixInstance) -> None:
    """Bounded wait until every gateway session has finished and Postfix
    has queued, delivered and logged everything it was given."""
    deadline = time.monotonic() + SETTLE
    while any(gw.gateway is not None and gw.gateway.sessions for gw in gateways):
        assert time.monotonic() < deadline, "gateway sessions still open"
        time.sleep(0.005)
    # The fixture's own steps of clear(), without its truncation of the log.
    postfix.settle()


def committed(postfix: PostfixInstance) -> set[bytes]:
    """Queue ids of the messages Postfix accepted from a client (its own
    delivery notifications, for NOTIFY=SUCCESS, left out)."""
    ids, notifications = set(), set()
    for entry in postfix.log_entries():
        match = _QMGR_FROM.match(entry["msg"])
        if entry["prog"] == "postfix/qmgr" and match:
            ids.add(match[1].encode())
        match = _NOTIFICATION.search(entry["msg"])
        if match:
            notifications.add(match[1].encode())
    return ids - notifications


def next_session_works(gw: GatewayThread) -> None:
    sock = gw.raw(timeout=TIMEOUT)
    with sock:
        sock.sendall(b"EHLO probe.example\r\n")
        assert recv_reply(sock).startswith(b"250-" + HOSTNAME.encode())
        sock.sendall(b"QUIT\r\n")
        assert recv_reply(sock) == b"221 2.0.0 Bye\r\n"


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def gateway_errors() -> Iterator[list[logging.LogRecord]]:
    """ERROR records of the gateway (and of asyncio, for a task that died
    unseen), from the gateway's thread as well as ours."""
    handler = _Records()
    loggers = [logging.getLogger("smtpgate"), logging.getLogger("asyncio")]
    for logger in loggers:
        logger.addHandler(handler)
    yield handler.records
    for logger in loggers:
        logger.removeHandler(handler)


@pytest.fixture
def gateways(start_gateway, postfix: PostfixInstance) -> dict[bool, GatewayThread]:
    """The default gateway and the strict one, both in front of Postfix."""
    upstream = f"127.0.0.1:{postfix.port}"
    return {False: start_gateway(upstream), True: start_gateway(upstream, **STRICT)}


# --- the properties -----------------------------------------------------------


@settings(max_examples=60)
@given(
    cmds=sessions(),
    pipelined=st.booleans(),
    sizes=st.lists(st.integers(1, 6), min_size=1, max_size=3),
    strict=st.sampled_from([False, False, True]),
)
def test_dialogue_properties(gateways, postfix, gateway_errors, cmds, pipelined, sizes, strict) -> None:
    postfix.clear()
    gateway_errors.clear()
    gw = gateways[strict]
    queued = converse(gw, cmds, pipelined, sizes)
    next_session_works(gw)
    settle(list(gateways.values()), postfix)
    note(f"told 250 for {queued}")
    event(f"messages queued: {min(len(queued), 3)}")
    # Property 3: every 250 at the end of data is a message Postfix has,
    # and Postfix has no message the client was not told 250 for.
    assert len(set(queued)) == len(queued), f"one queue id told twice: {queued}"
    accepted = committed(postfix)
    assert accepted == set(queued), (
        f"Postfix queued {sorted(accepted)}, the client was told 250 for {queued}\n{postfix.maillog()}")
    # Property 4.
    assert not gateway_errors, [r.getMessage() for r in gateway_errors]


# --- bugs the properties above found (fixed) ----------------------------------


def _dialogue(gw: GatewayThread, lines: list[bytes]) -> list[bytes]:
    sock = gw.raw(timeout=TIMEOUT)
    with sock:
        out = []
        for line in lines:
            sock.sendall(line + b"\r\n")
            out.append(recv_reply(sock))
        return out


def test_a_command_that_is_not_utf8_gets_postfixs_500(gateway, gateway_errors) -> None:
    # Such bytes used to reach XCLIENT HELO=/NAME=, which could not encode
    # them: an internal error (451 4.3.0) at MAIL for any client.
    replies = _dialogue(gateway, [b"EHLO \xff\xfe.example", b"XCLIENT NAME=\xff", b"MAIL FROM:<bob@example.org>",
                                  b"EHLO client.example.net", b"MAIL FROM:<bob@example.org>", b"NOOP"])
    assert replies == [
        b"500 5.5.2 Error: bad UTF-8 syntax\r\n",
        b"500 5.5.2 Error: bad UTF-8 syntax\r\n",
        b"503 5.5.1 Error: send HELO/EHLO first\r\n",
        replies[3],
        b"250 2.1.0 Ok\r\n",
        b"250 2.0.0 Ok\r\n",
    ]
    assert replies[3].startswith(b"250-gw.test.example\r\n")
    assert not gateway_errors, [r.getMessage() for r in gateway_errors]


@pytest.mark.parametrize("attribute", ["NAME=a+20b", "NAME=-", "NAME=12.34", "NAME=" + "a" * 256, "PORT=-1", "PORT=65536",
                                       "HELO=" + "\u00e4" * 128,  # 256 octets
                                       # A DNS name's final dot: "misplaced delimiter" to Postfix.
                                       "NAME=mail.example.net.", "REVERSE_NAME=mail.example.net."],
                         ids=lambda attribute: attribute[:16])
def test_xclient_values_the_next_hop_would_refuse_are_refused(gateway, attribute: str) -> None:
    # Taken, they made Postfix refuse our XCLIENT, and every MAIL of the
    # session got "421 4.4.1 next hop unavailable" with the next hop up.
    xclient, ehlo, mail = _dialogue(gateway, [f"XCLIENT {attribute}".encode(), b"EHLO client.example.net",
                                             b"MAIL FROM:<bob@example.org>"])
    assert xclient == f"501 5.5.4 Bad XCLIENT attribute: {attribute}\r\n".encode()
    assert mail == b"250 2.1.0 Ok\r\n"


@pytest.mark.parametrize("name", ["a" * 300, "\u00e4" * 128], ids=["300-ascii", "256-octets-utf8"])
def test_a_helo_name_too_long_for_xclient_still_reaches_postfix(gateway, postfix, name: str) -> None:
    # Postfix's XCLIENT takes at most 255 octets; the gateway sends
    # HELO=[UNAVAILABLE] there and the name in the EHLO that follows.
    replies = _dialogue(gateway, [
        f"XCLIENT ADDR={OUTSIDE_IP}".encode(), f"EHLO {name}".encode(), b"MAIL FROM:<bob@example.org>",
        b"RCPT TO:<alice@example.com>", b"DATA", b"Subject: long helo\r\n\r\nbody\r\n.",
    ])
    assert QUEUED.match(replies[-1]), replies
    (delivered,) = postfix.wait_for_messages("alice")
    assert f"Received: from {name} (unknown [{OUTSIDE_IP}])".encode() in delivered
