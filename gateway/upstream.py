"""The next hop: an MTA over SMTP (aiosmtplib), or a Maildir.

Only this module speaks to the next hop.  Its replies come back as
:class:`~gateway.replies.Reply` values to be passed to the client verbatim;
every way the next hop can fail (refused connection, timeout, dropped
connection, a desynchronised dialogue) becomes :class:`UpstreamError`, which
the SMTP front turns into a 4yz so the client retries.  The gateway keeps no
mail of its own: a 250 for DATA comes from the next hop or from a Maildir
file that is on disk (fsync'ed) before the reply.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import ipaddress
import itertools
import logging
import os
import re
import socket
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import aiosmtplib
from aiosmtplib.esmtp import parse_esmtp_extensions
from aiosmtplib.protocol import SMTPProtocol

from . import replies
from .config import Endpoint, GatewaySettings
from .deadline import Deadline
from .replies import Reply
from .session import Envelope, Session

__all__ = ["Upstream", "UpstreamError", "ClientRefused", "SMTPUpstream", "MaildirUpstream", "NextHopMemory", "make_upstream"]

log = logging.getLogger("smtpgate.upstream")

_NEWLINES = re.compile(rb"\r\n|\r|\n")


class UpstreamError(Exception):
    """The next hop failed; nothing it was given may be taken as delivered."""


class ClientRefused(UpstreamError):
    """The next hop judged the client we named in XCLIENT and refused it.

    Postfix with ``smtpd_delay_reject = no`` applies its
    ``smtpd_client_restrictions`` to the new client at once and answers
    XCLIENT with their verdict in place of its greeting, and its
    ``smtpd_helo_restrictions`` to the client's EHLO that follows.  That
    reply is the client's answer (a 554 must not become our 421, retried for
    days); the connection is dropped (after a refused XCLIENT Postfix
    answers 503 to all else on it), and the next transaction tries afresh.
    """

    def __init__(self, reply: Reply) -> None:
        super().__init__(f"refused the client: {reply}")
        self.reply = reply


def _judges_the_client(response: aiosmtplib.SMTPResponse) -> Reply | None:
    """A refusal of XCLIENT that is about the client it names: a policy
    reply (X.7.Y), other than Postfix's refusal of us (550 5.7.0
    insufficient authorization).  Syntax (X.5.Y) is about us too, and a
    421 ends the session whoever it is about."""
    if response.code < 400 or response.code == 421:
        return None
    reply = Reply.parse(response.code, response.message)
    if reply.enhanced[1:3] != ".7" or "insufficient authorization" in reply.text.lower():
        return None
    return reply


#: A socket non-blocking from its start (Linux): one ioctl() fewer per
#: message than setblocking(False).
_NONBLOCK = getattr(socket, "SOCK_NONBLOCK", 0)

#: The errors a non-blocking connect() raises as BlockingIOError: under way.
_UNDER_WAY = frozenset({errno.EINPROGRESS, errno.EAGAIN, errno.EWOULDBLOCK, errno.EALREADY})

_SEPARATORS = (b" ", b"-", b"\r", b"\n")
#: aiosmtplib's limit on one reply line.
_MAX_REPLY_LINE = 8192
#: The positive replies that take a sender or a recipient.
_TAKEN = frozenset({250, 251})


class _NextHopProtocol(SMTPProtocol):
    """aiosmtplib's protocol, with our own reading of the next hop's replies.

    Stricter than aiosmtplib's, which takes a reply's code from its last
    line: every line must carry the first line's 2yz-5yz code and a
    separator ("554-refused / 250 ok" is no 250, "2500 ok" no 250 either).
    And we never pipeline to the next hop, so bytes left over after a reply
    mean the dialogue is out of step: the next command would be paired with
    a stale reply (a refused message answered 250).  Any of these fails the
    read, and the connection is dropped.  It runs for every reply of every
    message, so the one-line reply, the common one, is read in one step.
    """

    #: The start of what the next hop sent when no reply was awaited (a
    #: late or extra reply); once set, the connection is used no more.
    stray = b""

    def data_received(self, data: bytes) -> None:
        waiter = self._response_waiter
        if waiter is not None and (not self._response_pending or waiter.done()):
            # aiosmtplib drops it, so that it is not read as the next
            # command's reply; but a reply split across segments would
            # then have its last line read as that reply, and one still on
            # its way when the next command goes would be taken for its
            # reply (a 250 for a message the next hop refused).  The
            # dialogue is out of step: no command goes on this connection.
            self.stray = self.stray or bytes(data[:80])
            return
        super().data_received(data)

    async def read_response(self, timeout: float | None = None) -> aiosmtplib.SMTPResponse:
        if timeout is not None:
            return await super().read_response(timeout)
        # aiosmtplib's, less its asyncio.wait_for(waiter, None): that only
        # awaits the waiter, after a lookup of the running loop (a getpid()
        # system call in Python 3.11), for every reply of every message.
        waiter = self._response_waiter
        if waiter is None:
            raise aiosmtplib.SMTPServerDisconnected("Connection lost")
        self._response_pending = True
        try:
            return await waiter
        finally:
            self._response_pending = False
            self._response_waiter = None if self.transport is None else self._loop.create_future()

    def _read_response_from_buffer(self) -> aiosmtplib.SMTPResponse | None:
        buffer = bytes(self._buffer)
        # The next hop says the same few things again and again (its
        # greeting, its EHLO offer, "250 2.1.0 Ok"): each is read once.
        response = _read_reply(buffer) if len(buffer) <= _KEPT_REPLY else _parse_reply(buffer)
        if response is not None:
            del self._buffer[:]
        return response


def _parse_reply(buffer: bytes) -> aiosmtplib.SMTPResponse | None:
    """The one reply ``buffer`` holds, or None if it is not all there yet;
    raises for anything else (see _NextHopProtocol)."""
    end = buffer.find(b"\n")
    if end < 0:
        return None
    first = buffer[: end + 1]
    code, separator = first[:3], first[3:4]
    if separator == b"-":
        text = _multiline(buffer, code)
        if text is None:
            return None  # its last line is still on its way
    else:
        if end + 1 != len(buffer):
            raise _out_of_step(buffer, end + 1)
        text = first[4:].strip(b" \t\r\n")
    if not (separator in _SEPARATORS and code.isdigit() and b"200" <= code < b"600" and end < _MAX_REPLY_LINE):
        raise aiosmtplib.SMTPResponseException(-1, f"malformed reply {first[:40]!r}...")
    return aiosmtplib.SMTPResponse(int(code), text.decode("utf-8", "surrogateescape"))


#: Read once, a reply's parts cost far more than a look-up of its bytes
#: (about 12,000 instructions for "250 2.1.0 Ok", 50,000 for an EHLO
#: offer).  A failed read raises and is not kept; a reply with a queue id
#: is new each time and only passes through.  Longer ones are not kept.
_read_reply = functools.lru_cache(maxsize=128)(_parse_reply)
_KEPT_REPLY = 1024


def _multiline(buffer: bytes, code: bytes) -> bytes | None:
    """The text of a whole multi-line reply in ``buffer``, or None if its
    last line has not arrived."""
    lines = []
    start = 0
    while True:
        end = buffer.find(b"\n", start)
        if end < 0:
            return None
        line = buffer[start : end + 1]
        if line[:3] != code or line[3:4] not in _SEPARATORS or len(line) > _MAX_REPLY_LINE:
            raise aiosmtplib.SMTPResponseException(-1, f"malformed reply line {line[:40]!r}...")
        lines.append(line[4:].strip(b" \t\r\n"))
        start = end + 1
        if line[3:4] != b"-":
            break
    if start != len(buffer):
        raise _out_of_step(buffer, start)
    return b"\n".join(lines)


def _out_of_step(buffer: bytes | bytearray, end: int) -> aiosmtplib.SMTPResponseException:
    # What came after the reply goes in the log: often the next hop's own
    # 421 (Postfix's "too many errors"), which says why.
    return aiosmtplib.SMTPResponseException(
        -1, f"more than one reply at once (out of step): {bytes(buffer[end : end + 80])!r}")


class Upstream(Protocol):
    #: ESMTP extensions the next hop offers an EHLO client, lower-case
    #: keywords: what the SMTP front offers and lets clients use.
    extensions: frozenset[str]

    async def connect(self) -> None: ...
    async def introduce(self, session: Session) -> None: ...
    async def command(self, line: str) -> Reply: ...
    async def data(self, envelope: Envelope, message: bytes, *, crlf: bool = False) -> Reply: ...
    async def reset(self) -> None: ...
    async def close(self) -> None: ...
    def keep_awake(self) -> None: ...
    def settle(self) -> Awaitable[None] | None: ...


def _xclient_name(name: str, tempfail: bool) -> str:
    """A client name as XCLIENT carries it: Postfix defers a client whose
    name is [TEMPUNAVAIL] where it rejects one whose name is [UNAVAILABLE]."""
    if name != "unknown":
        return name
    return "[TEMPUNAVAIL]" if tempfail else "[UNAVAILABLE]"


def _xtext(value: str) -> str:
    """RFC 3461 xtext, which XCLIENT values use."""
    return "".join(
        c if 33 <= ord(c) <= 126 and c not in "+=" else "".join(f"+{b:02X}" for b in c.encode())
        for c in value
    )


@dataclass
class NextHopMemory:
    """What the MTA offered us at our last EHLO, shared by a worker's sessions."""

    extensions: frozenset[str] = frozenset()
    #: XCLIENT attributes, upper-case; empty when XCLIENT is not offered.
    xclient: frozenset[str] = frozenset()
    #: That XCLIENT is not offered has been logged (once, until it is again).
    said_no_xclient: bool = False


class SMTPUpstream:
    """One SMTP session towards the MTA per client session.

    When the MTA offers XCLIENT the real client's address, name and HELO are
    sent before the first transaction, so Postfix logs the real client and
    applies its own restrictions to it.

    aiosmtplib's protocol parses replies and fails a read when the connection
    is lost; commands are written here and their replies read with one call,
    bounded by ``deadline`` (see :mod:`gateway.deadline`) or, without one,
    by aiosmtplib's own timeout.
    """

    def __init__(
        self,
        endpoint: Endpoint,
        settings: GatewaySettings,
        memory: NextHopMemory | None = None,
        deadline: Deadline | None = None,
    ):
        self._endpoint = endpoint
        self._settings = settings
        self._memory = memory if memory is not None else NextHopMemory()
        self._deadline = deadline
        self._smtp: _NextHopProtocol | None = None
        self._waiting: SMTPProtocol | None = None
        self._timed_out = False
        self._limit = settings.upstream_timeout  # of the wait under way, for the log
        self._identity: tuple[str, ...] | None = None
        #: Until this session connects: what the MTA offered the last time
        #: this worker asked (empty if it never has).
        self.extensions: frozenset[str] = self._memory.extensions
        self._xclient_attrs: frozenset[str] = frozenset()
        #: Whether this connection has had our own EHLO.
        self._greeted = False
        #: The connection was last greeted with a HELO client's HELO: it
        #: takes no extension, whatever :attr:`extensions` says.
        self._helo = False
        #: keep_awake() is in force; and its NOOP under way, if any.
        self._awake = False
        self._nudge: asyncio.Task[None] | None = None
        #: Why the connection was dropped between commands, for the log.
        self._lost = "not connected"

    async def connect(self) -> None:
        """Connect and EHLO as the gateway, unless already connected.

        Once the MTA has offered XCLIENT, later connections skip our EHLO:
        XCLIENT restarts the dialogue, and the client's EHLO that follows it
        tells us the extensions anyway.  That is one round trip less per
        message, for us and for the MTA.
        """
        if self._smtp is not None and self._smtp.is_connected:
            if not self._smtp.stray:
                return
            # Between transactions: a new connection, rather than a 421.
            log.warning("next hop %s spoke out of turn: %r; reconnecting", self._endpoint, self._smtp.stray)
            self._drop()
        # aiosmtplib's protocol (reply parsing, a lost connection failing the
        # read) without its client object, whose connect() would cost a lock,
        # a check of our host name and a wait_for task for the connection and
        # another for the greeting: per message, here.
        loop = asyncio.get_running_loop()
        smtp = _NextHopProtocol(loop=loop)
        limit = self._settings.upstream_connect_timeout
        known = self._memory
        try:
            try:
                async with asyncio.timeout_at(loop.time() + limit):
                    await self._open(loop, smtp)
                    greeting = await smtp.read_response(timeout=None)
            except TimeoutError:
                raise UpstreamError(f"connect to {self._endpoint}: no greeting within {limit:g}s") from None
            if greeting.code != 220:
                raise UpstreamError(f"connect to {self._endpoint}: greeted with {greeting.code} {greeting.message}")
            if known.xclient:
                self.extensions, self._xclient_attrs = known.extensions, known.xclient
                self._greeted = False
            else:
                await self._ehlo(smtp, self._settings.hostname, ours=True)
        except (aiosmtplib.SMTPException, OSError) as exc:
            _close(smtp)
            why = self._why(_connect_failure(exc, self._endpoint))
            raise UpstreamError(f"connect to {self._endpoint}: {why}") from exc
        except BaseException:
            _close(smtp)  # refused above, or cancelled half-way: the client left first
            raise
        self._smtp = smtp
        self._identity = None
        self._helo = False
        self._lost = "not connected"

    async def _open(self, loop: asyncio.AbstractEventLoop, smtp: SMTPProtocol) -> None:
        family = _family(self._endpoint.host)
        if family is None:
            await loop.create_connection(lambda: smtp, self._endpoint.host, self._endpoint.port)
            return
        # An address needs no resolving, and the connection need not be
        # awaited apart from the greeting, which can only follow it: a
        # failed connect fails that read (with the connect's error, below).
        # That spares create_connection's wait for the socket to become
        # writable: two epoll_ctl calls, a getsockopt and three rounds
        # through the event loop per message.  asyncio's transport takes a
        # socket whose connect is under way as it takes a connected one.
        # IPPROTO_TCP as getaddrinfo() gives it: asyncio sets TCP_NODELAY
        # only on a socket that names its protocol.
        sock = socket.socket(family, socket.SOCK_STREAM | _NONBLOCK, socket.IPPROTO_TCP)
        try:
            if not _NONBLOCK:
                sock.setblocking(False)
            # connect_ex: the "in progress" of every connect is no exception
            # to build (strerror() and all) and to catch.
            error = sock.connect_ex((self._endpoint.host, self._endpoint.port))
            if error and error not in _UNDER_WAY:
                raise OSError(error, os.strerror(error))  # the subclass connect() raises
            await loop.create_connection(lambda: smtp, sock=sock)
        except BaseException:
            sock.close()
            raise

    async def _send(self, smtp: _NextHopProtocol, payload: bytes, *, final: bool = False) -> aiosmtplib.SMTPResponse:
        """Write ``payload`` (commands, or BDAT and its bytes) and read the reply;
        ``final``: the reply to a whole message, which may take longer
        (``upstream_data_timeout``, RFC 5321 §4.5.3.2.6).

        aiosmtplib's own calls would take a lock and a timer per command and
        run two regular expressions over every message to fix line ends and
        stuff dots that are right already; the session is ours alone.
        """
        if smtp.stray:
            raise aiosmtplib.SMTPResponseException(-1, f"a reply no command asked for (out of step): {smtp.stray!r}")
        smtp.write(payload)  # SMTPServerDisconnected if the connection is gone
        limit = self._settings.upstream_data_timeout if final else self._settings.upstream_timeout
        self._limit = limit
        deadline = self._deadline
        if deadline is None:
            return await smtp.read_response(timeout=limit)
        self._waiting = smtp
        deadline.arm(limit, self._expired)
        try:
            return await smtp.read_response(timeout=None)
        finally:
            deadline.disarm()
            self._waiting = None

    def _expired(self) -> None:
        # Abort rather than close: a close would wait for a write buffer the
        # MTA may never read.  The pending read then fails as disconnected.
        smtp = self._waiting
        if smtp is None:
            return
        self._timed_out = True
        # Typed as a BaseTransport by aiosmtplib; every stream transport
        # (asyncio's, uvloop's) has abort().
        transport = smtp.transport
        if transport is not None:
            transport.abort()  # type: ignore[attr-defined]

    def _why(self, exc: BaseException) -> str:
        if self._timed_out:
            self._timed_out = False
            return f"no reply within {self._limit:g}s"
        return str(exc)

    async def _ehlo(self, smtp: _NextHopProtocol, name: str, *, ours: bool, verb: bytes = b"EHLO") -> None:
        response = await self._send(smtp, b"%b %b\r\n" % (verb, name.encode("utf-8", "surrogateescape")))
        if response.code != 250:
            if not ours and response.code >= 400 and response.code != 421:
                # The client's own name, judged by the MTA's HELO
                # restrictions (smtpd_delay_reject = no): its answer.
                raise ClientRefused(Reply.parse(response.code, response.message))
            raise UpstreamError(f"{verb.decode()} refused: {response.code} {response.message}")
        self._helo = verb == b"HELO"
        if self._helo:
            # What the last EHLO offered stays the offer: should this client
            # say EHLO after all, it is offered what a client that said EHLO
            # first would be (its next transaction greets the MTA with EHLO).
            return
        self.extensions, xclient = _offer(response.message)
        if ours:
            # After XCLIENT Postfix judges the new client, whom it does not
            # offer XCLIENT: only our own EHLO says whether we may use it.
            # Nor is what it offers one client (its discard maps) what it
            # offers the next: only our own EHLO sets the offer remembered.
            self._xclient_attrs = xclient
            if not self._xclient_attrs and not self._memory.said_no_xclient:
                # Not an error (an MTA without XCLIENT works), but behind a
                # Postfix that forgot smtpd_authorized_xclient_hosts every
                # client is this gateway's address, inside its mynetworks.
                log.warning(
                    "next hop %s does not offer us XCLIENT: it takes every client for this gateway "
                    "(its logs, its restrictions, its mynetworks); for Postfix, add our address to "
                    "smtpd_authorized_xclient_hosts", self._endpoint)
            self._memory.said_no_xclient = not self._xclient_attrs
            self._greeted = True
            self._memory.xclient = self._xclient_attrs
            self._memory.extensions = self.extensions

    async def introduce(self, session: Session) -> None:
        """Tell the MTA who the client is (XCLIENT), if it changed."""
        if not self._xclient_attrs:
            return
        name = _xclient_name(session.client_name, session.name_tempfail)
        reverse = _xclient_name(session.reverse_name, session.reverse_tempfail)
        identity = (str(session.client_ip), name, reverse, session.helo or "", session.protocol)
        if identity == self._identity:
            return
        if self._identity is not None:
            # Postfix takes one XCLIENT per connection (it does not offer it
            # to the client it now believes it talks to), so a new identity
            # (our client's own XCLIENT, a new HELO name) needs a new
            # connection.  No transaction is open between messages.
            await self.close()
            await self.connect()
            if not self._xclient_attrs:
                return
        smtp = self._smtp
        assert smtp is not None
        ip = session.client_ip
        addr = f"IPV6:{ip}" if isinstance(ip, ipaddress.IPv6Address) else str(ip)
        attrs = {
            "ADDR": addr,
            # Without NAME Postfix keeps the previous (our) name for the client.
            "NAME": name,
            "REVERSE_NAME": reverse,
            # Postfix refuses a longer HELO= (the client's EHLO that follows
            # gives it the name anyway); the SMTP front checks NAME and PORT.
            "HELO": session.helo if session.helo and len(session.helo.encode()) <= 255 else "[UNAVAILABLE]",
            "PROTO": session.protocol,
        }
        if session.client_port:
            attrs["PORT"] = str(session.client_port)
        args = " ".join(
            f"{k}={v if v.startswith('[') else _xtext(v)}" for k, v in attrs.items() if k in self._xclient_attrs
        )
        try:
            response = await self._send(smtp, f"XCLIENT {args}\r\n".encode())
            refusal = _judges_the_client(response)
            if refusal is not None:
                raise ClientRefused(refusal)
            if response.code // 100 != 2 and not self._greeted:
                # What an earlier session saw is out of date (the MTA was
                # reconfigured): greet it and look at what it offers now.
                await self._ehlo(smtp, self._settings.hostname, ours=True)
                await self.introduce(session)
                return
            # Postfix answers 220 and restarts the dialogue; older servers
            # (and smtp-sink) answer 250.  Greet again, as the client did,
            # either way: Postfix takes the protocol from that greeting
            # whatever PROTO said, for its Received header's "with SMTP" or
            # "with ESMTP" (after HELO it offers nothing, so the message
            # goes by DATA, as the client's own would).
            if response.code // 100 != 2:
                raise UpstreamError(f"XCLIENT refused: {response.code} {response.message}")
            await self._ehlo(smtp, session.helo or self._settings.hostname, ours=False,
                             verb=b"EHLO" if session.protocol == "ESMTP" else b"HELO")
        except (aiosmtplib.SMTPException, OSError) as exc:
            raise self._failed("XCLIENT", exc) from exc
        except UpstreamError:
            self._drop()
            raise
        self._identity = identity

    async def command(self, line: str) -> Reply:
        """Send one MAIL or RCPT line as it is; the reply as the MTA gave
        it, or UpstreamError for a positive one that takes nothing."""
        smtp = self._smtp
        if smtp is None:
            raise UpstreamError(self._lost)
        if "\r" in line or "\n" in line:
            # The SMTP front refuses such lines; never let one split in two here.
            raise UpstreamError(f"refusing to send a line break in {line[:20]!r}")
        try:
            response = await self._send(smtp, line.encode("utf-8", "surrogateescape") + b"\r\n")
        except (aiosmtplib.SMTPException, OSError) as exc:
            raise self._failed(line.split(" ", 1)[0], exc) from exc
        if response.code == 421:
            self._drop()
        elif response.code < 400 and response.code not in _TAKEN:
            # RFC 5321 §4.3.2: a sender or a recipient is taken with 250 or
            # 251.  A 221 or a 354 says nothing of where it went (Postfix's
            # proxy takes any 2yz): passed on, it would open a transaction
            # that delivers to nobody knows where.  The dialogue is in doubt.
            self._drop()
            raise UpstreamError(f"{line[:4]}: answered {response.code} {response.message}, not 250")
        return _reply(response.code, response.message)

    async def data(self, envelope: Envelope, message: bytes, *, crlf: bool = False) -> Reply:
        """The message, and the MTA's final reply.

        With CHUNKING (RFC 3030, Postfix since 3.4) it goes as one
        ``BDAT n LAST``: one round trip fewer than DATA/354, and no end
        marker for the MTA to look for, so nothing in the message can be read
        as one.  Otherwise DATA, with the message dot-stuffed here.

        :param crlf: the caller vouches that every line of ``message``
            ends in CRLF, the last one included (the SMTP front reads it
            so): three scans of the whole message fewer.
        """
        smtp = self._smtp
        if smtp is None:
            raise UpstreamError(self._lost)
        if not crlf:
            message = _crlf(message)
        try:
            if "chunking" in self.extensions and not self._helo:
                response = await self._send(smtp, b"BDAT %d LAST\r\n%b" % (len(message), message), final=True)
                if response.code >= 400:
                    # Whether it read the chunk or will take it for commands
                    # is the server's business: never speak on this connection
                    # again (message text must not become commands).
                    self._drop()
            else:
                response = await self._send(smtp, b"DATA\r\n")
                if response.code == 354:
                    response = await self._send(smtp, _dot_stuff(message) + b".\r\n", final=True)
                elif response.code < 400:
                    # A 250 here would be taken for the message's: it is not.
                    raise aiosmtplib.SMTPResponseException(response.code, f"DATA answered {response.code}, not 354")
                elif response.code != 421:
                    # A refused DATA command (smtpd_data_restrictions) leaves
                    # the MTA's transaction open, while ours is over: without
                    # this the client's next MAIL meets "nested MAIL command".
                    await self.reset()
        except (aiosmtplib.SMTPException, OSError) as exc:
            raise self._failed("DATA", exc) from exc
        if response.code != 250 and response.code < 400:
            # RFC 5321 §4.3.2: a message is taken with 250 alone.  A 221 or
            # a 354 here says nothing of where it went: the client retries.
            self._drop()
            raise UpstreamError(f"DATA: the message was answered {response.code} {response.message}, not 250")
        if response.code == 421:
            self._drop()
        return _reply(response.code, response.message)

    def keep_awake(self) -> None:
        """Until :meth:`settle`: a NOOP each ``upstream_keepalive`` seconds.

        The client's message is read whole before the MTA hears of it, and
        judged after that; meanwhile the MTA's session is idle, and Postfix
        drops one idle for ``smtpd_timeout`` (300 s).  A large message on a
        slow link would then fail on every retry.  The NOOPs are few, since
        Postfix counts them as junk commands (``smtpd_junk_command_limit``,
        100; 1 under stress, when its 10 s timeout cannot be helped).  Costs
        nothing until the interval has passed: it is the time limit on our
        next wait for the MTA, which is checked anyway.
        """
        if self._smtp is None or self._deadline is None:
            return
        self._awake = True
        self._deadline.arm(self._settings.upstream_keepalive, self._nudged)

    def _nudged(self) -> None:
        self._nudge = asyncio.get_running_loop().create_task(self._noop())

    async def _noop(self) -> None:
        smtp = self._smtp
        if smtp is None or not self._awake:
            return
        try:
            response = await self._send(smtp, b"NOOP\r\n")
        except (aiosmtplib.SMTPException, OSError) as exc:
            # DATA will find the connection gone and say why (451).
            self._lost = str(self._failed("NOOP", exc))
            return
        if response.code != 250:
            # Postfix counts NOOPs as junk: past smtpd_junk_command_limit
            # each is an error, and too many end with its 421.
            self._drop()
            self._lost = f"NOOP answered {response.code} {response.message}"
        elif self._awake and self._deadline is not None:
            self._deadline.arm(self._settings.upstream_keepalive, self._nudged)

    def settle(self) -> Awaitable[None] | None:
        """End :meth:`keep_awake`; the NOOP under way, if any, to await
        before the next command: the next reply read must be its own.
        (Not a coroutine: there is seldom anything to wait for.)"""
        if not self._awake:
            return None
        self._awake = False
        nudge, self._nudge = self._nudge, None
        if nudge is not None and not nudge.done():
            return nudge
        if self._deadline is not None:
            self._deadline.disarm()
        return None

    async def reset(self) -> None:
        """Abandon the MTA's transaction (RSET); a failure drops the session."""
        smtp = self._smtp
        if smtp is None or not smtp.is_connected:
            return
        try:
            response = await self._send(smtp, b"RSET\r\n")
            if response.code != 250:
                self._drop()
        except (aiosmtplib.SMTPException, OSError):
            self._timed_out = False
            self._drop()

    async def close(self) -> None:
        """QUIT and close.  The 221 is not awaited: nothing depends on it,
        and Postfix logs a clean disconnect once it has read the QUIT."""
        smtp, self._smtp = self._smtp, None
        if smtp is None:
            return
        try:
            if smtp.is_connected:
                smtp.write(b"QUIT\r\n")
        except (aiosmtplib.SMTPException, OSError):
            pass
        finally:
            _close(smtp)

    def _failed(self, what: str, exc: BaseException) -> UpstreamError:
        why = self._why(exc)
        self._drop()
        return UpstreamError(f"{what}: {why}")

    def _drop(self) -> None:
        # After a timeout or a 421 the dialogue's state is unknown; a later
        # transaction gets a fresh connection rather than a desynced one.
        if self._smtp is not None:
            _close(self._smtp)
        self._smtp = None
        self._identity = None


# The next hop says the same few things again and again ("250 2.1.0 Ok",
# its EHLO offer), and what is read from a reply depends on its text alone;
# the final reply to a message (its queue id) is new each time, hence a
# bounded cache.
@functools.lru_cache(maxsize=128)
def _reply(code: int, message: str) -> Reply:
    return Reply.parse(code, message)


@functools.lru_cache(maxsize=16)
def _offer(message: str) -> tuple[frozenset[str], frozenset[str]]:
    """An EHLO reply's extensions (lower-case) and XCLIENT attributes (upper-case)."""
    offered, _ = parse_esmtp_extensions(message)
    return frozenset(offered), frozenset(offered.get("xclient", "").upper().split())


def _connect_failure(exc: BaseException, endpoint: Endpoint) -> BaseException:
    """A connect that failed, which _open leaves to the greeting's read to
    find, in the words of asyncio's own connect (for the log)."""
    cause = exc.__cause__
    if not (isinstance(exc, aiosmtplib.SMTPServerDisconnected) and isinstance(cause, OSError)):
        return exc
    if cause.errno in (None, errno.ECONNRESET):
        return exc  # connected, then dropped before the greeting
    address = (endpoint.host, endpoint.port) if ":" not in endpoint.host else (endpoint.host, endpoint.port, 0, 0)
    return OSError(cause.errno, f"Connect call failed {address}")


@functools.cache
def _family(host: str) -> socket.AddressFamily | None:
    """The address family of an address without a scope, else None (a name)."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address):
        return None if address.scope_id else socket.AF_INET6
    return socket.AF_INET


def _close(smtp: SMTPProtocol) -> None:
    transport = smtp.transport
    if transport is not None:
        transport.close()


def _crlf(message: bytes) -> bytes:
    """Every line ended by CRLF, the last one included.  The SMTP front
    has normalised the client's data already; this also covers headers a
    plugin added with a bare LF in a folded value."""
    crlf = message.count(b"\r\n")
    if message.count(b"\n") != crlf or message.count(b"\r") != crlf:
        message = _NEWLINES.sub(b"\r\n", message)
    if message and not message.endswith(b"\r\n"):
        message += b"\r\n"
    return message


def _dot_stuff(message: bytes) -> bytes:
    """RFC 5321 §4.5.2 transparency for a CRLF-clean message."""
    stuffed = message.replace(b"\r\n.", b"\r\n..")
    return b"." + stuffed if stuffed.startswith(b".") else stuffed


_counter = itertools.count()


class MaildirUpstream:
    """Delivery into a local Maildir, for trying smtpgate without an MTA.

    Each message is written once to ``tmp/``, fsync'ed, and renamed into
    ``new/`` (then the directory is fsync'ed) before the 250: a crash at any
    point leaves either no message or a whole one.
    """

    extensions = frozenset({"8bitmime", "smtputf8", "pipelining", "size", "enhancedstatuscodes"})

    def __init__(self, directory: Path, settings: GatewaySettings):
        self._dir = directory
        self._settings = settings
        self._host = socket.gethostname().replace("/", "\\057").replace(":", "\\072")

    async def connect(self) -> None:
        await asyncio.to_thread(self._ensure_dirs)

    async def introduce(self, session: Session) -> None:
        return None

    def _ensure_dirs(self) -> None:
        for sub in ("tmp", "new", "cur"):
            (self._dir / sub).mkdir(parents=True, exist_ok=True)

    async def command(self, line: str) -> Reply:
        verb = line[:4].upper()
        if verb == "MAIL":
            return replies.SENDER_OK
        if verb == "RCPT":
            return replies.RECIPIENT_OK
        return replies.OK

    async def data(self, envelope: Envelope, message: bytes, *, crlf: bool = False) -> Reply:
        head = [f"Return-Path: <{envelope.sender.mailbox}>"]
        head += [f"Delivered-To: {r.address.mailbox}" for r in envelope.recipients]
        content = ("\r\n".join(head) + "\r\n").encode("utf-8", "surrogateescape") + message
        try:
            name = await asyncio.to_thread(self._deliver, content)
        except OSError as exc:
            raise UpstreamError(f"maildir {self._dir}: {exc}") from exc
        return replies.QUEUED.format(queue_id=name)

    def _deliver(self, content: bytes) -> str:
        now = time.time()
        name = f"{int(now)}.M{int(now % 1 * 1e6)}P{os.getpid()}Q{next(_counter)}.{self._host}"
        tmp = self._dir / "tmp" / name
        try:
            with open(tmp, "xb") as fh:
                fh.write(content.replace(b"\r\n", b"\n"))
                fh.flush()
                os.fsync(fh.fileno())
            os.rename(tmp, self._dir / "new" / name)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()  # a half-written file is no message: leave no trace
            raise
        dir_fd = os.open(self._dir / "new", os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        return name

    async def reset(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def keep_awake(self) -> None:
        return None

    def settle(self) -> Awaitable[None] | None:
        return None


def make_upstream(
    settings: GatewaySettings,
    memory: NextHopMemory | None = None,
    deadline: Deadline | None = None,
    endpoint: Endpoint | None = None,
) -> Upstream:
    """The next hop ``settings.upstream`` names (or ``endpoint``, parsed from it already)."""
    if endpoint is None:
        endpoint = settings.upstream_endpoint
    if endpoint.maildir is not None:
        return MaildirUpstream(endpoint.maildir, settings)
    return SMTPUpstream(endpoint, settings, memory, deadline)
