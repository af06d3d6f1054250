"""MAIL FROM hygiene: the sender's domain must be able to receive replies.

A bounce or a reply goes to the envelope sender (RFC 5321 §4.5.5, §6.1), so
a sender domain that cannot receive mail marks forged or broken mail.  The
checks and replies follow Postfix's ``reject_non_fqdn_sender`` and
``reject_unknown_sender_domain``:

* an internationalised domain must be U-labels (IDNA2008) separated by
  ASCII dots, as RFC 6531 §3.3 writes it: one that only UTS #46 mapping
  would make a domain (``good。mail。test``, fullwidth letters) is refused
  as bad syntax, never mapped;
* the domain must be fully qualified (it has a dot);
* it must exist for mail: an MX record, or failing that an A or AAAA
  record (the implicit MX of RFC 5321 §5.1);
* it must not publish a null MX (RFC 7505: the single record ``0 .``),
  which says the domain never receives mail (§4.2 recommends refusing
  such senders with 550 5.7.27).

The null sender ``<>`` (bounces) is always accepted, and trusted clients skip
every check.  An address literal (``user@[192.0.2.1]``) has nothing to look
up; it is reported as ``address_literal``, which only informs by default.

Options (``[plugins.sender]``, documented in docs/plugins/sender.md):
``actions``, ``skip_allowlisted``.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import unicodedata
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass
from typing import Any

import idna

from gateway import Address, Envelope, Plugin, Reply, Session, Verdict, hookimpl, then
from gateway.actions import ActionOptions, ActionSpec, check_actions, decide
from gateway.dns import Answer, Resolver, Status

__all__ = [
    "DEFAULT_ACTIONS",
    "FINDINGS",
    "Finding",
    "SenderPlugin",
    "check_sender",
    "domain_finding",
    "is_idna2008",
    "is_null_mx",
    "lookup_domain",
    "syntax_finding",
]


class Finding(enum.StrEnum):
    """What is wrong with a sender address."""

    #: The domain is not U-labels and ASCII dots (RFC 6531 §3.3, RFC 5890):
    #: ``bob@good。mail。test``, possible only with SMTPUTF8.
    INVALID_DOMAIN = "invalid_domain"
    #: The domain has no dot: ``MAIL FROM:<root@localhost>``.
    NOT_FQDN = "not_fqdn"
    #: No such domain, or neither MX nor A/AAAA records.
    NOT_FOUND = "not_found"
    #: The DNS could not say (SERVFAIL, timeout): ask again later.
    TEMPFAIL = "tempfail"
    #: The domain publishes a null MX (RFC 7505).
    NULL_MX = "null_mx"
    #: The domain is an address literal: nothing to look up.
    ADDRESS_LITERAL = "address_literal"


FINDINGS = tuple(str(f) for f in Finding)

#: Used for every finding the policy's ``actions`` table does not name.
DEFAULT_ACTIONS: Mapping[str, ActionSpec] = {
    "invalid_domain": "reject",
    "not_fqdn": "reject",
    "not_found": "reject",
    "tempfail": "defer",
    "null_mx": "reject",
    "address_literal": "continue",
}

# --- replies (Postfix's wording; candidates for gateway/replies.py) ----------
SENDER_INVALID_DOMAIN = Reply(501, "5.1.7", "<{address}>: Sender address rejected: Invalid domain name")
SENDER_NOT_FQDN = Reply(504, "5.5.2", "<{address}>: Sender address rejected: need fully-qualified address")
SENDER_NOT_FOUND = Reply(550, "5.1.8", "<{address}>: Sender address rejected: Domain not found")
SENDER_TEMPFAIL = Reply(450, "4.1.8", "<{address}>: Sender address rejected: Domain not found")
SENDER_NULL_MX = Reply(550, "5.7.27", "<{address}>: Sender address rejected: Domain does not accept mail (null MX)")
SENDER_ADDRESS_LITERAL = Reply(550, "5.7.1", "<{address}>: Sender address rejected: Address literal not accepted")

#: finding -> (reply for "reject", reply for "defer"); None: the core's 451
#: twin of the reject reply, or no reject at all for ``tempfail``.
REPLIES: Mapping[Finding, tuple[Reply | None, Reply | None]] = {
    Finding.INVALID_DOMAIN: (SENDER_INVALID_DOMAIN, None),
    Finding.NOT_FQDN: (SENDER_NOT_FQDN, None),
    Finding.NOT_FOUND: (SENDER_NOT_FOUND, SENDER_TEMPFAIL),
    Finding.TEMPFAIL: (None, SENDER_TEMPFAIL),
    Finding.NULL_MX: (SENDER_NULL_MX, None),
    Finding.ADDRESS_LITERAL: (SENDER_ADDRESS_LITERAL, None),
}


def is_idna2008(domain: str) -> bool:
    """Whether ``domain`` is labels separated by ``"."``, each an ASCII
    label or an IDNA2008 U-label (RFC 5890 §2.3.2.1) once case is folded
    and the label is in NFC.

    Nothing else is mapped: UTS #46 (which the resolver applies to what it
    is asked) would read ``。`` as a dot and ``ｇ`` as ``g``, but RFC 5891
    §5.2 and RFC 5895 leave mapping to what a user types; an SMTP client
    sends the name itself (RFC 6531 §3.3).  Case and normalisation are
    different: the DNS ignores case (RFC 4343) and IDNA2008 lookups take
    the NFC form (RFC 5891 §5.2), so ``BÜCHER.example`` is the domain
    ``bücher.example``, as Postfix and the resolver read it.  ASCII labels
    were judged by the address parser already.
    """
    for label in domain.split("."):
        if label.isascii():
            continue
        try:
            idna.encode(unicodedata.normalize("NFC", label.lower()), strict=True)
        except UnicodeError:  # idna.IDNAError is one
            return False
    return True


def syntax_finding(address: Address) -> Finding | None:
    """What the address itself says, before any DNS question; None for the
    null sender and for a fully qualified domain."""
    if address.is_null:
        return None
    domain = address.domain
    if domain.startswith("["):
        return Finding.ADDRESS_LITERAL
    if not domain.isascii() and not is_idna2008(domain):
        # Before the dot test: good。mail。test is no domain at all, not
        # an unqualified one.
        return Finding.INVALID_DOMAIN
    if "." not in domain:
        return Finding.NOT_FQDN
    return None


def is_null_mx(answer: Answer) -> bool:
    """Whether an MX answer is a null MX: every exchange is the root ``.``
    (RFC 7505 §3 allows only the one record ``0 .``; a root exchange names
    no host whatever its preference, so it is read the same way)."""
    return answer.ok and all(record.split()[-1] == "." for record in answer.records)


def domain_finding(mx: Answer, addresses: Answer | None) -> Finding | None:
    """The verdict on a domain from its MX answer and, when the MX answer
    leaves it open (NODATA), its A/AAAA answer (:meth:`Resolver.a_aaaa`).

    An MX that cannot be asked now is TEMPFAIL even if the domain has
    addresses: it might be a null MX.
    """
    if mx.ok:
        return Finding.NULL_MX if is_null_mx(mx) else None
    if mx.temporary:
        return Finding.TEMPFAIL
    if mx.status is Status.NXDOMAIN:
        return Finding.NOT_FOUND
    # NODATA: the implicit MX (RFC 5321 §5.1) is the domain's own address.
    if addresses is None or addresses.temporary:
        return Finding.TEMPFAIL
    return None if addresses.ok else Finding.NOT_FOUND


def cached_domain_finding(resolver: Resolver, domain: str) -> tuple[bool, Finding | None]:
    """``(True, finding)`` when the cached MX answer settles ``domain``
    (the usual case on a busy gateway), else ``(False, None)``."""
    mx = resolver.cached(domain, "MX")
    if mx is not None and mx.status is not Status.NODATA:
        return True, domain_finding(mx, None)
    return False, None


async def lookup_domain(resolver: Resolver, domain: str) -> Finding | None:
    """Ask MX and A/AAAA of ``domain`` concurrently (A/AAAA are only needed
    when there is no MX, but asking at once saves a round trip then), and
    judge with :func:`domain_finding`."""
    known, finding = cached_domain_finding(resolver, domain)
    if known:
        return finding  # no task, no wait
    addresses = asyncio.create_task(resolver.a_aaaa(domain))
    try:
        mx = await resolver.mx(domain)
        if mx.status is not Status.NODATA:
            return domain_finding(mx, None)
        return domain_finding(mx, await addresses)
    finally:
        if not addresses.done():
            # The resolver shields the queries themselves: they finish and
            # fill the cache; only our wait is dropped.
            addresses.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await addresses


def _verdict(finding: Finding, address: Address, actions: Mapping[str, ActionSpec]) -> Verdict:
    reject, defer = REPLIES[finding]
    return decide(
        finding,
        actions,
        reject=reject.format(address=address.mailbox) if reject else None,
        defer=defer.format(address=address.mailbox) if defer else None,
        result=f"sender={finding}",
    )


def check_sender(
    address: Address,
    resolver: Resolver | None,
    *,
    trusted: bool = False,
    actions: Mapping[str, ActionSpec] = DEFAULT_ACTIONS,
) -> Verdict | None | Coroutine[Any, Any, Verdict | None]:
    """The verdict on one MAIL FROM address; None for the null sender.
    Returned at once when no DNS answer has to be waited for, else as a
    coroutine (see :func:`gateway.then`)."""
    if address.is_null:
        return None
    if trusted:
        return Verdict(result="sender=trusted")

    def judged(finding: Finding | None) -> Verdict:
        return Verdict(result="sender=ok") if finding is None else _verdict(finding, address, actions)

    finding = syntax_finding(address)
    if finding is None and resolver is not None:
        known, finding = cached_domain_finding(resolver, address.domain)
        if not known:
            return then(lookup_domain(resolver, address.domain), judged)
    return judged(finding)


class SenderPlugin(Plugin):
    """Refuses senders whose domain cannot receive mail."""

    @dataclass(frozen=True)
    class Options(ActionOptions):
        DEFAULT_ACTIONS = DEFAULT_ACTIONS

        #: Leave clients alone that a connect check allow-listed (a DNSWL
        #: hit with the action ``accept``): the list vouches for the client.
        skip_allowlisted: bool = True

        def check(self) -> dict[str, str]:
            return check_actions(self.actions, FINDINGS, (Finding.TEMPFAIL,))

    default_enabled = False

    @hookimpl
    def mail(self, session: Session, envelope: Envelope) -> Verdict | None | Coroutine[Any, Any, Verdict | None]:
        if session.allowlisted and self.options.skip_allowlisted and not envelope.sender.is_null:
            return Verdict(result="sender=allowlisted")
        return check_sender(
            envelope.sender, self.context.resolver, trusted=session.trusted, actions=self.options.actions
        )
