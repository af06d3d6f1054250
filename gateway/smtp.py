"""The SMTP front: one protocol object per client connection, on aiosmtpd.

We subclass aiosmtpd's ``SMTP`` for its transport handling, idle timer and
PROXY protocol reader, but run our own command loop and DATA reader:

* aiosmtpd reads DATA line by line (about 75 awaits for a 5 KB message);
  we read up to each ``.<CR><LF>`` and decide from the bytes before it
  whether that was the end.  Only ``<CR><LF>.<CR><LF>`` ends a message, so
  ``<LF>.<LF>`` and the other smuggling forms stay inside it, where the
  bare-newline policy rejects or normalises them.
* aiosmtpd's constructor inspects the handler and its own methods on every
  connection; the dispatch table here is built once per class.
* Commands reach the next hop only after every check passed, with the
  client's own path and parameters; the next hop's reply goes back verbatim.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any, cast

from aiosmtpd.proxy_protocol import get_proxy
from aiosmtpd.smtp import SMTP as _AiosmtpdSMTP

from . import log as decisions
from . import replies, scoring, xclient
from .address import ParamError, PathError, parse_path
from .config import READ_BUFFER
from .deadline import Deadline
from .headers import claims_authserv_id, claims_receiver, prepend, remove_fields
from .pipeline import run_stage
from .replies import Reply
from .session import Envelope, Message, Recipient, Session
from .stash import Stash
from .upstream import ClientRefused, Upstream, UpstreamError
from .verdict import CONTINUE, Action, Verdict, combine

if TYPE_CHECKING:
    from .server import Gateway

__all__ = ["SMTPSession"]

log = logging.getLogger("smtpgate.smtp")

_READ_LIMIT = READ_BUFFER
#: Replies held for a pipelining client: at most a write buffer's worth
#: (Postfix's VSTREAM_BUFSIZE), and for at most as long as Postfix holds
#: them, so slow checks of a long group do not run into its timeouts.
_HELD_MAX = 4096
_HELD_SECONDS = 10.0
_LF = ord("\n")
#: Postfix's XCLIENT refuses longer values ("attribute value too long").
_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")


class _Close(Exception):
    """End the session after the reply that was just sent."""


class _ClientReader(asyncio.StreamReader):
    """asyncio's reader, with a way to put bytes back in front."""

    def unread(self, data: bytes) -> None:
        # asyncio has no public call for it; its buffer is this bytearray
        # in every CPython since 3.4 (test_data_properties.py would notice).
        self._buffer[:0] = data  # type: ignore[attr-defined]


class SMTPSession(_AiosmtpdSMTP):
    """One client connection."""

    _commands: dict[str, Callable[[SMTPSession, str | None], Awaitable[None]]] = {}

    def __init__(self, gateway: Gateway) -> None:
        # aiosmtpd's __init__ introspects handler and methods per connection;
        # set up only what its transport methods below rely on.
        loop = asyncio.get_running_loop()
        self.loop = loop
        self._input = _ClientReader(limit=_READ_LIMIT, loop=loop)
        asyncio.StreamReaderProtocol.__init__(
            self, self._input, client_connected_cb=self._cb_client_connected, loop=loop,
        )
        #: Replies not yet sent, while the client's next command is here
        #: already; and since when.
        self._held = bytearray()
        self._held_since = 0.0
        self.gateway = gateway
        self.settings = gateway.settings
        self.hostname = self.settings.hostname
        self.transport: Any = None
        self._handler_coroutine: asyncio.Task[None] | None = None
        # Set by _start() before any command is read; _finish() copes with
        # a connection that ended before that.
        self.session: Session  # type: ignore[assignment]
        self.envelope: Envelope | None = None  # type: ignore[assignment]
        # Time limits on reading from the client and on waiting for the
        # next hop; the gateway checks them (gateway/deadline.py).
        self.deadline = Deadline(loop.time)
        #: The limit on the client's silence while a read waits (else 0):
        #: every arrival of bytes starts it again (data_received).
        self._silence = 0.0
        upstream_deadline = Deadline(loop.time)
        self.deadlines = (self.deadline, upstream_deadline)
        self.upstream: Upstream = gateway.new_upstream(upstream_deadline)
        self._upstream_ready: asyncio.Task[None] | None = None
        self._upstream_txn = False
        self._greeted = False
        #: The extensions that take parameters offered at the last EHLO
        #: (none after HELO): what the client's MAIL and RCPT are judged by.
        self._offer: frozenset[str] = frozenset()
        #: The 554 that replaced the greeting (RFC 5321 §3.1), if any.
        self._refusal: Reply | None = None
        self._errors = 0
        self._junk_commands = 0
        self._idle = False
        self._finishing = False
        #: _cleanup() is over: the session is forgotten once the connection is too.
        self._cleaned = False
        #: A refusal with ``disconnect`` is being answered: the session ends after its reply.
        self._hang_up_after_reply = False
        self._helo_tags: list[Verdict] = []
        #: Whether this connection counts against the limits, and under
        #: which address (None: in the total only).
        self._counted = False
        self._counted_ip: str | None = None
        # Judged once, on the client the connection comes from (after a
        # PROXY header: the client behind the balancer, as Postfix does), so
        # neither a balancer in xclient_hosts nor an XCLIENT can widen it.
        self._xclient_allowed = False

    # --- transport ---------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        asyncio.StreamReaderProtocol.connection_made(self, transport)
        self.transport = transport
        self._handler_coroutine = self.loop.create_task(self._handle_client())

    def connection_lost(self, error: Exception | None) -> None:
        asyncio.StreamReaderProtocol.connection_lost(self, error)
        # The client is gone: abandon whatever it was waiting for (a check,
        # the next hop), so an interrupted DATA never reaches the next hop.
        if self._handler_coroutine is not None and not self._finishing:
            self._handler_coroutine.cancel()
        self.transport = None
        if self._cleaned:
            self.gateway.forget(self)

    def data_received(self, data: bytes) -> None:
        asyncio.StreamReaderProtocol.data_received(self, data)
        # A limit is on each wait for the client's next bytes, as Postfix's
        # smtpd_timeout is, not on a whole line or a whole 64 KiB of DATA:
        # a slow but steady sender must not be cut off.
        if self._silence:
            self.deadline.arm(self._silence, self._timed_out)

    def eof_received(self) -> bool | None:
        # The reader sees the EOF and the command loop ends by itself;
        # unlike aiosmtpd we do not cancel the handler at a half-close.
        return asyncio.StreamReaderProtocol.eof_received(self)

    async def reply(self, reply: Reply) -> None:
        if self.transport is None or self.transport.is_closing():
            raise _Close
        if reply.code >= 400:
            # Every refusal counts, ours, a plugin's or the next hop's, as
            # Postfix counts each failed command against
            # smtpd_hard_error_limit: a client guessing mailboxes or relay
            # tricks is cut off after max_errors, not after max_recipients.
            self._errors += 1
        wire = reply.wire()
        waiting = self._input._buffer  # type: ignore[attr-defined]  # (see unread)
        # A byte value (an LF) is found without the buffer protocol that a
        # bytes needle costs; most clients leave nothing waiting anyway.
        if waiting and _LF in waiting and not self._hang_up_after_reply:
            # RFC 2920 §3.1, as Postfix does it: while the client's next
            # command is here already, this reply waits to go with the
            # next, so a pipelined group is answered by one send(), not one
            # each.
            held, now = self._held, self.loop.time()
            if not held:
                self._held_since = now
            if len(held) + len(wire) <= _HELD_MAX and now - self._held_since < _HELD_SECONDS:
                held += wire
                return
        self._write(wire)
        if self._hang_up_after_reply:
            raise _Close
        # Replies are small: wait for the socket only when the client stops
        # reading and the buffer backs up (saves a round through the loop).
        if self.transport.get_write_buffer_size() > _READ_LIMIT:
            # As long as a read may wait (Postfix's smtpd_timeout bounds
            # its writes too): a client that reads nothing must not hold
            # its session, and its place, forever.
            self.deadline.arm(self.settings.command_timeout, self._timed_out)
            try:
                await self._writer.drain()
            finally:
                self.deadline.disarm()

    def _write(self, data: bytes) -> None:
        """``data`` after the replies held back, if any."""
        held = self._held
        if held:
            # The transport may keep what it is given: a new buffer from here on.
            self._held = bytearray()
            held += data
            self.transport.write(held)
        else:
            self.transport.write(data)

    def _flush(self) -> None:
        if self._held and self.transport is not None and not self.transport.is_closing():
            self._write(b"")

    def _timed_out(self) -> None:
        """The client sent nothing within the limit (or read nothing, or
        has not read the last replies of a session that is over): Postfix's
        421, and the session ends (closing the connection cancels whatever
        was under way, so a half-received message is never passed on)."""
        self.hang_up(replies.TIMEOUT.format(hostname=self.hostname))

    def hang_up(self, reply: Reply) -> None:
        """Say ``reply`` (unless the connection is closing already) and
        close it, dropping what the client has still not read: a close
        waits until the client has read everything, forever for one that
        reads nothing (and Python 3.12's Server.wait_closed() with it)."""
        transport = self.transport
        if transport is None:
            return
        if not transport.is_closing():
            self._write(reply.wire())
            transport.close()
        if transport.get_write_buffer_size():
            transport.abort()

    def close_idle(self) -> None:
        """For shutdown: say goodbye if waiting between transactions."""
        if self._idle and self.transport is not None and not self.transport.is_closing():
            self._write(replies.SHUTTING_DOWN.format(hostname=self.hostname).wire())
            self.transport.close()

    # --- the session -------------------------------------------------------

    async def _handle_client(self) -> None:
        try:
            if not await self._start():
                return
            await self._command_loop()
        except (_Close, asyncio.IncompleteReadError, ConnectionError):
            pass
        except asyncio.CancelledError:
            # Connection lost: whatever was under way is abandoned; the
            # next hop's transaction is dropped with its connection below.
            pass
        except Exception:
            log.exception("session %s: internal error", getattr(getattr(self, "session", None), "id", "-"))
            try:
                await self.reply(replies.LOCAL_ERROR)
            except Exception:
                pass
        finally:
            await self._finish()

    async def _start(self) -> bool:
        peer = self.transport.get_extra_info("peername") or ("0.0.0.0", 0)
        # A link-local peer's zone (fe80::1%eth0) is ours, not its name.
        client = self.gateway.client(peer[0].partition("%")[0])
        peer_ip, port = client.peer, peer[1]
        if self.gateway.expects_proxy(peer_ip):
            # Connections still waiting for their header count against the
            # total, so a flood of silent ones cannot go past the limit.
            busy = await self.gateway.admit(None)
            if busy is not None:
                log.warning("client %s: %s", peer_ip, busy)
                await self.reply(busy)
                return False
            try:
                async with asyncio.timeout(self.settings.proxy_timeout):
                    proxy = await get_proxy(self._reader)
            except TimeoutError:
                proxy = None
            finally:
                self.gateway.release(None)
            if not proxy or not proxy.valid:
                log.warning("client %s: invalid or missing PROXY header", peer_ip)
                return False
            if isinstance(proxy.src_addr, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
                # aiosmtpd's PROXY reader refuses a scoped address.
                client, port = self.gateway.client(str(proxy.src_addr)), proxy.src_port or 0
        self._xclient_allowed = client.xclient
        self.session = Session(
            client_ip=client.ip,
            client_port=port,
            peer_ip=peer_ip,
            trusted=client.trusted,
        )
        # A host allowed XCLIENT is a front proxy speaking for many clients:
        # as Postfix exempts it from smtpd_client_connection_count_limit, it
        # counts in the total only, or one proxy would cap the whole site
        # behind it at max_connections_per_ip.
        counted_ip = None if client.xclient else client.text
        limit = await self.gateway.admit(counted_ip)
        if limit is not None:
            decisions.decision(self.session, "connect", "defer", limit)
            await self.reply(limit)
            return False
        self._counted, self._counted_ip = True, counted_ip
        if self.settings.peername_lookup:
            if client.loopback:
                # As every hosts file says; no query leaves the machine.
                self.session.client_name = self.session.reverse_name = "localhost"
            else:
                await self._look_up_names()
        if not await self._connect_checks():
            return False
        if self._refusal is not None:
            # RFC 5321 §3.1: a 554 instead of the greeting; the command loop
            # answers everything but QUIT with 503.  The next hop is never asked.
            await self.reply(self._refusal)
            return True
        if not self.upstream.extensions:
            # Nothing known yet to offer at EHLO: ask the next hop while the
            # client reads our greeting.  Otherwise the next hop hears of
            # this client only once it has passed our MAIL checks, so bots
            # turned away before that never take one of its processes.
            self._upstream_ready = self.loop.create_task(self.upstream.connect())
        await self.reply(self.gateway.greeting)
        return True

    async def _look_up_names(self) -> None:
        """The client's names, as Postfix's smtpd looks them up: without
        them the next hop (told by XCLIENT) would take every client for one
        whose name does not resolve, and its reject_unknown_client_hostname
        would turn all mail away."""
        session = self.session
        found = await self.gateway.resolver.fcrdns(str(session.client_ip))
        session.client_name, session.reverse_name, session.name_tempfail = found.as_postfix()
        session.reverse_tempfail = found.ptr_temporary

    async def _connect_checks(self) -> bool:
        verdict = await self._stage("connect", session=self.session)
        if verdict.refuses:
            assert verdict.reply is not None
            # RFC 5321 §4.3.2: in place of the greeting only 554, or 421 and
            # a close; a plugin's other codes are made one of those.
            temporary = verdict.reply.is_temporary
            reply = verdict.reply
            if reply.code != (421 if temporary else 554):
                reply = Reply(421 if temporary else 554, reply.enhanced, reply.text)
            decisions.decision(self.session, "connect", verdict.action.name.lower(), reply,
                               plugin=verdict.plugin, result=verdict.result)
            if verdict.disconnect or temporary:
                await self.reply(reply)
                return False
            self._refusal = reply
        elif verdict is not CONTINUE:  # no hook had anything to say: the common case
            scoring.keep(verdict, self.session.tags)
            accepted = next((v for v in verdict.parts or (verdict,) if v.action is Action.ACCEPT), None)
            if accepted is not None:
                self.session.allowlisted = f"{accepted.plugin}:{accepted.result}"
        return True

    async def _command_loop(self) -> None:
        reader = self._reader
        max_len = self.settings.max_line_length
        deadline, timeout, timed_out = self.deadline, self.settings.command_timeout, self._timed_out
        while self.transport is not None and not self.transport.is_closing():
            if self.gateway.closing and self.envelope is None:
                await self.reply(replies.SHUTTING_DOWN.format(hostname=self.hostname))
                return
            if self._errors >= self.settings.max_errors:
                # Where Postfix checks: after the reply that reached the
                # limit, before reading another command.
                await self.reply(replies.TOO_MANY_ERRORS.format(hostname=self.hostname))
                return
            self._idle = self.envelope is None
            deadline.arm(timeout, timed_out)
            self._silence = timeout
            try:
                line = await reader.readuntil(b"\n")
            except asyncio.LimitOverrunError as exc:
                await self._discard_long_line(exc.consumed)
                await self.reply(replies.LINE_TOO_LONG)
                continue
            finally:
                self._silence = 0.0
                deadline.disarm()
                self._idle = False
            if len(line) > max_len:
                await self.reply(replies.LINE_TOO_LONG)
                continue
            line = line[:-2] if line.endswith(b"\r\n") else line[:-1]
            if _CONTROL.search(line):
                # A CR, NUL or other control byte inside a command would end
                # up in the next hop's command line or in our logs.
                await self.reply(replies.BAD_SYNTAX)
                continue
            try:
                text = line.decode()
            except UnicodeDecodeError:
                # What Postfix answers; and bytes that are no UTF-8 have no
                # faithful way into XCLIENT, our logs or a plugin's str.
                await self.reply(replies.BAD_UTF8)
                continue
            verb, _, arg = text.partition(" ")
            # Only ASCII verbs are upper-cased: str.upper() makes "QU\u0131T"
            # (dotless i) QUIT; left as it is, it is no command.
            verb = verb.upper() if verb.isascii() else verb
            handler = self._commands.get(verb)
            if handler is None:
                await self.reply(replies.BAD_SYNTAX if not verb else replies.UNKNOWN_COMMAND)
                continue
            if self._refusal is not None and verb != "QUIT":
                await self.reply(replies.ACCESS_DENIED.format(client=self.session.client))
                continue
            await handler(self, arg.strip(" ") or None)

    async def _discard_long_line(self, consumed: int) -> None:
        await self._reader.readexactly(consumed)
        while True:
            try:
                await self._reader.readuntil(b"\n")
                return
            except asyncio.LimitOverrunError as exc:
                await self._reader.readexactly(exc.consumed)

    def _junk(self) -> None:
        """NOOP, RSET, VRFY, EXPN and HELP cost nothing to send and prove
        nothing: past max_junk_commands each counts as an error (Postfix's
        smtpd_junk_command_limit), so they cannot hold a slot forever."""
        self._junk_commands += 1
        if self._junk_commands > self.settings.max_junk_commands:
            self._errors += 1

    async def _finish(self) -> None:
        # Bookkeeping first and synchronously: a cancellation (the client
        # vanished) must not leave the session counted or listed.
        self._finishing = True
        self._release_slot()
        if self.transport is not None:
            self._flush()  # the replies to what was pipelined before a QUIT, a 421
            self.transport.close()
            if self.transport.get_write_buffer_size():
                # The close waits for the client to read its last replies
                # (the 221, a 421): for as long as a read from it may wait,
                # not forever.  The session stays listed until then.
                self.deadline.arm(self.settings.command_timeout, self._timed_out)
        ready = self._upstream_ready
        if self.gateway.registry.calls["disconnect"] or (ready is not None and not ready.done()):
            await asyncio.shield(self._cleanup())
        else:
            # Nothing left to wait for, so nothing can suspend the cleanup,
            # and no cancellation can cut it short: the shield's task (and
            # its four rounds through the event loop) would guard nothing.
            await self._cleanup()

    def _release_slot(self) -> None:
        """Stop counting this connection against the limits (once)."""
        if self._counted:
            self.gateway.release(self._counted_ip)
            self._counted = False

    async def _cleanup(self) -> None:
        """Disconnect hooks and the next hop's goodbye; the session stays
        listed until this is done and its connection closed, so a graceful
        shutdown waits for both (and time limits are checked meanwhile)."""
        try:
            await self._close_upstream()
        finally:
            self._cleaned = True
            if self.transport is None:
                self.gateway.forget(self)

    async def _close_upstream(self) -> None:
        try:
            if hasattr(self, "session"):
                await self._stage("disconnect", session=self.session)
        except Exception:
            log.exception("disconnect hooks failed")
        ready = self._upstream_ready
        if ready is not None:
            # Let a connect under way finish and close it properly: cancelling
            # it half-way can leak the socket (asyncio.wait_for in 3.11).
            if not ready.done():
                await asyncio.wait([ready], timeout=self.settings.upstream_connect_timeout)
            if not ready.done():
                ready.cancel()
            elif not ready.cancelled():
                ready.exception()  # retrieved: a failed early connect is no error here
        try:
            await self.upstream.close()
        except Exception:
            log.exception("closing the next hop failed")

    async def _stage(self, stage: str, **kwargs: Any) -> Verdict:
        calls = self.gateway.registry.calls[stage]
        if not calls:
            # Most stages have no hook in a small policy (on the plain path
            # only rcpt has one): a coroutine run for nothing, five a message.
            return CONTINUE
        verdict = await run_stage(calls, kwargs, self.settings.hook_timeout, self.session.id)
        if not (verdict.refuses and self.settings.monitor):
            return verdict
        return self._monitored(stage, verdict, kwargs.get("envelope"), kwargs.get("recipient"))

    def _monitored(
        self, stage: str, verdict: Verdict, envelope: Envelope | None = None, recipient: Recipient | None = None
    ) -> Verdict:
        """In monitor mode a refusal is logged as what would have happened
        and the command goes on; its headers and score are kept.  Refusals
        of plugins that guard access (``Plugin.monitored = False``: relay)
        stay in force."""
        if not (verdict.refuses and self.settings.monitor):
            return verdict
        enforced = self.gateway.registry.enforced
        parts = verdict.parts or (verdict,)
        where = {"envelope": envelope, "rcpt": recipient.address.mailbox if recipient is not None else None}
        if not any(p.refuses and p.plugin in enforced for p in parts):
            self._log_monitored(stage, verdict, **where)
            return replace(verdict, action=Action.CONTINUE, reply=None, disconnect=False)
        kept: list[Verdict | None] = []
        for part in parts:
            if part.refuses and part.plugin not in enforced:
                self._log_monitored(stage, part, **where)
                part = replace(part, action=Action.CONTINUE, reply=None, disconnect=False)
            kept.append(part)
        return combine(kept)

    def _log_monitored(self, stage: str, verdict: Verdict, **where: Any) -> None:
        decisions.decision(self.session, stage, "monitor", verdict.reply, plugin=verdict.plugin,
                           result=f"would {verdict.action.name.lower()}: {verdict.result}".rstrip(": "), **where)

    def _score(self, stage: str, envelope: Envelope, pending: Sequence[Verdict] = ()) -> Verdict:
        """The transaction's summed score (with ``pending``, a recipient's
        verdicts not yet in it) against the [scoring] thresholds."""
        verdict = scoring.judge(self.gateway.policy.scoring, _scored(self.session, envelope, pending))
        return verdict if verdict is CONTINUE else self._monitored(stage, verdict, envelope)

    def _keep_field(self, field: bytes) -> bool:
        """For :func:`remove_fields`: only others' Authentication-Results
        and Received-SPF stay."""
        name = field[:22].lower()
        if name == b"authentication-results":
            return not claims_authserv_id(field, self.hostname)
        if name[:12] == b"received-spf":
            return not claims_receiver(field, self.hostname)
        return False

    def _headers(self, envelope: Envelope) -> list[tuple[str, str]]:
        return scoring.header_fields(self.gateway.policy.scoring, _scored(self.session, envelope))

    def _refused(self, stage: str, verdict: Verdict, **log_fields: Any) -> Reply:
        """The reply a refusal verdict is answered with.  With ``disconnect``
        the session ends once it is sent; a DEFER's then goes with code 421,
        which tells the client so (RFC 5321 §3.8), as at connect."""
        reply = verdict.reply
        assert reply is not None
        if verdict.disconnect:
            self._hang_up_after_reply = True
            if reply.is_temporary and reply.code != 421:
                reply = Reply(421, reply.enhanced, reply.text)
        decisions.decision(self.session, stage, verdict.action.name.lower(), reply,
                           plugin=verdict.plugin, result=verdict.result, **log_fields)
        return reply

    # --- the next hop ------------------------------------------------------

    async def _upstream(self) -> Reply | None:
        """Make sure the next hop is connected and knows the client; or the
        next hop's own refusal of this client, to be the reply instead."""
        try:
            await self._upstream_extensions()
            # Reconnects if the early attempt failed or the connection was
            # dropped after an error in an earlier transaction.
            await self.upstream.connect()
            await self.upstream.introduce(self.session)
        except ClientRefused as exc:
            return exc.reply
        except UpstreamError as exc:
            log.warning("session %s: next hop unavailable: %s", self.session.id, exc)
            reply = replies.UPSTREAM_UNAVAILABLE.format(hostname=self.hostname)
            decisions.decision(self.session, "upstream", "defer", reply, result=str(exc))
            await self.reply(reply)
            raise _Close from exc
        return None

    async def _upstream_extensions(self) -> frozenset[str]:
        """The next hop's extensions, or none if it cannot be reached now
        (the failure is reported at MAIL, where a 421 makes sense)."""
        ready = self._upstream_ready
        if ready is not None:
            if not ready.done():
                try:
                    await asyncio.shield(ready)
                except UpstreamError:
                    return frozenset()
            else:  # finished: no shield needed
                error = ready.exception()
                if isinstance(error, UpstreamError):
                    return frozenset()
                if error is not None:
                    raise error
        return self.upstream.extensions

    async def _reset_transaction(self) -> None:
        self.envelope = None
        if self._upstream_txn:
            self._upstream_txn = False
            await self.upstream.reset()

    # --- commands ----------------------------------------------------------

    async def smtp_HELO(self, arg: str | None) -> None:
        await self._helo(arg, esmtp=False)

    async def smtp_EHLO(self, arg: str | None) -> None:
        await self._helo(arg, esmtp=True)

    async def _helo(self, arg: str | None, *, esmtp: bool) -> None:
        command = "EHLO" if esmtp else "HELO"
        if arg is None or " " in arg:
            await self.reply(replies.SYNTAX_HELO.format(command=command))
            return
        verdict = await self._stage("helo", session=self.session, hostname=arg)
        if verdict.refuses:
            # Only an acceptable greeting resets the state (RFC 5321 §4.1.4),
            # so a transaction under way goes on; but the next one needs a
            # greeting we accept, which a refused name cannot become.
            self._greeted = False
            await self.reply(self._refused("helo", verdict))
            return
        await self._reset_transaction()
        # A new HELO replaces what the previous one contributed, so saying
        # EHLO twice cannot count a score twice.
        if self._helo_tags:
            previous = {id(v) for v in self._helo_tags}
            self.session.tags[:] = [v for v in self.session.tags if id(v) not in previous]
            self._helo_tags = []
        if verdict is not CONTINUE:
            scoring.keep(verdict, self._helo_tags)
            self.session.tags.extend(self._helo_tags)
        self.session.helo = arg
        self.session.esmtp = esmtp
        self.session.protocol = "ESMTP" if esmtp else "SMTP"
        self._greeted = True
        if not esmtp:
            self._offer = frozenset()
            await self.reply(_helo_reply(self.hostname))
            return
        upstream = await self._upstream_extensions()
        self._offer = upstream & _WITH_PARAMETERS
        await self.reply(_ehlo_reply(
            self.hostname, self.settings.max_message_size, self._xclient_allowed,
            "8bitmime" in upstream, "dsn" in upstream, "smtputf8" in upstream,
        ))

    def _offered(self, extension: str) -> bool:
        return self.session.esmtp and extension in self.upstream.extensions

    async def smtp_MAIL(self, arg: str | None) -> None:
        if not self._greeted:
            await self.reply(replies.NEED_HELO)
            return
        if self.envelope is not None:
            await self.reply(replies.NESTED_MAIL)
            return
        if arg is None:
            await self.reply(replies.SYNTAX_MAIL)
            return
        offered_utf8 = "smtputf8" in self._offer
        try:
            sender, params, params_text = parse_path(arg, "FROM", utf8=offered_utf8)
        except PathError as exc:
            await self.reply(_path_reply(exc, replies.SYNTAX_MAIL, replies.BAD_SENDER_SYNTAX))
            return
        bad = _mail_params_reply(params_text, self._offer, self.session.esmtp)
        if bad is not None:
            await self.reply(bad)
            return
        envelope = Envelope(sender, params)
        if not envelope.utf8 and not arg.isascii():
            await self.reply(replies.UTF8_NOT_DECLARED)
            return
        size = envelope.param("SIZE")
        if size is not None and int(size) > self.settings.max_message_size:
            decisions.decision(self.session, "mail", "reject", replies.MESSAGE_TOO_BIG, envelope=envelope)
            await self.reply(replies.MESSAGE_TOO_BIG)
            return
        verdict = await self._stage("mail", session=self.session, envelope=envelope)
        if verdict.refuses:
            await self.reply(self._refused("mail", verdict, envelope=envelope))
            return
        scoring.keep(verdict, envelope.tags)
        refused = await self._upstream()
        if refused is not None:
            # What the MTA said to this client in place of its greeting or
            # to its EHLO (its client or HELO restrictions): the answer here.
            decisions.decision(self.session, "mail", "upstream", refused, envelope=envelope)
            await self._relay(refused)
            return
        if size is not None and not self._offered("size"):
            # Our limit, announced by us; a next hop without SIZE would refuse it.
            params_text = " ".join(p for p in params_text.split(" ") if not p.upper().startswith("SIZE="))
        params_text = self._withheld_dsn(params_text, ("RET=", "ENVID="))
        line = f"MAIL FROM:<{sender.path}>" + (f" {params_text}" if params_text else "")
        reply = await self._forward(line)
        if reply.is_positive:
            self.envelope = envelope
            self._upstream_txn = True
        else:
            decisions.decision(self.session, "mail", "upstream", reply, envelope=envelope)
        await self._relay(reply)

    def _withheld_dsn(self, params_text: str, names: tuple[str, ...]) -> str:
        """``params_text`` without its DSN parameters when the next hop,
        told who the client is, withholds DSN from it (Postfix's
        smtpd_discard_ehlo_keyword_address_maps, as DSN_README suggests
        for outside clients) after we offered it at EHLO, before we knew.
        Passed on, they would meet a 501 that bounces the message; dropped,
        the message goes as from a client never offered DSN, which is what
        the next hop's owner chose for this client."""
        if not params_text or "dsn" not in self._offer or "dsn" in self.upstream.extensions:
            return params_text
        kept = [p for p in params_text.split(" ") if not p.upper().startswith(names)]
        if len(kept) != len(params_text.split(" ")):
            log.info("session %s: next hop withholds DSN from this client: not passing on %s",
                     self.session.id, " ".join(p for p in params_text.split(" ") if p.upper().startswith(names)))
        return " ".join(kept)

    async def _relay(self, reply: Reply) -> None:
        """The next hop's reply, verbatim; its 421 closes our session too
        (RFC 5321 §3.8), so nothing the client pipelined meets a 503."""
        await self.reply(reply)
        if reply.code == 421:
            raise _Close

    async def _forward(self, line: str) -> Reply:
        try:
            return await self.upstream.command(line)
        except UpstreamError as exc:
            log.warning("session %s: next hop failed: %s", self.session.id, exc)
            self.envelope = None
            self._upstream_txn = False
            reply = replies.UPSTREAM_UNAVAILABLE.format(hostname=self.hostname)
            decisions.decision(self.session, "upstream", "defer", reply, result=str(exc))
            await self.reply(reply)
            raise _Close from exc

    async def smtp_RCPT(self, arg: str | None) -> None:
        envelope = self.envelope
        if envelope is None:
            await self.reply(replies.NEED_MAIL)
            return
        if arg is None:
            await self.reply(replies.SYNTAX_RCPT)
            return
        try:
            # As at MAIL: UTF-8 is address syntax only where SMTPUTF8 was
            # offered; a transaction that could have declared it and did not
            # is told so below.  (ASCII reads alike in either grammar.)
            utf8 = envelope.utf8 or (not arg.isascii() and "smtputf8" in self._offer)
            address, params, params_text = parse_path(arg, "TO", utf8=utf8)
        except PathError as exc:
            await self.reply(_path_reply(exc, replies.SYNTAX_RCPT, replies.BAD_RECIPIENT_SYNTAX))
            return
        if not envelope.utf8 and not arg.isascii():
            await self.reply(replies.UTF8_NOT_DECLARED)
            return
        bad = _rcpt_params_reply(params_text, self._offer, self.session.esmtp)
        if bad is not None:
            await self.reply(bad)
            return
        if len(envelope.recipients) >= self.settings.max_recipients:
            decisions.decision(self.session, "rcpt", "defer", replies.TOO_MANY_RECIPIENTS,
                               envelope=envelope, rcpt=address.mailbox)
            await self.reply(replies.TOO_MANY_RECIPIENTS)
            return
        recipient = Recipient(address, params)
        verdict = await self._stage("rcpt", session=self.session, envelope=envelope, recipient=recipient)
        if verdict.refuses:
            await self.reply(self._refused("rcpt", verdict, envelope=envelope, rcpt=address.mailbox))
            return
        # This recipient's scores and headers join the transaction only once
        # the recipient is in it: a refused one must not weigh on the others.
        tags: list[Verdict] = []
        scoring.keep(verdict, tags)
        if self.gateway.policy.scoring.stage == "rcpt":
            verdict = self._score("rcpt", envelope, tags)
            if verdict.refuses:
                await self.reply(self._refused("rcpt", verdict, envelope=envelope, rcpt=address.mailbox))
                return
        params_text = self._withheld_dsn(params_text, ("NOTIFY=", "ORCPT="))
        line = f"RCPT TO:<{address.path}>" + (f" {params_text}" if params_text else "")
        reply = await self._forward(line)
        if reply.is_positive:
            envelope.recipients.append(recipient)
            envelope.tags.extend(tags)
        else:
            decisions.decision(self.session, "rcpt", "upstream", reply, envelope=envelope, rcpt=address.mailbox)
        await self._relay(reply)

    async def smtp_DATA(self, arg: str | None) -> None:
        envelope = self.envelope
        if arg is not None:
            await self.reply(replies.SYNTAX_NOARG.format(command="DATA"))
            return
        if envelope is None:
            await self.reply(replies.NEED_MAIL)
            return
        if not envelope.recipients:
            await self.reply(replies.NO_RECIPIENTS)
            return
        await self.reply(replies.START_DATA)
        # The message is read next, and a client that sent some of it with
        # DATA may wait for this 354 before it sends the rest.
        self._flush()
        # The next hop hears nothing until the message is in and judged.
        self.upstream.keep_awake()
        try:
            raw, refusal = await self._message(envelope)
        finally:
            nudge = self.upstream.settle()
            if nudge is not None:
                await nudge
        if refusal is not None:
            await self._reset_transaction()
            await self.reply(refusal)
            return
        try:
            reply = await self.upstream.data(envelope, raw, crlf=True)
        except UpstreamError as exc:
            log.warning("session %s: next hop failed during DATA: %s", self.session.id, exc)
            reply = replies.UPSTREAM_FAILED
        self.envelope = None
        self._upstream_txn = False
        if reply.is_positive:
            # A client that delivers is forgiven its mistakes (as Postfix does).
            self._errors = self._junk_commands = 0
        decisions.decision(self.session, "data", "delivered" if reply.is_positive else "upstream", reply,
                           envelope=envelope, rcpt=",".join(r.address.mailbox for r in envelope.recipients))
        await self._relay(reply)

    async def _message(self, envelope: Envelope) -> tuple[bytes, Reply | None]:
        """The client's message, judged, with our header fields; or the
        reply that refuses it."""
        raw, problem = await self._read_data()
        if problem is not None:
            decisions.decision(self.session, "data", "reject", problem, envelope=envelope)
            return b"", problem
        if raw[:1] in (b" ", b"\t"):
            # A first line that is no field starts the body, as Postfix's
            # cleanup takes it; left first, it would continue the last field
            # we prepend (our Authentication-Results, say).
            raw = b"\r\n" + raw
        message = Message(raw)
        verdict = await self._stage("data", session=self.session, envelope=envelope, message=message)
        if verdict.refuses:
            return b"", self._refused("data", verdict, envelope=envelope)
        scoring.keep(verdict, envelope.tags)
        # With stage = "rcpt" too: the recipients were judged as they came,
        # but a check of the message scores only now, and its score must be
        # able to reach the thresholds (it was summed into X-Spam-Status and
        # the message delivered, however far over `reject`).
        scored = self._score("data", envelope)
        if scored.refuses:
            return b"", self._refused("data", scored, envelope=envelope)
        # RFC 8601 §5: results that claim to be ours but arrived with the
        # message are forgeries; ours are added below.  So are the client's
        # own X-Spam-* fields when we write those.
        raw = remove_fields(raw, self.gateway.forgeable_fields, self._keep_field)
        headers = self._headers(envelope)
        # The next hop takes our word that every line ends in CRLF
        # (data(crlf=True)): _read_data made it true of the client's part.
        return (_field_lines(headers) + raw if headers else raw), None

    async def _read_data(self) -> tuple[bytes, Reply | None]:
        """Read the message up to ``<CR><LF>.<CR><LF>``; undo dot-stuffing.

        Returns the message and ``None``, or what to reply instead: the size
        limit and the bare-newline policy are applied only once the whole
        message is in, so the client is at a command boundary for the reply.
        """
        reader = cast(_ClientReader, self._reader)  # made in __init__
        limit = self.settings.max_message_size
        deadline, timeout, timed_out = self.deadline, self.settings.data_timeout, self._timed_out
        buf = bytearray()
        # The stream so far ends a line: the message's first byte starts one.
        # That line end goes in front of the message too, so that reading up
        # to the whole end marker finds an empty message's (".\r\n" at once)
        # and nothing shorter: a separator of ".\r\n" alone returned at every
        # line that ends in a dot, a read per four bytes for "x.\r\n" lines.
        reader.unread(b"\r\n")
        virtual = 2
        tail = b""
        total = 0
        #: Dots that start a line on the wire, the end marker's included:
        #: dot-stuffing, which the message's size leaves out (RFC 1870 §3).
        #: Counted only from when the wire passes the limit (-1 before):
        #: a smaller message is within it whatever its stuffing.
        dots = -1
        while True:
            deadline.arm(timeout, timed_out)
            self._silence = timeout
            try:
                piece = await reader.readuntil(b"\r\n.\r\n")
            except asyncio.LimitOverrunError as exc:
                # Short of the marker's length, so a marker that begins in
                # what is left is found by the next read.
                piece = await reader.readexactly(exc.consumed)
            finally:
                self._silence = 0.0
                deadline.disarm()
            if virtual:
                tail, piece, virtual = piece[:virtual], piece[virtual:], 0
            total += len(piece)
            if dots >= 0:
                dots += piece.count(b"\r\n.")
                if piece[:1] == b"." and tail[-2:] == b"\r\n" or piece[:2] == b"\n." and tail[-1:] == b"\r":
                    dots += 1  # a line start split between two reads
            elif total > limit + 3:
                dots = (b"\r\n" + buf + piece).count(b"\r\n.")  # buf holds all that came before
            # Unstuffed, the message is what precedes the final ".\r\n"
            # (its last CRLF included), so this may pass the limit by 3.
            if total - max(dots, 0) <= limit + 3:
                buf += piece
            elif buf:
                buf = bytearray()  # over the limit: keep reading, keep nothing
            tail = (tail + piece[-5:])[-5:]
            if tail == b"\r\n.\r\n":
                break
        if dots >= 0 and total - dots - 2 > limit:
            return b"", replies.MESSAGE_TOO_BIG
        data = bytes(buf[:-3])
        crlf = data.count(b"\r\n")
        if data.count(b"\n") != crlf or data.count(b"\r") != crlf:
            if self.settings.bare_newline == "reject":
                bare_lf = data.replace(b"\r\n", b"").count(b"\n")
                return b"", replies.BARE_LF if bare_lf else replies.BARE_CR
            data = _crlf_ends(data)
        if data.startswith(b"."):
            data = data[1:]
        return data.replace(b"\r\n.", b"\r\n"), None

    async def smtp_RSET(self, arg: str | None) -> None:
        self._junk()
        if arg is not None:
            await self.reply(replies.SYNTAX_NOARG.format(command="RSET"))
            return
        await self._reset_transaction()
        await self.reply(replies.OK)

    async def smtp_NOOP(self, arg: str | None) -> None:
        self._junk()
        await self.reply(replies.OK)

    async def smtp_HELP(self, arg: str | None) -> None:
        self._junk()
        await self.reply(replies.HELP)

    async def smtp_QUIT(self, arg: str | None) -> None:
        if arg is not None:
            await self.reply(replies.SYNTAX_NOARG.format(command="QUIT"))
            return
        # Before the 221: a client may reconnect the moment it reads it, and
        # another worker must not still count this connection then.
        self._release_slot()
        await self.reply(replies.CLOSING)
        raise _Close

    async def smtp_VRFY(self, arg: str | None) -> None:
        self._junk()
        if arg is None:
            await self.reply(replies.SYNTAX_VRFY)
            return
        await self._lookup("vrfy", arg, replies.VRFY_DISABLED)

    async def smtp_EXPN(self, arg: str | None) -> None:
        self._junk()
        if arg is None:
            await self.reply(replies.SYNTAX_NOARG.format(command="EXPN list"))
            return
        await self._lookup("expn", arg, replies.EXPN_DISABLED)

    async def _lookup(self, stage: str, arg: str, default: Reply) -> None:
        # Never forwarded: the next hop would disclose its mailboxes.
        verdict = await self._stage(stage, session=self.session, argument=arg)
        if verdict.refuses:
            await self.reply(self._refused(stage, verdict))
            return
        reply = verdict.reply or default
        decisions.decision(self.session, stage, verdict.action.name.lower(), reply, plugin=verdict.plugin)
        await self.reply(reply)

    async def smtp_XCLIENT(self, arg: str | None) -> None:
        if not self._xclient_allowed:
            await self.reply(replies.XCLIENT_DENIED)
            return
        if self.envelope is not None:
            await self.reply(replies.XCLIENT_NESTED)
            return
        if arg is None:
            await self.reply(replies.XCLIENT_SYNTAX.format(attribute="(none)"))
            return
        try:
            changes = xclient.session_changes(arg)
        except xclient.Refused as exc:
            await self.reply(exc.reply)
            return
        session = self.session
        for key, value in changes.items():
            setattr(session, key, value)
        session.trusted = self.gateway.is_trusted(session.client_ip)
        session.esmtp = False
        session.allowlisted = ""
        session.tags.clear()
        session.results.clear()
        session.stash = Stash()
        self._greeted = False
        self._refusal = None
        # The new client is judged afresh, as at a new connection.
        if not await self._connect_checks():
            raise _Close
        if self._refusal is not None:
            await self.reply(self._refusal)
            return
        await self.reply(self.gateway.greeting)


def _path_reply(exc: PathError, syntax: Reply, bad_address: Reply) -> Reply:
    """The reply to a MAIL or RCPT argument parse_path refused: the
    command's syntax, the address, or one parameter (as Postfix tells them
    apart; an empty ``SIZE=`` is no bad address)."""
    if isinstance(exc, ParamError):
        return replies.UNSUPPORTED_PARAMETER.format(option=exc.token)
    return syntax if str(exc).startswith("expected") else bad_address


# Every session is greeted with one of a few replies; each is made (and
# its wire form encoded) once, not per session.
@functools.lru_cache(maxsize=8)
def _helo_reply(hostname: str) -> Reply:
    return Reply(250, "", hostname)


@functools.lru_cache(maxsize=64)
def _ehlo_reply(hostname: str, size: int, xclient: bool, eightbit: bool, dsn: bool, smtputf8: bool) -> Reply:
    """The EHLO reply: ours, and of the next hop's extensions only what
    it can honour (a DSN request or a UTF-8 address we accepted but could
    not pass on would be lost)."""
    lines = [hostname, "PIPELINING", f"SIZE {size}"]
    if xclient:
        lines.append("XCLIENT NAME REVERSE_NAME ADDR PORT PROTO HELO DESTADDR DESTPORT")
    lines.append("ENHANCEDSTATUSCODES")
    if eightbit:
        lines.append("8BITMIME")
    if dsn:
        lines.append("DSN")
    if smtputf8:
        lines.append("SMTPUTF8")
    return Reply(250, "", "\n".join(lines))


def _field_lines(headers: Sequence[tuple[str, str]]) -> bytes:
    """Header fields to put in front of a message, every line ended by
    CRLF: a plugin's folded value may carry a bare LF (field_value keeps
    "\\n\\t" as a fold)."""
    return _crlf_ends(prepend(b"", headers))


def _crlf_ends(data: bytes) -> bytes:
    """``data`` with every line end a CRLF: each CRLF, lone CR and lone LF,
    taken left to right, is one line end.  What ``re.sub(rb"\\r\\n|\\r|\\n",
    b"\\r\\n", data)`` gives, by three replaces: that pattern has no first
    byte to look for, so the matcher is started at every byte (about 40,000
    instructions for the fields of a checked message)."""
    return data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")


def _scored(session: Session, envelope: Envelope, pending: Sequence[Verdict] = ()) -> tuple[Verdict, ...]:
    return (*session.tags, *envelope.tags, *pending)


#: The extensions whose MAIL or RCPT parameters we may offer.
_WITH_PARAMETERS = frozenset({"8bitmime", "dsn", "smtputf8"})
#: Postfix's largest SIZE= (an off_t); larger is an overflow, not too big.
_MAX_OFF_T = 2**63 - 1
_XTEXT = re.compile(r"(?:[^+]|\+[0-9A-Fa-f]{2})*\Z")


def _xtext(value: str) -> str | None:
    """RFC 3461 xtext decoded, or None if a ``+`` is not followed by two
    hex digits."""
    if _XTEXT.match(value) is None:
        return None
    return re.sub(r"\+([0-9A-Fa-f]{2})", lambda m: chr(int(m[1], 16)), value)


def _mail_params_reply(params_text: str, offer: frozenset[str], esmtp: bool) -> Reply | None:
    """Postfix's reply to MAIL's parameters, or None if it takes them.

    Each parameter is judged as Postfix's smtpd judges it, so a client
    hears the same code and words as from Postfix itself: a parameter not
    offered, unknown, or with a value its extension does not define is an
    "Unsupported option" named as written; a known one with a bad value (or
    given twice, where the value could not be told apart) has its own
    reply.  After HELO nothing is offered, so nothing is taken.
    """
    ret = envid = auth = False
    if params_text and not esmtp:
        return replies.UNSUPPORTED_PARAMETER.format(option=params_text.split(" ", 1)[0])
    for token in filter(None, params_text.split(" ")):
        upper = token.upper()
        if upper in ("BODY=8BITMIME", "BODY=7BIT") and "8bitmime" in offer:
            continue
        if upper == "SMTPUTF8" and "smtputf8" in offer:
            continue
        if upper.startswith("SIZE="):
            value = token[5:]
            if not (value.isascii() and value.isdigit()):
                return replies.BAD_SIZE
            if int(value) > _MAX_OFF_T:
                return replies.SIZE_OVERFLOW
        elif upper.startswith("AUTH="):
            # RFC 4954 §5: from a client that has not authenticated it is
            # ignored (by Postfix too); a mailbox is taken once, <> any time.
            if auth:
                return replies.MULTIPLE_AUTH
            auth = token[5:] != "<>"
        elif upper.startswith("RET="):
            if "dsn" not in offer:
                return replies.DSN_DISABLED
            if ret or upper[4:] not in ("FULL", "HDRS"):
                return replies.BAD_RET
            ret = True
        elif upper.startswith("ENVID="):
            if "dsn" not in offer:
                return replies.DSN_DISABLED
            # Postfix reads the decoded value as a C string: up to a NUL.
            decoded = (_xtext(token[6:]) or "").partition("\0")[0]
            if envid or not decoded or not all(" " <= c <= "~" for c in decoded):
                return replies.BAD_ENVID
            envid = True
        else:
            return replies.UNSUPPORTED_PARAMETER.format(option=token)
    return None


def _rcpt_params_reply(params_text: str, offer: frozenset[str], esmtp: bool) -> Reply | None:
    """Postfix's reply to RCPT's parameters, or None if it takes them
    (see _mail_params_reply)."""
    notify = orcpt = False
    if params_text and not esmtp:
        return replies.UNSUPPORTED_PARAMETER.format(option=params_text.split(" ", 1)[0])
    for token in filter(None, params_text.split(" ")):
        upper = token.upper()
        if upper.startswith("NOTIFY="):
            if "dsn" not in offer:
                return replies.DSN_DISABLED
            if notify or not _valid_notify(upper[7:]):
                return replies.BAD_NOTIFY
            notify = True
        elif upper.startswith("ORCPT="):
            if "dsn" not in offer:
                return replies.DSN_DISABLED
            kind, semicolon, coded = token[6:].partition(";")
            if orcpt or not semicolon or not kind or _xtext(coded) is None:
                return replies.BAD_ORCPT
            orcpt = True
        else:
            return replies.UNSUPPORTED_PARAMETER.format(option=token)
    return None


def _valid_notify(value: str) -> bool:
    # As Postfix reads it: empty items between commas are no items.
    items = {v for v in value.split(",") if v}
    return items == {"NEVER"} or (bool(items) and items <= {"SUCCESS", "FAILURE", "DELAY"})


# Only the commands defined here: aiosmtpd's own smtp_AUTH and smtp_STARTTLS
# rely on state this class does not set up (they come in a later version).
SMTPSession._commands = {
    name[len("smtp_"):]: function
    for name, function in vars(SMTPSession).items()
    if name.startswith("smtp_") and name[len("smtp_"):].isupper()
}
