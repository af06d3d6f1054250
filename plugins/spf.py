"""SPF (RFC 7208): may the client send mail for the MAIL FROM domain?

At MAIL the plugin runs pyspf's ``check_host()`` for the MAIL FROM identity
(for the null sender ``<>``, the HELO identity, RFC 7208 §2.4), with every
DNS question through the gateway's shared resolver
(:func:`gateway.dns.spf_check`).  With ``check_helo`` the HELO identity is
checked too, at the same time (§2.3); a HELO ``fail`` then decides.

The result is a *finding* (``pass``, ``fail``, ``softfail``, ``neutral``,
``none``, ``temperror``, ``permerror``) that the policy's ``actions`` map
turns into an action at MAIL, so a refused sender never sends DATA.  The
outcome is kept in ``session.results["spf"]`` (an :class:`SpfOutcome` for
this envelope) for the ``dkim`` and ``dmarc`` plugins, and at DATA the
plugin writes one ``Received-SPF`` header per identity checked (RFC 7208
§9.1) -- once per message, whatever the number of recipients.  It writes
the Authentication-Results header only when neither dkim nor dmarc is
enabled (see :mod:`plugins._authresults`).

Clients in ``trusted_networks`` are not checked.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import re
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import authres

from gateway import (
    Context,
    Envelope,
    Message,
    Plugin,
    Reply,
    Session,
    Verdict,
    hookimpl,
    then,
)
from gateway.actions import ActionOptions, ActionSpec, check_actions, decide
from gateway.dns import Resolver, spf_cached, spf_check

from . import _authresults as ar

__all__ = [
    "DEFAULT_ACTIONS",
    "FINDINGS",
    "RESULTS_KEY",
    "SPF_ERROR",
    "SPF_FAIL",
    "SPF_REJECTED",
    "SPF_TEMPERROR",
    "SpfOutcome",
    "SpfPlugin",
    "SpfResult",
    "ar_results",
    "ar_texts",
    "check_envelope",
    "check_identity",
    "received_spf",
    "spf_decision",
    "stored_outcome",
]

#: The SPF results (RFC 7208 §2.6) are the plugin's findings.
FINDINGS = ("pass", "fail", "softfail", "neutral", "none", "temperror", "permerror")
#: What the policy does with a finding unless ``actions`` says otherwise.
DEFAULT_ACTIONS: Mapping[str, ActionSpec] = {"fail": "reject", "temperror": "defer"}
#: Where the outcome is kept for later stages and the other auth plugins.
RESULTS_KEY = "spf"

# Replies, RFC 7372 codes, Postfix's "<address>: Sender address rejected:"
# shape.  {what} is "Sender address" (MAIL FROM) or "Helo command" (HELO).
SPF_FAIL = Reply(550, "5.7.23", "<{identity}>: {what} rejected: SPF fail - not authorized by {domain} for {ip}")
SPF_TEMPERROR = Reply(451, "4.7.24", "<{identity}>: {what} rejected: SPF temperror - DNS error for {domain}, try again later")
SPF_ERROR = Reply(550, "5.7.24", "<{identity}>: {what} rejected: SPF {result} - {problem}")
#: For results a policy chooses to refuse although SPF has no code for them.
SPF_REJECTED = Reply(550, "5.7.1", "<{identity}>: {what} rejected: SPF {result} for {domain}")

Identity = Literal["mailfrom", "helo"]


@dataclass(frozen=True, slots=True)
class SpfResult:
    """One ``check_host()`` evaluation.

    :param identity: ``"mailfrom"`` or ``"helo"`` (RFC 7208 §2.3, §2.4).
    :param result: one of :data:`FINDINGS`.
    :param domain: the domain checked (ASCII, lower case), or the name as
        given when it is no domain (then the result is ``none``).
    :param sender: the address checked; ``postmaster@HELO`` for the HELO
        identity.
    :param explanation: pyspf's explanation: the domain's ``exp=`` text for
        ``fail``, the problem for the errors.
    """

    identity: Identity
    result: str
    domain: str
    sender: str
    ip: str
    helo: str
    explanation: str = ""


@dataclass(frozen=True, slots=True)
class SpfOutcome:
    """What SPF said about one transaction.

    :param envelope_id: the transaction it belongs to (``session.results``
        outlives transactions).
    :param identity: the result for the identity SPF authorises: MAIL FROM,
        or HELO for ``<>``.  DMARC uses this one.
    :param helo: the separate HELO check (``check_helo``, non-null senders).
    """

    envelope_id: str
    identity: SpfResult
    helo: SpfResult | None = None
    #: the MAIL FROM address as the client sent it ("" for <>).
    mail_from: str = ""

    @property
    def results(self) -> tuple[SpfResult, ...]:
        """Every check made, HELO first."""
        return (self.helo, self.identity) if self.helo is not None else (self.identity,)

    @property
    def deciding(self) -> SpfResult:
        """The result the policy acts on: a HELO ``fail``, else the identity's."""
        if self.helo is not None and self.helo.result == "fail":
            return self.helo
        return self.identity


# ------------------------------------------------------------------ checking


@dataclass(frozen=True, slots=True)
class _Question:
    """One identity's check, as :func:`gateway.dns.spf_check` takes it."""

    identity: Identity
    domain: str
    checked: str
    ip: str
    helo: str

    def args(self) -> tuple[str, str, str]:
        """``(ip, sender, helo)``: the HELO identity is checked as a bounce's."""
        if self.identity == "helo":
            return self.ip, "", self.domain
        return self.ip, self.checked, self.helo

    def result(self, found: tuple[str, str]) -> SpfResult:
        return SpfResult(self.identity, found[0], self.domain, self.checked, self.ip, self.helo, found[1])


# Asked for every message with the same few (client, sender, HELO): the
# domain checks cost more than the cached result they lead to.
@functools.lru_cache(maxsize=1024)
def _question(ip: str, identity: Identity, sender: str, helo: str) -> _Question | SpfResult:
    """What to check for one identity, or its result if no question is
    needed: a domain that is no multi-label host name (an address literal,
    one label, bad syntax) is ``none`` (RFC 7208 §4.3)."""
    if identity == "helo":
        raw_domain, local = helo, "postmaster"
    else:
        local, _, raw_domain = sender.rpartition("@")
    domain = ar.domain_or_none(raw_domain)
    if domain is None:
        return SpfResult(identity, "none", raw_domain, sender or f"postmaster@{helo}", ip, helo,
                         "not a domain name")
    return _Question(identity, domain, f"{local}@{domain}", ip, helo)


def cached_identity(resolver: Resolver, ip: str, identity: Identity, sender: str, helo: str) -> SpfResult | None:
    """:func:`check_identity`'s result if it needs no waiting, else None."""
    question = _question(ip, identity, sender, helo)
    if isinstance(question, SpfResult):
        return question
    found = spf_cached(resolver, *question.args())
    return question.result(found) if found is not None else None


async def check_identity(
    resolver: Resolver, ip: str, identity: Identity, sender: str, helo: str
) -> SpfResult:
    """Evaluate one identity: ``sender`` for ``"mailfrom"`` (``local@domain``),
    ignored for ``"helo"``."""
    question = _question(ip, identity, sender, helo)
    if isinstance(question, SpfResult):
        return question
    return question.result(await spf_check(resolver, *question.args()))


def _client(session: Session) -> str:
    address = session.client_ip
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped  # a dual-stack socket's view of an IPv4 client
    return str(address)


def cached_envelope(
    resolver: Resolver, session: Session, envelope: Envelope, *, check_helo: bool = False
) -> SpfOutcome | None:
    """:func:`check_envelope`'s outcome when every result it needs is in the
    short-lived result cache (or needs no question), else None."""
    ip, helo, sender = _client(session), session.helo or "", envelope.sender
    if sender.is_null:
        bounce = cached_identity(resolver, ip, "helo", "", helo)
        return SpfOutcome(envelope.id, bounce) if bounce is not None else None
    identity = cached_identity(resolver, ip, "mailfrom", sender.mailbox, helo)
    if identity is None or not check_helo:
        return SpfOutcome(envelope.id, identity, mail_from=sender.mailbox) if identity is not None else None
    helo_result = cached_identity(resolver, ip, "helo", "", helo)
    return SpfOutcome(envelope.id, identity, helo_result, sender.mailbox) if helo_result is not None else None


async def check_envelope(
    resolver: Resolver, session: Session, envelope: Envelope, *, check_helo: bool = False
) -> SpfOutcome:
    """The SPF outcome of a transaction (both checks run concurrently)."""
    known = cached_envelope(resolver, session, envelope, check_helo=check_helo)
    if known is not None:
        return known
    ip, helo, sender = _client(session), session.helo or "", envelope.sender
    if sender.is_null:
        return SpfOutcome(envelope.id, await check_identity(resolver, ip, "helo", "", helo))
    mailbox = sender.mailbox
    if not check_helo:
        return SpfOutcome(envelope.id, await check_identity(resolver, ip, "mailfrom", mailbox, helo), mail_from=mailbox)
    helo_result, identity = await asyncio.gather(
        check_identity(resolver, ip, "helo", "", helo),
        check_identity(resolver, ip, "mailfrom", mailbox, helo),
    )
    return SpfOutcome(envelope.id, identity, helo_result, mailbox)


def stored_outcome(session: Session, envelope: Envelope) -> SpfOutcome | None:
    """The outcome kept for this transaction, if SPF was checked."""
    outcome = session.results.get(RESULTS_KEY)
    if isinstance(outcome, SpfOutcome) and outcome.envelope_id == envelope.id:
        return outcome
    return None


# ------------------------------------------------------------------ deciding

_PRINTABLE = re.compile(r"[^\x20-\x7e]+")


def _reply_text(text: str, limit: int = 200) -> str:
    """Domain-supplied text made safe for a reply line."""
    text = " ".join(_PRINTABLE.sub(" ", text).split())
    return text[: limit - 3] + "..." if len(text) > limit else text


def _replies(result: SpfResult, mail_from: str = "") -> tuple[Reply, Reply | None]:
    """(reply if refused, temporary reply if deferred) for ``result``;
    made once per distinct result (:data:`_REPLIES`), as most are never
    sent.  ``mail_from``: the MAIL FROM address as the client sent it."""
    return _REPLIES((result, mail_from))


def _make_replies(result: SpfResult, mail_from: str = "") -> tuple[Reply, Reply | None]:
    # The address as sent (Alice@Auth.Test, a U-label domain), as Postfix
    # quotes it before "Sender address rejected" and logs it (from=<...>);
    # result.sender has the domain as checked, which {domain} names.
    sender = mail_from or result.sender
    fields = {
        "identity": sender if result.identity == "mailfrom" else result.helo,
        "what": "Sender address" if result.identity == "mailfrom" else "Helo command",
        "domain": result.domain,
        "ip": result.ip,
        "result": result.result,
    }
    if result.result == "fail":
        reply = SPF_FAIL.format(**fields)
        explanation = _reply_text(result.explanation)
        if explanation and explanation != "SPF fail - not authorized":
            # RFC 7208 §6.2: the domain's explanation goes to the sender.
            reply = reply.with_text(f"{reply.text}\n{explanation}")
        return reply, None
    if result.result in ("temperror", "permerror"):
        problem = _reply_text(result.explanation) or f"error in the SPF record of {result.domain}"
        # A deferred permerror says what it is, in the 4yz twin of its 5yz.
        temporary = SPF_TEMPERROR.format(**fields) if result.result == "temperror" else None
        return SPF_ERROR.format(problem=problem, **fields), temporary
    return SPF_REJECTED.format(**fields), None


_REPLIES: ar.Memo[tuple[SpfResult, str], tuple[Reply, Reply | None]] = ar.Memo(
    lambda key: _make_replies(*key),
    lambda key: len(key[1]) + len(key[0].sender) + len(key[0].helo) + len(key[0].domain) + len(key[0].ip)
    + len(key[0].explanation),
)


def spf_decision(outcome: SpfOutcome, actions: Mapping[str, ActionSpec]) -> Verdict:
    """The MAIL verdict for ``outcome`` under ``actions``; its ``result``
    reads ``spf=fail`` (``spf=fail helo`` when the HELO check decided)."""
    deciding = outcome.deciding
    reject, defer = _replies(deciding, outcome.mail_from)
    label = f"spf={deciding.result}" + (" helo" if deciding.identity == "helo" and outcome.helo is not None else "")
    return decide(deciding.result, actions, reject=reject, defer=defer, result=label)


# ------------------------------------------------------------------ headers

_DOT_ATOM = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*\Z")

_COMMENTS = {
    "pass": "domain of {sender} designates {ip} as permitted sender",
    "fail": "domain of {sender} does not designate {ip} as permitted sender",
    "softfail": "transitioning domain of {sender} does not designate {ip} as permitted sender",
    "neutral": "{ip} is neither permitted nor denied by domain of {sender}",
    "none": "{ip} is neither permitted nor denied by domain of {sender}",
    "temperror": "temporary error in processing during lookup of {sender}",
    "permerror": "permanent error in processing domain of {sender}",
}


def _kv_value(text: str) -> str:
    """A Received-SPF value: dot-atom as is, anything else quoted; one too
    long for a header line cut, with a comment after it (RFC 7208 §9.1
    allows one there)."""
    text, cut = ar.bounded(_PRINTABLE.sub("?", text))
    if not _DOT_ATOM.match(text):
        text = '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return f"{text} ({cut})" if cut else text


@functools.lru_cache(maxsize=1024)
def received_spf(result: SpfResult, receiver: str, mail_from: str = "") -> tuple[str, str]:
    """The ``Received-SPF`` header (RFC 7208 §9.1) for one check; the same
    result for the same sender (a server sending many messages) is
    formatted once."""
    text = ar.comment(_COMMENTS[result.result].format(sender=result.sender, ip=result.ip))
    pairs = [
        ("receiver", receiver),
        ("client-ip", result.ip),
        ("envelope-from", mail_from),
        ("helo", result.helo),
        ("identity", result.identity),
    ]
    if result.result in ("temperror", "permerror") and result.explanation:
        pairs.append(("problem", ar.comment(result.explanation)))
    value = f"{result.result} ({ar.comment(receiver)}: {text}) " + " ".join(
        f"{key}={_kv_value(val)};" for key, val in pairs
    )
    return "Received-SPF", ar.fold("Received-SPF", value)


def ar_results(outcome: SpfOutcome) -> list[Any]:
    """The ``spf=`` clauses for Authentication-Results (RFC 8601 §2.7.2):
    ``smtp.helo`` for the HELO identity, ``smtp.mailfrom`` for MAIL FROM
    (the address when its local part is a plain dot-atom, else the domain)."""
    return [_ar_clause(result) for result in outcome.results]


def _ar_clause(result: SpfResult) -> Any:
    if result.identity == "helo":
        prop = ar.property_("smtp", "helo", _PRINTABLE.sub("?", result.helo) or "unknown")
    else:
        local = result.sender.rpartition("@")[0]
        value = result.sender if _DOT_ATOM.match(local) else result.domain
        prop = ar.property_("smtp", "mailfrom", value)
    return authres.SPFAuthenticationResult(result=result.result, properties=[prop])


_AR_TEXTS = ar.Memo(ar.clause_text(_ar_clause), lambda r: len(r.sender) + len(r.helo) + len(r.domain) + len(r.ip) + len(r.explanation))


def ar_texts(outcome: SpfOutcome) -> list[str]:
    """:func:`ar_results` as text, formatted once per distinct result."""
    return [_AR_TEXTS(result) for result in outcome.results]


# ------------------------------------------------------------------ plugin


class SpfPlugin(Plugin):
    """Checks the sender's SPF record at MAIL, writes Received-SPF at DATA."""

    @dataclass(frozen=True)
    class Options(ActionOptions):
        DEFAULT_ACTIONS = DEFAULT_ACTIONS

        #: also check the HELO identity (RFC 7208 §2.3); a HELO fail decides.
        check_helo: bool = False
        #: write a Received-SPF header per identity checked.
        received_spf: bool = True

        def check(self) -> dict[str, str]:
            return check_actions(self.actions, FINDINGS, ("temperror",))

    def __init__(self, options: Any, context: Context, name: str = "") -> None:
        super().__init__(options, context, name)

    @hookimpl
    def mail(self, session: Session, envelope: Envelope) -> Verdict | None | Coroutine[Any, Any, Verdict | None]:
        if session.trusted:
            return None
        resolver, check_helo = self.context.resolver, self.options.check_helo
        known = cached_envelope(resolver, session, envelope, check_helo=check_helo)

        def decided(outcome: SpfOutcome) -> Verdict | None:
            session.results[RESULTS_KEY] = outcome
            return spf_decision(outcome, self.options.actions)

        if known is not None:
            return decided(known)  # a plain answer: no task for the gateway
        return then(check_envelope(resolver, session, envelope, check_helo=check_helo), decided)

    @hookimpl
    def data(self, session: Session, envelope: Envelope, message: Message) -> Verdict | None:
        outcome = stored_outcome(session, envelope)
        if outcome is None:
            return None
        headers: list[tuple[str, str]] = []
        if self.options.received_spf:
            headers += [received_spf(r, self.context.hostname, outcome.mail_from) for r in outcome.results]
        if ar.reporter(self.context) == "spf":
            headers.append(ar.authentication_results(self.context.hostname, ar_texts(outcome)))
        return Verdict(headers=tuple(headers)) if headers else None
