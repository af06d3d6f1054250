"""Relay control: the gateway is never an open relay.

Anyone may send to the domains in ``[gateway] local_domains``; every other
destination is accepted only from trusted clients (``[gateway]
trusted_networks``, judged again after XCLIENT).  Anything else gets
Postfix's ``554 5.7.1 <address>: Relay access denied``.

The plugin is enabled by default: a policy that forgets ``[plugins.relay]``
still gets relay protection.  ``enabled = false`` turns it off, for a next
hop that does the job itself.

Options (``[plugins.relay]``):

``allow_subdomains`` (default ``false``)
    Count every subdomain of a local domain as local (``a.example.com`` when
    ``example.com`` is listed), like Postfix's
    ``parent_domain_matches_subdomains`` for ``relay_domains``.

From an untrusted client a recipient is local only when nothing in it can
send the mail elsewhere: no source route, no ``@``, ``%`` or ``!`` in the
local part (quoted or not), a domain that is exactly a local domain (not an
address literal, not with a trailing dot).  The bare ``<Postmaster>`` of
RFC 5321 §4.5.1 is always accepted.  Trusted clients may relay anywhere.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

from gateway import Address, Plugin, Recipient, Session, Verdict, hookimpl, replies

__all__ = ["Finding", "RelayPlugin", "classify", "relay_decision"]


class Finding(enum.StrEnum):
    """What a recipient address is, as far as relaying goes."""

    LOCAL = "local"
    #: RCPT TO:<Postmaster> without a domain (RFC 5321 §4.5.1).
    POSTMASTER = "postmaster"
    REMOTE = "remote"
    #: A subdomain of a local domain, with ``allow_subdomains = false``.
    SUBDOMAIN = "subdomain"
    TRAILING_DOT = "trailing-dot"
    ADDRESS_LITERAL = "address-literal"
    NO_DOMAIN = "no-domain"
    SOURCE_ROUTE = "source-route"
    AT_IN_LOCAL_PART = "at-in-local-part"
    PERCENT_HACK = "percent-hack"
    BANG_PATH = "bang-path"

    @property
    def is_local(self) -> bool:
        return self is Finding.LOCAL or self is Finding.POSTMASTER


def _is_subdomain(domain: str, is_local: Callable[[str], bool]) -> bool:
    labels = domain.split(".")
    if "" in labels:
        # ".example.com" or "a..example.com" names nothing of ours.
        return False
    return any(is_local(".".join(labels[i:])) for i in range(1, len(labels)))


def classify(
    address: Address, is_local: Callable[[str], bool], *, allow_subdomains: bool = False
) -> Finding:
    """Say whether ``address`` is local, and if not, why.

    :param is_local: exact, case-insensitive test of a domain against
        ``local_domains`` (:meth:`gateway.Context.is_local_domain`).
    """
    if address.route:
        # RFC 5321 §3.3 lets a server decline the relaying a route implies;
        # whichever end of it is local, the other end may not be.
        return Finding.SOURCE_ROUTE
    domain = address.domain
    if not domain:
        # The parser only lets the bare <Postmaster> through; anything else
        # without a domain would be completed by the next hop, not by us.
        return Finding.POSTMASTER if address.local.lower() == "postmaster" else Finding.NO_DOMAIN
    if domain.startswith("["):
        # Deliverable to whatever host the literal names; local_domains
        # cannot hold literals.
        return Finding.ADDRESS_LITERAL
    if domain.endswith("."):
        return Finding.TRAILING_DOT
    if not is_local(domain):
        if not _is_subdomain(domain, is_local):
            return Finding.REMOTE
        if not allow_subdomains:
            return Finding.SUBDOMAIN
    # The domain is ours, but the next hop may still read a routing operator
    # in the local part and send the mail on (Postfix: resolve_dequoted_address,
    # allow_percent_hack, swap_bangpath).  Quoting does not hide it.
    local = address.local_unquoted
    if "@" in local:
        return Finding.AT_IN_LOCAL_PART
    if "%" in local:
        return Finding.PERCENT_HACK
    if "!" in local:
        return Finding.BANG_PATH
    return Finding.LOCAL


# Built once: these are returned for nearly every recipient.
_LOCAL_VERDICTS = {f: Verdict(result=f"relay={f}") for f in Finding if f.is_local}
_TRUSTED_VERDICTS = {f: Verdict(result=f"relay=trusted {f}") for f in Finding if not f.is_local}


def relay_decision(
    address: Address,
    is_local: Callable[[str], bool],
    trusted: bool,
    *,
    allow_subdomains: bool = False,
) -> Verdict:
    """The relay verdict for one recipient.

    :returns: a CONTINUE verdict recording ``relay=local``,
        ``relay=postmaster`` or ``relay=trusted <finding>``; or a REJECT with
        ``554 5.7.1 <address>: Relay access denied`` and
        ``relay=denied <finding>``.
    """
    finding = classify(address, is_local, allow_subdomains=allow_subdomains)
    if finding.is_local:
        return _LOCAL_VERDICTS[finding]
    if trusted:
        return _TRUSTED_VERDICTS[finding]
    return Verdict.reject(
        replies.RELAY_DENIED.format(address=address.mailbox), result=f"relay=denied {finding}"
    )


class RelayPlugin(Plugin):
    """Refuses recipients outside ``local_domains`` from untrusted clients."""

    @dataclass(frozen=True)
    class Options:
        allow_subdomains: bool = False

    # Forgetting the table, or trying a policy in monitor mode, must never
    # make the gateway an open relay.
    default_enabled = True
    monitored = False

    # A plain def: the check is pure computation, no coroutine needed.
    @hookimpl
    def rcpt(self, session: Session, recipient: Recipient) -> Verdict:
        return relay_decision(
            recipient.address,
            self.context.is_local_domain,
            session.trusted,
            allow_subdomains=self.options.allow_subdomains,
        )
