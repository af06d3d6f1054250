"""HELO/EHLO hygiene: the name a client gives must be one it can own.

RFC 5321 §4.1.1.1 and §2.3.5: the argument of HELO/EHLO is the client's
fully-qualified domain name, or an address literal (``[192.0.2.1]``,
``[IPv6:2001:db8::1]``) when it has none.  Spam software often sends garbage,
a bare word, a bare IP address, ``localhost``, or the receiving server's own
name or address.  The checks and their replies follow Postfix's
``reject_invalid_helo_hostname``, ``reject_non_fqdn_helo_hostname`` and
``reject_unknown_helo_hostname``; the optional forward-confirmed reverse DNS
check of the client follows ``reject_unknown_client_hostname`` (RFC 8601
§3 "iprev", RFC 7372 code 5.7.25).

Options (``[plugins.helo]``, documented in docs/plugins/helo.md):
``resolve``, ``fcrdns``, ``own_names``, ``own_addresses``, ``actions``,
``skip_allowlisted``.

Trusted clients skip every check.  A refused HELO stays refused: a later
HELO/EHLO in the same session gets the first refusal again, whatever name it
gives, so a client cannot try names until one passes.  XCLIENT starts the
client afresh (the core clears ``session.results``).
"""

from __future__ import annotations

import asyncio
import enum
import ipaddress
import re
import time
from collections.abc import Coroutine, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from gateway import Context, Plugin, Reply, Session, Verdict, hookimpl
from gateway.actions import ActionOptions, ActionSpec, check_actions, decide
from gateway.address import is_domain, may_be_ip
from gateway.dns import MAX_TTL, Answer, Resolver, TtlMemo
from gateway.verdict import combine

__all__ = [
    "DEFAULT_ACTIONS",
    "FINDINGS",
    "Fcrdns",
    "Finding",
    "HeloPlugin",
    "HeloState",
    "check_fcrdns",
    "check_helo",
    "classify",
    "host_finding",
    "parse_literal",
    "valid_hostname",
    "without_root",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class Finding(enum.StrEnum):
    """What is wrong with a HELO name, or with the client's reverse DNS."""

    #: Not a host name nor an address literal by RFC 5321 syntax.
    INVALID = "invalid"
    #: A single label: ``HELO mailserver``.
    NOT_FQDN = "not_fqdn"
    #: An IP address without brackets: ``HELO 192.0.2.1``.
    BARE_IP = "bare_ip"
    #: ``localhost`` and friends, or a loopback address.
    LOCALHOST = "localhost"
    #: Our own host name (``[gateway] hostname``, ``own_names``) or address.
    IMPERSONATION = "impersonation"
    #: An address literal other than the client's address.
    LITERAL_MISMATCH = "literal_mismatch"
    #: ``resolve``: the name has no A or AAAA record (NXDOMAIN or NODATA).
    NOT_FOUND = "not_found"
    #: ``resolve``: the lookup failed (SERVFAIL, timeout).
    TEMPFAIL = "tempfail"
    #: ``fcrdns``: no PTR, or no PTR name resolves back to the client.
    NO_FCRDNS = "no_fcrdns"
    #: ``fcrdns``: the PTR or forward lookup failed.
    FCRDNS_TEMPFAIL = "fcrdns_tempfail"


FINDINGS = tuple(str(f) for f in Finding)

#: Used for every finding the policy's ``actions`` table does not name.
DEFAULT_ACTIONS: Mapping[str, ActionSpec] = {
    "invalid": "reject",
    "not_fqdn": "reject",
    "bare_ip": "reject",
    "localhost": "reject",
    "impersonation": "reject",
    "literal_mismatch": "continue",
    "not_found": "reject",
    "tempfail": "defer",
    "no_fcrdns": "continue",
    "fcrdns_tempfail": "continue",
}

# Findings that only ever have a temporary reply.
_TEMPORARY = frozenset({Finding.TEMPFAIL, Finding.FCRDNS_TEMPFAIL})
# Findings about the client's address rather than the name it gave.
_CLIENT = frozenset({Finding.NO_FCRDNS, Finding.FCRDNS_TEMPFAIL})

# --- replies (Postfix's wording; candidates for gateway/replies.py) ----------
HELO_INVALID = Reply(501, "5.5.2", "<{helo}>: Helo command rejected: Invalid name")
HELO_NOT_FQDN = Reply(504, "5.5.2", "<{helo}>: Helo command rejected: need fully-qualified hostname")
HELO_BARE_IP = Reply(550, "5.7.1", "<{helo}>: Helo command rejected: Bare IP address, use an address literal in brackets")
HELO_LOCALHOST = Reply(550, "5.7.1", "<{helo}>: Helo command rejected: You are not localhost")
HELO_IMPERSONATION = Reply(550, "5.7.1", "<{helo}>: Helo command rejected: Host name or address is our own")
HELO_LITERAL_MISMATCH = Reply(550, "5.7.1", "<{helo}>: Helo command rejected: Address literal is not your address")
HELO_NOT_FOUND = Reply(550, "5.7.1", "<{helo}>: Helo command rejected: Host not found")
HELO_TEMPFAIL = Reply(450, "4.7.1", "<{helo}>: Helo command rejected: Host not found")
CLIENT_NO_FCRDNS = Reply(550, "5.7.25", "Client host rejected: cannot find your hostname, [{ip}]")
CLIENT_FCRDNS_TEMPFAIL = Reply(450, "4.7.25", "Client host rejected: cannot find your hostname, [{ip}]")

#: finding -> (reply for "reject", reply for "defer"); None: the core's 451
#: twin of the reject reply, or no reject at all for the temporary findings.
REPLIES: Mapping[Finding, tuple[Reply | None, Reply | None]] = {
    Finding.INVALID: (HELO_INVALID, None),
    Finding.NOT_FQDN: (HELO_NOT_FQDN, None),
    Finding.BARE_IP: (HELO_BARE_IP, None),
    Finding.LOCALHOST: (HELO_LOCALHOST, None),
    Finding.IMPERSONATION: (HELO_IMPERSONATION, None),
    Finding.LITERAL_MISMATCH: (HELO_LITERAL_MISMATCH, None),
    Finding.NOT_FOUND: (HELO_NOT_FOUND, HELO_TEMPFAIL),
    Finding.TEMPFAIL: (None, HELO_TEMPFAIL),
    Finding.NO_FCRDNS: (CLIENT_NO_FCRDNS, CLIENT_FCRDNS_TEMPFAIL),
    Finding.FCRDNS_TEMPFAIL: (None, CLIENT_FCRDNS_TEMPFAIL),
}

#: Names that always mean "this machine" (RFC 6761 §6.3 reserves .localhost).
LOCALHOST_NAMES = frozenset(
    {"localhost", "localhost.localdomain", "localhost4", "localhost4.localdomain4",
     "localhost6", "localhost6.localdomain6", "ip6-localhost", "ip6-loopback"}
)

#: At most this many PTR names are checked (as RFC 7208 §5.5 does for "ptr").
MAX_PTR_NAMES = 10

# Postfix's valid_hostname(): letters, digits, "_" (seen in the wild), and
# "-" inside a label; labels of 1-63 characters.
_LABEL = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?\Z")


# --------------------------------------------------------------- syntax


def valid_hostname(name: str) -> bool:
    """Whether ``name`` is a host name: ASCII labels of letters, digits, ``_``
    and inner ``-``, 1-63 characters each, 253 in all, no empty label (so no
    leading or trailing dot) and a top-level label that is not all digits
    (RFC 1123 §2.1)."""
    if not name or len(name) > 253 or not name.isascii():
        return False
    labels = name.split(".")
    return all(_LABEL.match(label) for label in labels) and not labels[-1].isdigit()


def without_root(name: str) -> str:
    """``name`` without one trailing dot (the DNS root), as Postfix's HELO
    restrictions take it ("truncate hostnames ending in dot but not
    dot-dot"): ``mx.example.org.`` is ``mx.example.org``, and
    ``mailserver.`` is still not fully qualified."""
    return name[:-1] if name.endswith(".") and not name.endswith("..") else name


def parse_literal(text: str) -> IPAddress:
    """The address in an RFC 5321 address literal: ``[192.0.2.1]`` or
    ``[IPv6:2001:db8::1]``.  Raises ValueError for anything else, including
    general literals (``[tag:content]``) and zone indexes."""
    if len(text) < 3 or text[0] != "[" or text[-1] != "]" or "%" in text:
        raise ValueError(f"not an address literal: {text!r}")
    inner = text[1:-1]
    if inner[:5].lower() == "ipv6:":
        return ipaddress.IPv6Address(inner[5:])
    return ipaddress.IPv4Address(inner)


def _plain(ip: IPAddress) -> IPAddress:
    """An IPv4-mapped IPv6 address as the IPv4 address it carries."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _ip_finding(
    ip: IPAddress, client_ip: IPAddress, own_networks: Iterable[Network], *, bracketed: bool
) -> Finding | None:
    ip = _plain(ip)
    if ip.is_loopback:
        return Finding.LOCALHOST
    if any(ip in net for net in own_networks):
        return Finding.IMPERSONATION
    if not bracketed:
        return Finding.BARE_IP
    if ip != _plain(client_ip):
        return Finding.LITERAL_MISMATCH
    return None


def classify(
    hostname: str,
    client_ip: IPAddress,
    *,
    own_names: frozenset[str] = frozenset(),
    own_networks: tuple[Network, ...] = (),
) -> Finding | None:
    """What is wrong with ``hostname`` as a HELO argument from ``client_ip``,
    without asking the DNS; None if nothing.

    :param own_names: our own names, lower-case (the gateway's host name and
        ``own_names``).
    :param own_networks: our own addresses (the listen address and
        ``own_addresses``).

    >>> classify("mail.example.org", ipaddress.ip_address("192.0.2.1")) is None
    True
    >>> classify("mailserver", ipaddress.ip_address("192.0.2.1"))
    <Finding.NOT_FQDN: 'not_fqdn'>
    """
    if hostname.startswith("["):
        try:
            literal = parse_literal(hostname)
        except ValueError:
            return Finding.INVALID
        return _ip_finding(literal, client_ip, own_networks, bracketed=True)
    if "%" not in hostname and may_be_ip(hostname):
        try:
            bare = ipaddress.ip_address(hostname)
        except ValueError:
            pass
        else:
            return _ip_finding(bare, client_ip, own_networks, bracketed=False)
    hostname = without_root(hostname)
    if not valid_hostname(hostname):
        return Finding.INVALID
    name = hostname.lower()
    if name in LOCALHOST_NAMES or name.endswith(".localhost"):
        return Finding.LOCALHOST
    if name in own_names:
        return Finding.IMPERSONATION
    if "." not in name:
        return Finding.NOT_FQDN
    return None


# ------------------------------------------------------------------ DNS


def host_finding(answer: Answer) -> Finding | None:
    """The ``resolve`` check from an :meth:`Resolver.a_aaaa` answer."""
    if answer.ok:
        return None
    return Finding.TEMPFAIL if answer.temporary else Finding.NOT_FOUND


@dataclass(frozen=True)
class Fcrdns:
    """The outcome of the forward-confirmed reverse DNS check.

    :param finding: None if the client's address is confirmed.
    :param names: the PTR names that resolve back to the address.
    """

    finding: Finding | None
    names: tuple[str, ...] = ()
    #: seconds the answers it was made of stay valid (ReverseDNS.ttl)
    ttl: int = field(default=0, compare=False)

    @property
    def result(self) -> str:
        if self.finding is None:
            return f"fcrdns=pass ({self.names[0]})"
        return "fcrdns=fail" if self.finding is Finding.NO_FCRDNS else "fcrdns=tempfail"


async def check_fcrdns(resolver: Resolver, ip: IPAddress, *, max_names: int = MAX_PTR_NAMES) -> Fcrdns:
    """PTR of ``ip``, then A (or AAAA) of each name: is ``ip`` among them?
    A temporary failure counts only when no name confirms."""
    found = await resolver.fcrdns(str(_plain(ip)), max_names=max_names)
    if found.confirmed:
        return Fcrdns(None, found.confirmed, found.ttl)
    return Fcrdns(Finding.FCRDNS_TEMPFAIL if found.temporary else Finding.NO_FCRDNS, ttl=found.ttl)


# ---------------------------------------------------------------- verdict


@dataclass(frozen=True)
class HeloState:
    """What the plugin keeps in ``session.results[NAME]`` between HELOs.

    :param hostname: the last name judged.
    :param findings: what was found about it (and about the client).
    :param refusal: the first refusal of the session, repeated to every later
        HELO/EHLO; None while nothing was refused.
    :param fcrdns: the reverse DNS outcome, checked once per session.
    """

    hostname: str
    findings: tuple[str, ...] = ()
    refusal: Verdict | None = None
    fcrdns: Fcrdns | None = None


def _verdict(
    finding: Finding, actions: Mapping[str, ActionSpec], hostname: str, client_ip: IPAddress, result: str
) -> Verdict:
    reject, defer = REPLIES[finding]
    fields = {"helo": hostname, "ip": _plain(client_ip)}
    return decide(
        finding,
        actions,
        reject=reject.format(**fields) if reject else None,
        defer=defer.format(**fields) if defer else None,
        result=result,
    )


async def check_helo(
    hostname: str,
    client_ip: IPAddress,
    previous: HeloState | None,
    *,
    resolver: Resolver | None,
    actions: Mapping[str, ActionSpec] = DEFAULT_ACTIONS,
    resolve: bool = False,
    fcrdns: bool = False,
    own_names: frozenset[str] = frozenset(),
    own_networks: tuple[Network, ...] = (),
) -> tuple[Verdict, HeloState]:
    """Judge one HELO/EHLO from an untrusted client.

    :param previous: the state left by an earlier HELO of this session.
    :returns: the verdict and the state to keep for the next HELO.
    """
    verdict, state, _ = await _check_helo(
        hostname, client_ip, previous, resolver=resolver, actions=actions, resolve=resolve, fcrdns=fcrdns,
        own_names=own_names, own_networks=own_networks,
    )
    return verdict, state


async def _check_helo(
    hostname: str,
    client_ip: IPAddress,
    previous: HeloState | None,
    *,
    resolver: Resolver | None,
    actions: Mapping[str, ActionSpec],
    resolve: bool,
    fcrdns: bool,
    own_names: frozenset[str],
    own_networks: tuple[Network, ...],
) -> tuple[Verdict, HeloState, float]:
    """:func:`check_helo`, and for how many seconds its answer holds: the
    shortest TTL of the DNS answers it used (0 after a temporary failure),
    :data:`gateway.dns.MAX_TTL` when it asked none."""
    if previous is not None and previous.refusal is not None:
        return replace(previous.refusal, result=f"{previous.refusal.result} (repeated)"), previous, 0
    ttl = MAX_TTL
    reverse = previous.fcrdns if previous is not None else None
    judged: list[tuple[Finding, Verdict]] = []
    found = classify(hostname, client_ip, own_names=own_names, own_networks=own_networks)
    if found is not None:
        judged.append((found, _verdict(found, actions, hostname, client_ip, f"helo={found}")))
    if resolver is not None and not any(v.refuses for _, v in judged):
        name = without_root(hostname)
        want_host = resolve and valid_hostname(name)
        want_reverse = fcrdns and reverse is None
        host: tuple[Answer, int] | None = None
        if want_host and want_reverse and not resolver.is_cached(name, "A", "AAAA"):
            host, reverse = await asyncio.gather(resolver.a_aaaa_ttl(name), check_fcrdns(resolver, client_ip))
        else:
            # A cached answer comes without waiting, so asking in turn loses
            # nothing and saves a task per lookup.
            if want_host:
                host = await resolver.a_aaaa_ttl(name)
            if want_reverse:
                reverse = await check_fcrdns(resolver, client_ip)
        if want_reverse and reverse is not None:
            ttl = min(ttl, reverse.ttl)
        if host is not None:
            ttl = min(ttl, host[1])
            if (host_found := host_finding(host[0])) is not None:
                judged.append((host_found, _verdict(host_found, actions, hostname, client_ip, f"helo={host_found}")))
    if fcrdns and reverse is not None and reverse.finding is not None:
        judged.append((reverse.finding, _verdict(reverse.finding, actions, hostname, client_ip, reverse.result)))
    findings = tuple(f for f, _ in judged)
    # Each HELO's verdict carries its score and headers: the gateway drops
    # what the previous HELO contributed, so nothing counts twice.
    verdict = combine([v for _, v in judged])
    parts = [verdict.result] if verdict.result else []
    if not any(f not in _CLIENT for f in findings):
        parts.insert(0, "helo=ok")
    if fcrdns and reverse is not None and reverse.finding is None:
        parts.append(reverse.result)
    verdict = replace(verdict, result=" ".join(parts))
    state = HeloState(hostname, findings, verdict if verdict.refuses else None, reverse)
    return verdict, state, ttl


# ----------------------------------------------------------------- plugin


def _networks(addresses: Iterable[str]) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(a, strict=False) for a in addresses)


class HeloPlugin(Plugin):
    """Refuses HELO/EHLO names no honest mail server would give."""

    @dataclass(frozen=True)
    class Options(ActionOptions):
        DEFAULT_ACTIONS = DEFAULT_ACTIONS

        #: The name must have an A or AAAA record.
        resolve: bool = False
        #: Check the client's forward-confirmed reverse DNS.
        fcrdns: bool = False
        #: More names that are ours besides ``[gateway] hostname``.
        own_names: tuple[str, ...] = ()
        #: More addresses or networks that are ours besides the listen address.
        own_addresses: tuple[str, ...] = ()
        #: Leave clients alone that a connect check allow-listed (a DNSWL
        #: hit with the action ``accept``): the list vouches for the client.
        skip_allowlisted: bool = True

        def check(self) -> dict[str, str]:
            bad = check_actions(self.actions, FINDINGS, _TEMPORARY)
            for i, name in enumerate(self.own_names):
                if not is_domain(name) or name.startswith("["):
                    bad[f"own_names[{i}]"] = f"expected a host name, got {name!r}"
            for i, address in enumerate(self.own_addresses):
                try:
                    ipaddress.ip_network(address, strict=False)
                except ValueError:
                    bad[f"own_addresses[{i}]"] = f"expected an address or network, got {address!r}"
            return bad

    default_enabled = False

    def __init__(self, options: Any, context: Context, name: str = "") -> None:
        super().__init__(options, context, name)
        self.own_names = frozenset(n.lower() for n in (context.hostname, *options.own_names))
        own = list(options.own_addresses)
        listen = context.gateway.listen_endpoint.host
        try:
            if not ipaddress.ip_address(listen).is_unspecified:
                own.append(listen)
        except ValueError:
            pass  # a name, not an address
        self.own_networks = _networks(own)
        resolver = context.resolver
        self._judged = resolver.memo() if resolver is not None else TtlMemo(time.monotonic, 0)

    @hookimpl
    def helo(self, session: Session, hostname: str) -> Verdict | Coroutine[Any, Any, Verdict]:
        if session.trusted:
            return Verdict(result="helo=trusted")
        if session.allowlisted and self.options.skip_allowlisted:
            return Verdict(result="helo=allowlisted")
        previous = session.results.get(self.name)
        if not isinstance(previous, HeloState):
            # The first HELO of a session: the same client and name were
            # judged the same way while the DNS answers hold (a plain
            # answer, no task for the gateway).
            known = self._judged.get((hostname, session.client_ip))
            if known is not None:
                session.results[self.name] = known[1]
                return known[0]  # type: ignore[no-any-return]
            previous = None
        return self._check(session, hostname, previous)

    async def _check(self, session: Session, hostname: str, previous: HeloState | None) -> Verdict:
        verdict, state, ttl = await _check_helo(
            hostname,
            session.client_ip,
            previous,
            resolver=self.context.resolver,
            actions=self.options.actions,
            resolve=self.options.resolve,
            fcrdns=self.options.fcrdns,
            own_names=self.own_names,
            own_networks=self.own_networks,
        )
        if previous is None:
            self._judged.put((hostname, session.client_ip), (verdict, state), ttl)
        session.results[self.name] = state
        return verdict
