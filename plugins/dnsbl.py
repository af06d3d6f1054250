"""DNS lists: block lists (DNSBL), allow lists (DNSWL) and domain lists (RHSBL).

RFC 5782.  A client-address list is asked for the client's address with its
octets reversed (``99.2.0.192.zone`` for 192.0.2.99) or, for IPv6, its 32
nibbles reversed; a domain list (right-hand-side list) for a domain name
prepended to the zone (``spam.example.zone``).  An A record means "listed";
which of its values count is set per zone (``codes`` or ``bitmask``), and the
TXT record of the same name is the list's reason, quoted in the reply.

* **connect**: every client-address zone (block and allow lists) is asked at
  once.  An allow-list hit whose action is ``accept`` wins over every block
  list: the verdict is ACCEPT, the hit is kept in ``session.results`` and the
  client skips this plugin's HELO and sender checks (other plugins can honour
  it too: :func:`allowlisted`).
* **helo**: domain zones with ``"helo"`` in ``domains``, on the HELO name.
* **mail**: domain zones with ``"sender"`` in ``domains``, on the sender's
  domain (never for ``<>``).
* **rcpt**: with ``delay_reject`` (the default, Postfix's
  ``smtpd_delay_reject = yes``) the refusals found at connect, HELO and MAIL
  are given here, to every recipient but ``exempt_recipients`` (postmaster@
  of the local domains by default), so a listed sender can still reach the
  postmaster to sort it out, and the log shows whom the mail was for.

Trusted clients skip every check.  Answers that are no listing are never
counted as one, in block and allow lists alike, with ``codes``, ``bitmask``
or neither: anything outside 127.0.0.0/8 (an expired or hijacked zone),
127.255.255.0/24 (list operators' error codes, e.g. 127.255.255.254 "query
through a public resolver"), 127.0.0.1 (RFC 5782 §5; "query refused" at
URIBL/SURBL) and 127.0.0.255 (list.dnswl.org's answer to every query once it
blocks the resolver) -- the last two unless ``codes`` names them.  They are
the finding ``error``, logged with the zone's name.
A zone that fails (timeout, SERVFAIL, error codes) ``pause_after`` times in a
row is paused for ``pause`` seconds: not asked, so it costs no time; its
lookups meanwhile count as failed.  A lookup failure is the finding
``tempfail``, which by default lets mail through: a list's outage must not
stop mail (and where the policy says defer, a paused zone defers too).  An
allow list that lets clients in and cannot answer (fails, answers an error
code, or is paused) makes the session's block-list refusals 451s, as
Postfix's permit_dnswl_client does.

Options (``[plugins.dnsbl]``, documented in docs/plugins/dnsbl.md):
``zones``, ``actions``, ``delay_reject``, ``exempt_recipients``,
``timeout``, ``pause_after``, ``pause``.
"""

from __future__ import annotations

import asyncio
import enum
import ipaddress
import string
import time
from collections.abc import Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any, Literal

from gateway import (
    Context,
    Envelope,
    Plugin,
    Recipient,
    Reply,
    Session,
    Verdict,
    hookimpl,
    then,
)
from gateway.actions import ACTION_NAMES, ActionOptions, ActionSpec, check_actions, decide
from gateway.address import is_domain, may_be_ip, to_ascii_domain
from gateway.config import parse_table, toml_key
from gateway.dns import Answer, Resolver, Status, TtlMemo, dnsbl_name
from gateway.verdict import Action, combine

__all__ = [
    "DEFAULT_ACTIONS",
    "FINDINGS",
    "LISTED",
    "LOOKUP_FAILED",
    "Breaker",
    "Codes",
    "DnsblPlugin",
    "DnsblResults",
    "Finding",
    "Hit",
    "Outcome",
    "Zone",
    "ZoneStatus",
    "allowlisted",
    "classify",
    "clean_txt",
    "lookup_domain",
    "parse_codes",
]


class Finding(enum.StrEnum):
    """What a lookup found, as the policy's ``actions`` table names it."""

    #: A block list (client address or domain) lists the client.
    LISTED = "listed"
    #: An allow list lists the client.
    ALLOWED = "allowed"
    #: The lookup failed: SERVFAIL, REFUSED, no answer within ``timeout``.
    TEMPFAIL = "tempfail"
    #: The list answered something that is no listing (see :func:`classify`).
    ERROR = "error"


FINDINGS = tuple(str(f) for f in Finding)

#: Used for every finding the policy's ``actions`` table does not name.
DEFAULT_ACTIONS: Mapping[str, ActionSpec] = {
    "listed": "reject",
    "allowed": "accept",
    "tempfail": "continue",
    "error": "continue",
}

# What each finding may map to (a score is always allowed): a failure is
# never a listing nor a pass, an allow list never refuses, a block list
# never lets a client skip checks.
_PERMITTED: Mapping[str, tuple[str, ...]] = {
    "listed": ("reject", "defer", "tag", "continue"),
    "allowed": ("accept", "tag", "continue"),
    "tempfail": ("defer", "tag", "continue"),
    "error": ("tag", "continue"),
}

# --- replies (Postfix's default_rbl_reply; candidates for gateway/replies.py) --
#: ``{class}`` is "Client host", "Helo command" or "Sender address";
#: ``{reason}`` is "; " and the list's TXT record, or nothing without one
#: (Postfix's ``${rbl_reason?; $rbl_reason}``).
LISTED = Reply(554, "5.7.1", "Service unavailable; {class} [{what}] blocked using {zone}{reason}")
#: For ``tempfail = "defer"``.
LOOKUP_FAILED = Reply(451, "4.4.3", "Service unavailable; {class} [{what}]: lookup in {zone} failed, try again later")

#: The placeholders a zone's ``reply`` template may use.
PLACEHOLDERS = ("class", "what", "ip", "zone", "code", "txt", "reason")

_CLASS = {"client": "Client host", "helo": "Helo command", "sender": "Sender address"}
_HEADER = "X-DNSBL"
#: Longest TXT reason quoted in a reply (an SMTP reply line holds 512 octets).
MAX_TXT = 200
_REPLY_MAX = 512

_LOOPBACK = ipaddress.IPv4Network("127.0.0.0/8")
_OPERATOR = ipaddress.IPv4Network("127.255.255.0/24")
# Answers in 127.0.0.0/24 that lists give for problems, not listings: an
# error for every zone, whatever its codes or bitmask, unless its ``codes``
# names the address itself.
_REFUSED_CODES = {
    int(ipaddress.IPv4Address("127.0.0.1")): "never a listing (RFC 5782 §5), 'query refused' at URIBL and SURBL",
    int(ipaddress.IPv4Address("127.0.0.255")): "access blocked: list.dnswl.org answers it to every query"
    " once it blocks the resolver (too many queries, or a public resolver)",
}
# Spamhaus's return codes for problems on the querying side.
_OPERATOR_MEANING = {
    "127.255.255.252": "typing error in the DNSBL name",
    "127.255.255.254": "query through a public or open resolver; use your own recursive resolver",
    "127.255.255.255": "excessive number of queries",
}


# ----------------------------------------------------------------- codes


@dataclass(frozen=True)
class Codes:
    """Which A records of a zone count as a listing.

    :param ranges: inclusive ``(first, last)`` ranges of addresses as
        integers; empty means every code.
    :param bitmask: when not 0, a code counts if its last octet has any of
        these bits (SURBL/URIBL-style multi lists); ``ranges`` is then empty.

    127.0.0.1 and 127.0.0.255 (lists' "query refused" and "blocked") never
    count, whatever the ranges or the bitmask, unless a range is that one
    address (``codes = ["127.0.0.1"]``).
    """

    ranges: tuple[tuple[int, int], ...] = ()
    bitmask: int = 0

    def matches(self, code: ipaddress.IPv4Address) -> bool:
        value = int(code)
        if value in _REFUSED_CODES:
            return (value, value) in self.ranges
        if self.bitmask:
            return bool(value & 0xFF & self.bitmask)
        if self.ranges:
            return any(first <= value <= last for first, last in self.ranges)
        return True


def parse_codes(specs: Iterable[str], bitmask: int = 0) -> Codes:
    """``"127.0.0.2"``, ``"127.0.0.4-127.0.0.11"`` or ``"127.0.10.0/24"``,
    each inside 127.0.0.0/8 and outside 127.255.255.0/24.  Raises
    ValueError naming the bad entry."""
    ranges = []
    for spec in specs:
        try:
            if "/" in spec:
                net = ipaddress.IPv4Network(spec, strict=True)
                first, last = net[0], net[-1]
            else:
                low, _, high = spec.partition("-")
                first = ipaddress.IPv4Address(low.strip())
                last = ipaddress.IPv4Address(high.strip()) if high else first
        except ValueError:
            raise ValueError(f"expected an address, FIRST-LAST or a network, got {spec!r}") from None
        if last < first:
            raise ValueError(f"{spec!r}: the range ends before it starts")
        if first not in _LOOPBACK or last not in _LOOPBACK:
            raise ValueError(f"{spec!r}: listings are in 127.0.0.0/8 (RFC 5782 §2.1)")
        if last >= _OPERATOR[0]:
            raise ValueError(f"{spec!r}: 127.255.255.0/24 holds list operators' error codes, never listings")
        ranges.append((int(first), int(last)))
    return Codes(tuple(ranges), bitmask)


class ZoneStatus(enum.StrEnum):
    """What one zone said about one name."""

    LISTED = "listed"
    CLEAR = "clear"
    ERROR = "error"
    TEMPFAIL = "tempfail"
    #: Not asked: the zone is paused (see :class:`Breaker`).
    PAUSED = "paused"


@dataclass(frozen=True)
class Outcome:
    """One zone's answer for one name, classified.

    :param codes: the A records that made it so (listing codes for LISTED,
        the offending records for ERROR, codes the zone ignores for CLEAR).
    :param error: what went wrong, for the log (ERROR, TEMPFAIL).
    """

    status: ZoneStatus
    codes: tuple[str, ...] = ()
    error: str = ""


def classify(answer: Answer, codes: Codes) -> Outcome:
    """Turn an A-record answer into LISTED, CLEAR, ERROR or TEMPFAIL.

    A record counts only if it is in 127.0.0.0/8, outside 127.255.255.0/24,
    and accepted by ``codes``; 127.0.0.1 and 127.0.0.255 are errors unless
    ``codes`` names them.  One counting record is enough; without one, any
    error record makes the outcome ERROR.

    >>> classify(Answer(Status.RECORDS, ("127.0.0.2",)), Codes()).status
    <ZoneStatus.LISTED: 'listed'>
    >>> classify(Answer(Status.RECORDS, ("127.255.255.254",)), Codes()).status
    <ZoneStatus.ERROR: 'error'>
    """
    if answer.temporary:
        return Outcome(ZoneStatus.TEMPFAIL, error=answer.error or "temporary DNS failure")
    if not answer.ok:
        return Outcome(ZoneStatus.CLEAR)
    listed, errors, ignored, why = [], [], [], []
    # Sorted: an RRset has no order, logs and results should.
    for record in sorted(answer.records, key=_numeric):
        try:
            code = ipaddress.IPv4Address(record)
        except ValueError:
            errors.append(record)
            why.append(f"{record}: not an IPv4 address")
            continue
        if code not in _LOOPBACK:
            errors.append(record)
            why.append(f"{record}: outside 127.0.0.0/8 (expired or wildcarded zone?)")
        elif code in _OPERATOR:
            errors.append(record)
            why.append(f"{record}: {_OPERATOR_MEANING.get(record, 'list operator error code')}")
        elif codes.matches(code):
            listed.append(record)
        elif int(code) in _REFUSED_CODES:
            errors.append(record)
            why.append(f"{record}: {_REFUSED_CODES[int(code)]}")
        else:
            ignored.append(record)
    if listed:
        return Outcome(ZoneStatus.LISTED, tuple(listed))
    if errors:
        return Outcome(ZoneStatus.ERROR, tuple(errors), "; ".join(why))
    return Outcome(ZoneStatus.CLEAR, tuple(ignored))


def _numeric(record: str) -> tuple[int, str]:
    try:
        return int(ipaddress.IPv4Address(record)), record
    except ValueError:
        return 1 << 32, record


_PRINTABLE = frozenset(string.printable) - frozenset("\t\n\r\x0b\x0c")


def clean_txt(answer: Answer) -> str:
    """The first TXT record, safe for an SMTP reply: printable ASCII only
    (anything else becomes ``?``, so no line break can end the reply),
    spaces collapsed, at most :data:`MAX_TXT` characters."""
    if not answer.ok or not answer.records:
        return ""
    text = "".join(c if c in _PRINTABLE else " " if c == "\t" else "?" for c in answer.records[0])
    text = " ".join(text.split())
    return text if len(text) <= MAX_TXT else text[: MAX_TXT - 3] + "..."


def lookup_domain(text: str) -> str | None:
    """The domain to look up in a domain list, lower-case, without a final
    dot; None for what has nothing to look up (address literals, bare IP
    addresses, syntax no domain has)."""
    name = text.strip().rstrip(".").lower()
    if not name or name.startswith("["):
        return None
    if may_be_ip(name):
        try:
            ipaddress.ip_address(name)
            return None
        except ValueError:
            pass
    if not name.isascii():
        try:
            name = to_ascii_domain(name)
        except UnicodeError:
            return None
    return name if is_domain(name) else None


def _askable(name: str) -> bool:
    """Whether ``name`` fits DNS: 253 octets, labels of 1 to 63."""
    return len(name) <= 253 and all(0 < len(label) <= 63 for label in name.split("."))


# ------------------------------------------------------------ circuit breaker


class Breaker:
    """Pauses a zone that keeps failing.

    ``threshold`` failures in a row (0: never pause) pause the zone for
    ``pause`` seconds.  The first lookup after a pause is a probe: a failure
    pauses the zone again at once, a success closes the breaker.
    """

    def __init__(self, threshold: int, pause: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.threshold = threshold
        self.pause = pause
        self.clock = clock
        self.failures = 0
        self.paused_until = 0.0
        self.tripped = False

    def allows(self) -> bool:
        return self.clock() >= self.paused_until

    def success(self) -> bool:
        """Record a good answer; True if this closes a tripped breaker."""
        self.failures = 0
        was, self.tripped = self.tripped, False
        return was

    def failure(self) -> bool:
        """Record a failure; True if this pauses the zone."""
        self.failures += 1
        if not self.threshold or (self.failures < self.threshold and not self.tripped):
            return False
        self.paused_until = self.clock() + self.pause
        self.tripped = True
        self.failures = 0
        return True


# ------------------------------------------------------------------ options

ZoneType = Literal["client", "allow", "rhs"]
Identity = Literal["client", "helo", "sender"]


@dataclass(frozen=True)
class Zone:
    """One ``[plugins.dnsbl.zones.NAME]`` table.

    :param zone: the DNS zone; default: the table's name.
    :param type: ``client`` (block list of client addresses), ``allow``
        (allow list of client addresses) or ``rhs`` (block list of domains).
    :param domains: for ``rhs``, which domains to look up.
    :param codes: A records that count as a listing (default: any).
    :param bitmask: instead of ``codes``: bits of the last octet that count.
    :param action: overrides ``actions.listed`` (``actions.allowed`` for an
        allow list) for this zone.
    :param score: added to the score for each hit; default: the action when
        that is a number, else 0.
    :param reply: the reply text when the zone refuses (placeholders:
        :data:`PLACEHOLDERS`); default :data:`LISTED`'s.
    """

    zone: str = ""
    type: ZoneType = "client"
    domains: tuple[Literal["sender", "helo"], ...] = ("sender", "helo")
    codes: tuple[str, ...] = ()
    bitmask: int = 0
    action: str | float | None = None
    score: float | None = None
    reply: str = ""

    def check(self) -> dict[str, str]:
        bad: dict[str, str] = {}
        if self.zone and not _zone_name_ok(self.zone):
            bad["zone"] = f"expected a DNS zone name, got {self.zone!r}"
        if self.codes and self.bitmask:
            bad["bitmask"] = "codes or bitmask, not both"
        try:
            parse_codes(self.codes)
        except ValueError as exc:
            bad["codes"] = str(exc)
        if not 0 <= self.bitmask <= 255:
            bad["bitmask"] = "expected 1-255 (bits of the last octet), or 0 for none"
        if self.action is not None:
            finding = "allowed" if self.type == "allow" else "listed"
            problem = _action_problem(finding, self.action)
            if problem:
                bad["action"] = problem
        if self.reply:
            try:
                self.reply.format(**{p: "x" for p in PLACEHOLDERS})
            except (KeyError, IndexError, AttributeError, ValueError) as exc:
                names = ", ".join("{" + p + "}" for p in PLACEHOLDERS)
                bad["reply"] = f"a template with the placeholders {names} ({exc!r})"
        return bad


def _zone_name_ok(name: str) -> bool:
    """A list's zone: a domain with at least two labels (so a table named
    ``sbl`` without ``zone`` is an error, not a query to ``....sbl``)."""
    name = name.rstrip(".")
    return is_domain(name) and not name.startswith("[") and "." in name


def _action_problem(finding: str, action: ActionSpec) -> str:
    if isinstance(action, str) and action not in _PERMITTED[finding]:
        if action not in ACTION_NAMES:
            return f"one of {', '.join(ACTION_NAMES)} or a score"
        return f"{', '.join(_PERMITTED[finding])} or a score (not {action!r} for {finding})"
    return ""


def parse_zones(tables: Mapping[str, Any]) -> tuple[tuple[tuple[str, Zone], ...], dict[str, str]]:
    """Validate the ``zones`` table: ``((name, Zone), ...)`` in order, with
    ``zone`` filled in, and the problems as ``{key: expected}``."""
    zones: list[tuple[str, Zone]] = []
    bad: dict[str, str] = {}
    for name, table in tables.items():
        prefix = f"zones.{toml_key(name)}"
        if not isinstance(table, Mapping):
            bad[prefix] = f"expected a table, got {table!r}"
            continue
        # The outer parse turned lists into tuples; parse_table wants lists.
        raw = {k: list(v) if isinstance(v, tuple) else v for k, v in table.items()}
        zone, problems = parse_table(Zone, raw, prefix, "")
        bad.update({p.key: p.expected for p in problems})
        if zone is None:
            continue
        if "domains" in table and zone.type != "rhs":
            bad[f"{prefix}.domains"] = 'only for type = "rhs"'
            continue
        if not zone.zone:
            if not _zone_name_ok(name):
                bad[f"{prefix}.zone"] = f"a DNS zone name (the table's name {name!r} is none)"
                continue
            zone = replace(zone, zone=name)
        zones.append((name, replace(zone, zone=zone.zone.rstrip(".").lower())))
    return tuple(zones), bad


#: What an allow list may say that tells nothing about the client.
_UNANSWERED = frozenset({ZoneStatus.TEMPFAIL, ZoneStatus.ERROR, ZoneStatus.PAUSED})


# ------------------------------------------------------------------ results


@dataclass(frozen=True)
class Hit:
    """A listing (in a block or an allow list).

    :param name: the zone's table name.
    :param zone: the DNS zone.
    :param identity: what was looked up: ``client``, ``helo`` or ``sender``.
    :param subject: the address or domain looked up.
    :param codes: the A records that count.
    :param txt: the list's reason (TXT), if it was fetched.
    """

    name: str
    zone: str
    identity: Identity
    subject: str
    codes: tuple[str, ...]
    txt: str = ""


@dataclass
class DnsblResults:
    """What the plugin keeps in ``session.results[NAME]`` (``"dnsbl"``).

    :param allowed: the allow-list hit whose action is ``accept``, if any:
        the client is allow-listed for the whole session.  Other plugins
        honour it with :func:`allowlisted`.
    :param hits: every block-list listing found so far.
    :param refusals: refusals held back until RCPT (``delay_reject``), by
        the stage that found them; ``"mail"`` only for ``mail_envelope``.
    :param helo_refusal: the verdict of the first HELO/EHLO whose name was
        refused (or held for RCPT), repeated to every later HELO/EHLO of the
        session, so another name cannot wash it out; None while none was.
    :param allow_unknown: an allow list whose hit lets clients in did not
        answer for this client (failed, answered an error code, or paused):
        every block-list refusal of the session is then a 451, as it might
        have let the client in.

    Scores are not de-duplicated here: connect runs once per client, the
    gateway replaces what an earlier HELO contributed, and each transaction
    keeps its own MAIL score.
    """

    allowed: Hit | None = None
    hits: list[Hit] = field(default_factory=list)
    refusals: dict[str, Verdict] = field(default_factory=dict)
    mail_envelope: str = ""
    helo_refusal: Verdict | None = None
    allow_unknown: bool = False


def allowlisted(session: Session, name: str = "dnsbl") -> Hit | None:
    """The allow-list hit that lets this session's client skip checks, if
    any: for other plugins, at HELO and later stages."""
    results = session.results.get(name)
    return results.allowed if isinstance(results, DnsblResults) else None


# ------------------------------------------------------------------- plugin


@dataclass
class _Entry:
    name: str
    zone: Zone
    codes: Codes
    breaker: Breaker
    #: the reply template uses the TXT record
    wants_txt: bool
    #: names a session has claimed to count, until its wait ends (the
    #: resolver tells of a query that goes on after that)
    asking: set[str] = field(default_factory=set)


#: Each zone with its outcome and, for a quoted refusal, the TXT reason.
Found = list[tuple[_Entry, Outcome, str]]
#: What a hook returns: the verdict, or a coroutine when DNS must be asked.
MaybeVerdict = Verdict | None | Coroutine[Any, Any, Verdict | None]


class DnsblPlugin(Plugin):
    """Looks the client up in DNS block and allow lists, and the HELO and
    sender domains in domain lists."""

    @dataclass(frozen=True)
    class Options(ActionOptions):
        DEFAULT_ACTIONS = DEFAULT_ACTIONS

        #: ``{name: zone table}``.  Checked by parse_zones, not the loader:
        #: against :class:`Zone`, key by key, so each wrong value is a
        #: problem of its own, and one wrong zone hides no other's.
        zones: dict[str, Any] = field(default_factory=dict)
        #: Hold refusals back until RCPT (Postfix's smtpd_delay_reject).
        delay_reject: bool = True
        #: Local parts a listed client may still write to (at the local
        #: domains, and the bare ``<Postmaster>``), with ``delay_reject``.
        exempt_recipients: tuple[str, ...] = ("postmaster",)
        #: Seconds to wait for the lists at each stage.
        timeout: float = 3.0
        #: Failures in a row that pause a zone (0: never).
        pause_after: int = 5
        #: Seconds a failing zone is paused.
        pause: float = 300.0

        @cached_property
        def parsed_zones(self) -> tuple[tuple[tuple[str, Zone], ...], dict[str, str]]:
            return parse_zones(self.zones)

        def check(self) -> dict[str, str]:
            bad = check_actions(self.actions, FINDINGS)
            for finding, action in self.actions.items():
                if finding in _PERMITTED and (problem := _action_problem(finding, action)):
                    bad[f"actions.{finding}"] = problem
            bad.update(self.parsed_zones[1])
            for i, local in enumerate(self.exempt_recipients):
                if not local or "@" in local:
                    bad[f"exempt_recipients[{i}]"] = f"expected a local part, got {local!r}"
            if self.timeout <= 0:
                bad["timeout"] = "expected a positive number of seconds"
            if self.pause_after < 0:
                bad["pause_after"] = "expected 0 (never) or a positive integer"
            if self.pause <= 0:
                bad["pause"] = "expected a positive number of seconds"
            return bad

    default_enabled = False

    def __init__(self, options: Any, context: Context, name: str = "") -> None:
        super().__init__(options, context, name)
        zones, problems = options.parsed_zones
        if problems:  # options built by hand, not through a policy
            raise ValueError(f"dnsbl: bad zones: {problems}")
        #: Replaceable in tests; the breakers read it at every call.
        self.clock: Callable[[], float] = time.monotonic
        self.entries = tuple(
            _Entry(
                name,
                zone,
                parse_codes(zone.codes, zone.bitmask),
                Breaker(options.pause_after, options.pause, lambda: self.clock()),
                any(p in (zone.reply or LISTED.text) for p in ("{txt}", "{reason}")),
            )
            for name, zone in zones
        )
        self._client = tuple(e for e in self.entries if e.zone.type in ("client", "allow"))
        self._helo = tuple(e for e in self.entries if e.zone.type == "rhs" and "helo" in e.zone.domains)
        self._sender = tuple(e for e in self.entries if e.zone.type == "rhs" and "sender" in e.zone.domains)
        self._exempt = frozenset(local.lower() for local in options.exempt_recipients)
        self._resolver: Resolver | None = context.resolver
        #: What the cache said for (identity, subject, zones); see _lookup.
        self._found = context.resolver.memo() if context.resolver is not None else TtlMemo(time.monotonic, 0)

    @property
    def resolver(self) -> Resolver:
        if self._resolver is None:  # built outside a gateway: the system's resolver
            self._resolver = Resolver()
        return self._resolver

    # ------------------------------------------------------------ lookups

    def _spec(self, entry: _Entry, finding: str) -> ActionSpec:
        if finding in ("listed", "allowed") and entry.zone.action is not None:
            return entry.zone.action
        return self.options.actions[finding]  # type: ignore[no-any-return]

    def _from_cache(self, entry: _Entry, name: str, ttls: list[int] | None = None) -> tuple[Outcome, str] | None:
        """What :meth:`_ask` would find, when the cache alone can tell
        (None otherwise): a warm gateway then needs no task or timer.  A
        cached answer was counted by the breaker when it was asked for, so
        it is not counted again (nor logged again).  The remaining TTL of
        each answer used goes to ``ttls`` (0 for a paused zone)."""
        ttls = [] if ttls is None else ttls
        if not entry.breaker.allows():
            ttls.append(0)
            return Outcome(ZoneStatus.PAUSED), ""
        answer = self.resolver.cached(name, "A")
        if answer is None:
            return None
        ttls.append(answer.ttl)
        outcome = classify(answer, entry.codes)
        txt = ""
        if outcome.status is ZoneStatus.LISTED and entry.wants_txt:
            finding = "allowed" if entry.zone.type == "allow" else "listed"
            if self._spec(entry, finding) in ("reject", "defer"):
                reason = self.resolver.cached(name, "TXT")
                if reason is None:
                    return None
                ttls.append(reason.ttl)
                txt = clean_txt(reason)
        return outcome, txt

    async def _ask(self, entry: _Entry, name: str, deadline: float) -> tuple[Outcome, str]:
        """One zone, one name: the outcome and, for a refusing listing whose
        reply quotes it, the TXT reason.  Updates the zone's breaker once per
        query: not for an answer another session is already waiting for
        (or stopped waiting for: the query goes on), nor for one the cache
        has meanwhile, nor for a name that cannot be asked at all."""
        if not entry.breaker.allows():
            return Outcome(ZoneStatus.PAUSED), ""
        if not _askable(name):
            # Over 253 octets, or a label over 63, once the zone is added:
            # no list can hold it, and no query proves the zone alive.
            return Outcome(ZoneStatus.CLEAR), ""
        resolver = self.resolver
        if name in entry.asking or resolver.is_cached(name, "A") or resolver.is_asking(name, "A"):
            outcome = await self._query(entry, name, deadline)
        else:
            # This session's query: its outcome is counted even if the
            # client hangs up meanwhile (the count goes on without it).
            entry.asking.add(name)
            outcome = await asyncio.shield(self._query(entry, name, deadline, counted=True))
        txt = ""
        if outcome.status is ZoneStatus.LISTED and entry.wants_txt:
            finding = "allowed" if entry.zone.type == "allow" else "listed"
            if self._spec(entry, finding) in ("reject", "defer"):
                try:
                    async with asyncio.timeout_at(deadline):
                        txt = clean_txt(await self.resolver.txt(name))
                except TimeoutError:
                    pass  # the listing stands; the reply goes without a reason
        return outcome, txt

    async def _query(self, entry: _Entry, name: str, deadline: float, *, counted: bool = False) -> Outcome:
        try:
            async with asyncio.timeout_at(deadline):
                answer = await self.resolver.query(name, "A")
        except TimeoutError:
            answer = Answer(Status.TEMPFAIL, error=f"no answer within {self.options.timeout:g}s")
        finally:
            if counted:
                entry.asking.discard(name)
        outcome = classify(answer, entry.codes)
        if counted:
            self._account(entry, name, outcome)
        return outcome

    def _account(self, entry: _Entry, name: str, outcome: Outcome) -> None:
        """Breaker bookkeeping and the operator's log lines."""
        if outcome.status is ZoneStatus.ERROR:
            self.log.warning("zone %s answered %s for %s: %s; not a listing",
                             entry.name, ",".join(outcome.codes), name, outcome.error)
        elif outcome.status is ZoneStatus.TEMPFAIL:
            self.log.info("zone %s: lookup of %s failed: %s", entry.name, name, outcome.error)
        breaker = entry.breaker
        if outcome.status in (ZoneStatus.ERROR, ZoneStatus.TEMPFAIL):
            probe = breaker.tripped
            if breaker.failure():
                why = "a failed probe" if probe else f"{breaker.threshold} failures in a row"
                self.log.error("zone %s paused for %gs after %s (last: %s); its lookups count as tempfail meanwhile",
                               entry.name, breaker.pause, why, outcome.error)
        elif breaker.success():
            self.log.warning("zone %s answers again; resumed", entry.name)

    def _lookup(
        self, entries: Iterable[_Entry], identity: Identity, subject: str
    ) -> Found | Coroutine[Any, Any, Found]:
        """Every zone: from the cache at once when it holds every answer,
        else a coroutine that asks the rest, all at once, each bounded by
        ``timeout``."""
        entries = tuple(entries)
        key = (identity, subject, tuple(e.name for e in entries))
        known: Found | None = self._found.get(key)
        if known is not None and all(e.breaker.allows() for e in entries):
            return known
        names = [
            dnsbl_name(subject, e.zone.zone) if identity == "client" else f"{subject}.{e.zone.zone}"
            for e in entries
        ]
        ttls: list[int] = []
        cached = [self._from_cache(e, n, ttls) for e, n in zip(entries, names)]
        if all(found is not None for found in cached):
            found = [(e, *found) for e, found in zip(entries, cached) if found is not None]
            # The same client, HELO and sender domains are looked up for
            # every message of a busy sender: what the cached answers say
            # is kept while they hold (and only while no zone is paused).
            self._found.put(key, found, min(ttls, default=0))
            return found
        return self._ask_missing(entries, names, cached)

    async def _ask_missing(
        self, entries: tuple[_Entry, ...], names: list[str], cached: list[tuple[Outcome, str] | None]
    ) -> Found:
        deadline = asyncio.get_running_loop().time() + self.options.timeout
        missing = [i for i, found in enumerate(cached) if found is None]
        asked = iter(await asyncio.gather(*(self._ask(entries[i], names[i], deadline) for i in missing)))
        return [(e, *(found if found is not None else next(asked))) for e, found in zip(entries, cached)]

    # ------------------------------------------------------------ verdicts

    def _verdict(
        self, entry: _Entry, outcome: Outcome, identity: Identity, subject: str, txt: str, session: Session
    ) -> Verdict | None:
        """The policy's verdict for one zone's outcome, with its score."""
        status = outcome.status
        if status is ZoneStatus.CLEAR:
            return None
        codes = ",".join(outcome.codes)
        if status is ZoneStatus.LISTED:
            finding = "allowed" if entry.zone.type == "allow" else "listed"
        elif status is ZoneStatus.PAUSED:
            # Not asked, so not known: a failed lookup, as the policy takes
            # those (continue by default; where it says defer, no silent pass).
            finding = "tempfail"
            if self._spec(entry, finding) == "continue":
                return None
        else:
            finding = str(status)
        what = "" if identity == "client" else f" {identity}={subject}"
        paused = " (paused)" if status is ZoneStatus.PAUSED else ""
        result = f"dnsbl={finding} {entry.name}" + (f":{codes}" if codes else "") + what + paused
        spec = self._spec(entry, finding)
        fields = {
            "class": _CLASS[identity],
            "what": subject,
            "ip": str(session.client_ip),
            "zone": entry.zone.zone,
            "code": outcome.codes[0] if outcome.codes else "",
            "txt": txt,
            "reason": f"; {txt}" if txt else "",
        }
        template = LISTED.with_text(entry.zone.reply) if entry.zone.reply else LISTED
        reject = template.format(**fields) if finding == "listed" else None
        if reject is not None and txt and len(reject.wire()) > _REPLY_MAX:
            # A long HELO or sender name leaves the reason less room: an
            # SMTP reply line holds 512 octets (RFC 5321 §4.5.3.1.5).
            room = max(0, len(txt) - (len(reject.wire()) - _REPLY_MAX) - 3)
            txt = txt[:room] + "..."
            reject = template.format(**{**fields, "txt": txt, "reason": f"; {txt}"})
        defer = LOOKUP_FAILED.format(**fields) if finding == "tempfail" else None
        headers: tuple[tuple[str, str], ...] = ()
        if spec == "tag":
            headers = ((_HEADER, f"{result.removeprefix('dnsbl=')} ({_CLASS[identity].lower()} [{subject}])"),)
        verdict = decide(finding, {finding: spec}, reject=reject, defer=defer, headers=headers, result=result)
        if entry.zone.score is not None and finding in ("listed", "allowed"):
            verdict = replace(verdict, score=entry.zone.score)
        return verdict

    def _stage(
        self,
        session: Session,
        state: DnsblResults,
        stage: str,
        found: list[tuple[_Entry, Outcome, str]],
        identity: Identity,
        subject: str,
    ) -> Verdict | None:
        """One stage's verdict from its lookups.

        An allow-list hit with the action ``accept`` wins: only the allow
        lists' verdicts count and the client is allow-listed.  Otherwise the
        most severe verdict decides, and with ``delay_reject`` a refusal is
        kept in ``state`` for RCPT while the stage goes on with the score.
        Each verdict carries its score: the gateway keeps a HELO's only
        until the next HELO, and a MAIL's with its transaction.
        """
        allow: list[Verdict] = []
        others: list[Verdict] = []
        hits: list[Hit] = []
        for entry, outcome, txt in found:
            # An error code (127.0.0.255 "blocked", say) answers nothing about
            # the client either: it is no "not listed", as the breaker knows.
            if (entry.zone.type == "allow" and outcome.status in _UNANSWERED
                    and self._spec(entry, "allowed") == "accept"):
                state.allow_unknown = True  # asked at connect; it covers HELO and MAIL too
            verdict = self._verdict(entry, outcome, identity, subject, txt, session)
            if verdict is None:
                continue
            hit = None
            if outcome.status is ZoneStatus.LISTED:
                hit = Hit(entry.name, entry.zone.zone, identity, subject, outcome.codes, txt)
            if hit is not None and entry.zone.type == "allow":
                allow.append(verdict)
                if verdict.action is Action.ACCEPT and state.allowed is None:
                    state.allowed = hit
            else:
                others.append(verdict)
                if hit is not None:
                    hits.append(hit)
        if state.allowed is not None:
            state.refusals.clear()
            return combine(allow) if allow else None
        state.hits += [h for h in hits if h not in state.hits]  # a repeated HELO
        verdicts = allow + others
        if not verdicts:
            return None
        verdict = combine(verdicts)
        if state.allow_unknown and verdict.action is Action.REJECT and verdict.reply is not None:
            # Postfix's permit_dnswl_client: DEFER_IF_REJECT.  The allow list
            # might have let this client in: a temporary answer, not a 5yz.
            reply = verdict.reply
            verdict = replace(verdict, action=Action.DEFER, disconnect=False,
                              reply=Reply(451, "4" + reply.enhanced[1:], reply.text),
                              result=f"{verdict.result} (an allow list did not answer)")
        if verdict.refuses and self.options.delay_reject:
            state.refusals[stage] = replace(verdict, score=0.0, headers=())
            return Verdict(Action.CONTINUE, headers=verdict.headers, score=verdict.score,
                           result=f"{verdict.result} (refused at RCPT)")
        return verdict

    def _state(self, session: Session) -> DnsblResults:
        state = session.results.get(self.name)
        if not isinstance(state, DnsblResults):
            state = session.results[self.name] = DnsblResults()
        return state

    # --------------------------------------------------------------- hooks

    # Plain hooks: a warm cache answers at once; only a miss returns a
    # coroutine for the gateway to await (see gateway.then).

    @hookimpl
    def connect(self, session: Session) -> MaybeVerdict:
        state = self._state(session)
        if session.trusted or not self._client:
            return None
        ip = str(session.client_ip)
        return then(
            self._lookup(self._client, "client", ip),
            lambda found: self._stage(session, state, "connect", found, "client", ip),
        )

    @hookimpl
    def helo(self, session: Session, hostname: str) -> MaybeVerdict:
        state = self._state(session)
        if state.helo_refusal is not None:
            # A refused HELO stays refused until XCLIENT (which clears
            # session.results): another name does not wash it out, and the
            # refusal held for RCPT stays held.  Same score: the gateway
            # replaces the previous HELO's, so it counts once.
            return replace(state.helo_refusal, result=f"{state.helo_refusal.result} (repeated)")
        if session.trusted or state.allowed is not None or not self._helo:
            return None
        domain = lookup_domain(hostname)
        if domain is None:
            return None

        def judged(found: Found) -> Verdict | None:
            verdict = self._stage(session, state, "helo", found, "helo", domain)
            if verdict is not None and (verdict.refuses or "helo" in state.refusals):
                state.helo_refusal = verdict
            return verdict

        return then(self._lookup(self._helo, "helo", domain), judged)

    @hookimpl
    def mail(self, session: Session, envelope: Envelope) -> MaybeVerdict:
        state = self._state(session)
        state.refusals.pop("mail", None)
        if session.trusted or state.allowed is not None or not self._sender or envelope.sender.is_null:
            return None
        domain = lookup_domain(envelope.sender.domain)
        if domain is None:
            return None

        def judged(found: Found) -> Verdict | None:
            verdict = self._stage(session, state, "mail", found, "sender", domain)
            state.mail_envelope = envelope.id
            return verdict

        return then(self._lookup(self._sender, "sender", domain), judged)

    @hookimpl
    def rcpt(self, session: Session, envelope: Envelope, recipient: Recipient) -> Verdict | None:
        state = session.results.get(self.name)
        if not isinstance(state, DnsblResults) or not state.refusals:
            return None
        held = [state.refusals.get("connect"), state.refusals.get("helo")]
        if state.mail_envelope == envelope.id:
            held.append(state.refusals.get("mail"))
        verdict = combine(held)
        if not verdict.refuses:
            return None
        address = recipient.address
        if address.local_unquoted.lower() in self._exempt and (
            not address.domain or self.context.is_local_domain(address.domain)
        ):
            return Verdict(result=f"{verdict.result} (exempt: {address.mailbox})")
        return verdict
