"""Every hook a plugin can implement: the plugin author's manual.

A plugin is a class registered under the entry-point group
``smtpgate.plugins``.  Each worker process builds one instance per policy
with the plugin's options (its ``[plugins.NAME]`` table, validated against
the class's ``Options`` dataclass) and the shared
:class:`~gateway.plugin.Context`, then calls the methods marked with
:data:`gateway.hookimpl`.  A reload (SIGHUP) builds new instances for the
new policy; the old ones go on serving the sessions that were open and are
then dropped, with no hook called.  So keep state that must outlive a
reload outside the instance, and let the constructor raise if the plugin
cannot work: the reload is then refused and the running policy stays.  The
constructor also runs where a policy is only checked (``smtpgate lint``,
``smtpgate plugins``, the parent process before a start or reload); there
``context.resolver`` is ``None``, so a constructor asks no DNS::

    from dataclasses import dataclass
    from gateway import Plugin, Verdict, Reply, hookimpl

    class NoBob(Plugin):
        @dataclass(frozen=True)
        class Options:
            text: str = "Bob is not welcome here"

        @hookimpl
        async def rcpt(self, session, envelope, recipient):
            if recipient.address.local.lower() == "bob":
                return Verdict.reject(Reply(550, "5.7.1", self.options.text))
            return None

How the gateway calls hooks
---------------------------
* Every hook may be ``def`` or ``async def``.  The gateway calls every
  implementation of a stage in turn; a plain ``def`` answers there and
  then (keep it quick: nothing can interrupt it, and one that takes over
  0.25 s is logged as holding up the worker), while the awaitables,
  from ``async def`` hooks or from a ``def`` that returns a coroutine only
  when it must wait (say, for a DNS answer that is not cached), run
  concurrently, each under the policy's ``hook_timeout``.  A plain hook
  that answers at once is the cheapest: no task, no timer.
  :func:`gateway.then` helps write one that waits only on a cache miss.
* Each returns a :class:`~gateway.Verdict` or ``None`` (continue).  The
  gateway combines them: the most severe action wins (reject > defer > tag >
  accept > continue), ties go to the plugin listed first in the policy
  (among equal refusals, one with ``disconnect=True`` wins); the headers
  and scores of every verdict are kept.  A TAG verdict without headers of
  its own puts ``X-Smtpgate-Tag: PLUGIN: RESULT`` on the message; ACCEPT
  allow-lists the client only at connect, elsewhere it is recorded only.
* A refusal with ``disconnect=True`` ends the session once its reply is
  sent, at every stage; a DEFER's reply then goes with code 421 (keeping
  its enhanced code and text), the code that tells a client the
  connection is closing (RFC 5321 §3.8).  Nothing of an open transaction
  is delivered.
* A hook that raises (anything: ``SystemExit`` and ``CancelledError``
  too) or overruns its budget counts as ``451 4.3.0`` (at connect ``421
  4.3.0`` and a close, as a greeting may not be a 451): the client retries
  later, the traceback is logged with the plugin's name, and the session and
  the gateway go on.  A crashed check never lets mail pass.  An async hook
  that catches the cancellation at the end of its budget and answers
  anyway is still late: its answer is dropped for the 451; if it was the
  stage's only awaitable its session waits until it returns, otherwise it
  is left running and its answer is never read.
* In monitor mode (``[gateway] monitor = true``) refusals and failures are
  logged as what would have happened and the command goes on -- except
  those of a plugin whose class sets ``monitored = False``, as ``relay``
  and ``commands`` do.  A check that guards access rather than judges
  mail should set it: trying a policy must never open the relay.
* A refused command never reaches the next hop.  Replies to commands that
  pass come from the next hop (Postfix), verbatim.
* An implementation may accept fewer arguments than the spec names; pass
  them by these names.

Replies, headers and scores
---------------------------
* A DEFER needs a 4yz :class:`~gateway.Reply`, a REJECT a 5yz, each with
  an RFC 3463 enhanced code of the same class (``Reply(550, "5.7.1",
  text)``): the gateway offers ENHANCEDSTATUSCODES, and a client that reads
  only that code must read the same verdict.  :class:`~gateway.Verdict`
  raises ``ValueError`` otherwise, so the mistake shows as the hook's
  failure (451 and a traceback) the first time it happens.  Every refusal
  counts towards the session's ``max_errors``, as every other 4yz/5yz does.
* Any verdict may carry ``headers`` (``(name, value)`` string pairs; a
  name that is no header field name makes the hook a failure, 451) and a
  ``score`` (summed against ``[scoring]``, whatever the action).  Those of
  connect and HELO verdicts count for every transaction of the session (a
  new HELO replaces what the previous one gave), those of MAIL and DATA for
  the transaction, those of RCPT once the next hop accepts the recipient.
  The headers go on top of the message stage by stage (connect, HELO,
  MAIL, RCPT, DATA; within a stage in policy order), followed by
  ``X-Spam-Score`` and ``X-Spam-Status``.

Options
-------
``Options`` is a frozen dataclass; each field is a key of the plugin's
table, checked against its type hint when the policy is loaded (``lint``,
``serve``, every reload).  Hints may be ``bool``, ``int``, ``float``,
``str``, ``Literal[...]``, ``tuple[T, ...]`` (a TOML array; lists arrive as
tuples), ``dict[str, T]`` (a table) and unions of those; any other
hint is reported at load, set or not.  A field without
a default must be in the table.  For checks beyond types, give the class a
``check(self) -> dict[str, str]`` returning ``{key: "expected ..."}``; a
``ValueError`` from ``__post_init__`` is reported too, but names only the
table.  Every problem is reported as ``FILE: plugins.NAME.KEY: ...`` and
nothing starts.  ``enabled`` is the gateway's own key.  So is a plugin
that cannot be loaded, as ``FILE: plugins.NAME: ...``: a module that does
not import (an exception or ``sys.exit()`` at import), an ``Options`` that
is no dataclass or whose hints name what the module imports only for type
checkers, a constructor or an attribute pluggy reads at registration that
raises.  Every installed plugin is imported at start to see whether it
runs by default; one the policy does not enable that fails to import is
only logged.

Findings and actions
--------------------
The built-in checks report what they found and let the policy decide what
it means; a plugin of yours can do the same.  Derive ``Options`` from
:class:`~gateway.ActionOptions` and give it ``DEFAULT_ACTIONS`` (``{"listed":
"reject"}``; a finding left out only informs), return
:func:`~gateway.check_actions` ``(self.actions, FINDINGS, temporary)`` from
``check()``, and answer with :func:`~gateway.decide` ``(finding,
self.options.actions, reject=..., defer=..., result=...)``.  The policy's
``[plugins.NAME.actions]`` table, merged over the defaults, then maps each
finding to ``reject``, ``defer``, ``tag``, ``accept``, ``continue`` or a
score, and ``lint`` refuses an unknown finding or a temporary one mapped
to ``reject``.

State
-----
One instance serves every session of its worker, so keep per-session
state off ``self``: put it in ``session.stash`` under a
:class:`~gateway.StashKey` of your own (``KEY = StashKey[Counter]()``,
``session.stash.setdefault(KEY, Counter())``); it lives as long as the
connection, and an XCLIENT starts it afresh.  ``envelope.stash`` lives for
one transaction and ``message.stash`` for one message.  What other plugins
may read goes in ``session.results[self.name]``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from .session import Envelope, Message, Recipient, Session
    from .verdict import Verdict

hookspec = pluggy.HookspecMarker("smtpgate")

__all__ = ["connect", "helo", "mail", "rcpt", "data", "vrfy", "expn", "disconnect"]


# --- connection ---------------------------------------------------------------


@hookspec
def connect(session: Session) -> Verdict | None:
    """A client connected (or an authorised host sent XCLIENT).

    Runs before the greeting, and again after every XCLIENT with the new
    client identity.

    :param session: the client's address, names and port.  The names are
        looked up by then (``peername_lookup``: ``client_name`` forward-
        confirmed, ``reverse_name`` as published, ``"unknown"`` if none,
        ``name_tempfail`` if a lookup failed) or, after XCLIENT, what it
        said.  ``helo`` is ``None`` at a new connection (after XCLIENT,
        what XCLIENT said or the earlier HELO name).
    :returns: ``None`` to greet the client; a DEFER or REJECT verdict to
        refuse it.  A greeting may only be 220, 554, or 421 and a close
        (RFC 5321 §4.3.2), so the gateway sends a REJECT's reply with code
        554 in place of the greeting and answers every later command but
        QUIT with ``503 5.7.0 Error: access denied for name[address]``
        (§3.1, Postfix's words), and a DEFER's reply with code 421, then
        closes; the enhanced code and text are the plugin's.  With
        ``disconnect=True`` a REJECT closes after the reply too.  TAG verdicts stay on
        the session and their headers go on every message of the session.
        An ACCEPT verdict allow-lists the client for the session: the
        gateway sets ``session.allowlisted`` to ``"plugin:result"``, and
        later checks that honour it (``skip_allowlisted``) leave it alone.
    """


@hookspec
def helo(session: Session, hostname: str) -> Verdict | None:
    """HELO or EHLO, with the argument as the client sent it.

    :param session: ``session.helo`` still holds the previous name, if any;
        ``session.esmtp`` says whether this is EHLO.
    :param hostname: the argument (never empty: the gateway answers a bare
        HELO with 501 itself).
    :returns: ``None`` to accept; a DEFER or REJECT verdict refuses the
        command, and the client stays without a HELO (its next MAIL gets
        503); a transaction under way goes on, as only an accepted HELO
        resets it.
    """


# --- transaction --------------------------------------------------------------


@hookspec
def mail(session: Session, envelope: Envelope) -> Verdict | None:
    """MAIL FROM, after syntax and size checks.

    :param envelope: ``envelope.sender`` is the parsed reverse-path
        (``is_null`` for ``<>``), ``envelope.mail_params`` the ESMTP
        parameters; no recipients yet.
    :returns: ``None`` to pass the command to the next hop; DEFER/REJECT to
        refuse it (the transaction does not start); TAG verdicts are kept on
        the envelope and their headers added to this transaction's message.
    """


@hookspec
def rcpt(session: Session, envelope: Envelope, recipient: Recipient) -> Verdict | None:
    """RCPT TO, after syntax and the recipient limit.

    :param recipient: the parsed address and its ESMTP parameters.
        ``envelope.recipients`` holds the recipients accepted so far.
    :returns: ``None`` to pass the command to the next hop, whose reply
        decides; DEFER/REJECT to refuse this recipient only; TAG verdicts are
        kept on the envelope.
    """


@hookspec
def data(session: Session, envelope: Envelope, message: Message) -> Verdict | None:
    """End of DATA: the whole message has arrived, nothing is forwarded yet.

    :param message: ``message.raw`` is the message as the client sent it
        (dot-stuffing undone, CRLF line ends; bare CR and LF made CRLF with
        ``bare_newline = "normalize"``); ``message.headers`` is parsed on
        first use.
    :returns: ``None`` or TAG to forward the message (with every header of
        the session's and the transaction's TAG verdicts prepended); the
        client's reply is then the next hop's reply.  DEFER/REJECT to refuse
        the message: the next hop never sees it.
    """


# --- other commands -----------------------------------------------------------


@hookspec
def vrfy(session: Session, argument: str) -> Verdict | None:
    """VRFY.  The gateway never passes VRFY to the next hop.

    :returns: a verdict whose reply answers the client.  With no verdict the
        gateway answers ``502 5.5.1 VRFY command is disabled``.  A plugin
        that wants to allow VRFY returns ``Verdict(Action.ACCEPT, reply)``.
    """


@hookspec
def expn(session: Session, argument: str) -> Verdict | None:
    """EXPN.  The gateway never passes EXPN to the next hop.

    :returns: as :func:`vrfy`; the default is ``502 5.5.1 EXPN command is
        disabled``.
    """


@hookspec
def disconnect(session: Session) -> None:
    """The client is gone (QUIT, timeout, reset, or refused).

    Runs once per connection, also for one the connection limits
    (``max_connections``, ``max_connections_per_ip``) refused before any
    connect hook ran, so what ``connect`` put in ``session.stash`` may be
    missing; after XCLIENT, ``connect`` has run more than once.

    For bookkeeping only (counters, caches): the return value is not used
    (anything but ``None`` or a Verdict is logged as an error), and an
    exception is logged, never sent anywhere.
    """
