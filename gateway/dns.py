"""The gateway's one asynchronous DNS layer.

Every DNS question the gateway asks (DNSBL, SPF, DKIM, DMARC, PTR, MX)
goes through a :class:`Resolver`, so all checks share one cache, one set of
nameservers and one timeout, and a burst of connections from the same client
costs one query per distinct question rather than one per check per session.

Outcomes are never exceptions: a query returns an :class:`Answer` whose
:class:`Status` says which of the four things happened.  Plugins map
``TEMPFAIL`` to a 4xx (or "unknown") and never confuse it with "not listed".

Bridges for the two libraries that bring their own DNS:

* :func:`dkim_dnsfunc` -- the ``dnsfunc`` that dkimpy's ``verify_async`` takes.
* :func:`spf_check` -- runs pyspf's blocking check in a worker thread,
  its lookups answered by this resolver on the event loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import enum
import functools
import ipaddress
import logging
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import dkim
import dns.asyncresolver
import dns.exception
import dns.message
import dns.name
import dns.nameserver
import dns.rcode
import dns.rdata
import dns.rdatatype
import dns.rdtypes.txtbase
import dns.resolver
import spf

from .address import is_hostname, to_ascii_domain
from .config import parse_nameserver

__all__ = [
    "Answer",
    "CacheStats",
    "Resolver",
    "ReverseDNS",
    "Status",
    "TtlMemo",
    "dkim_dnsfunc",
    "dkim_key_record",
    "dnsbl_name",
    "reverse_name",
    "spf_cached",
    "spf_check",
]

log = logging.getLogger("smtpgate.dns")

#: A question as the cache knows it: the canonical name as text (hashing a
#: str is cached by Python; hashing a dns.name.Name walks its labels every
#: time) and the type.
_Key = tuple[str, dns.rdatatype.RdataType]

#: Longest time a positive answer is cached, whatever its TTL says.
MAX_TTL = 86400
#: Longest time NXDOMAIN/NODATA is cached (RFC 2308 suggests 1-3 hours max).
MAX_NEGATIVE_TTL = 3600
#: About the most bytes the cached answers of one resolver take.
CACHE_BYTES = 64 * 1024 * 1024
#: What an entry costs besides its text: the key, the Answer, and per
#: record a dnspython object (measured: about 160 bytes an A record).
_ENTRY_BYTES = 400
_RECORD_BYTES = 200
#: How long a TEMPFAIL is cached; see :class:`Resolver`.
TEMPFAIL_TTL = 5.0
# EDNS payload we announce: large enough for DKIM keys and most TXT answers
# over UDP, small enough to avoid IP fragmentation (DNS flag day 2020).
_EDNS_PAYLOAD = 1232


class Status(enum.Enum):
    """What a DNS question came back with."""

    RECORDS = "records"  #: the name has records of the asked type
    NXDOMAIN = "nxdomain"  #: the name does not exist
    NODATA = "nodata"  #: the name exists, without records of that type
    TEMPFAIL = "tempfail"  #: SERVFAIL, REFUSED, timeout or network error: ask again later


@dataclass(frozen=True, slots=True)
class Answer:
    """The outcome of one question.

    ``records`` are text: ``rdata.to_text()`` for every type (names are
    absolute, with the final dot: ``"10 mx.example.com."``) except TXT (and
    SPF), whose strings are joined without quotes or separators and decoded
    as UTF-8 (undecodable bytes become U+FFFD) -- the form SPF, DKIM, DMARC
    and DNSBL reasons are read in.  ``rdata`` keeps the dnspython objects, in
    the same order, for exact bytes (``rdata[0].strings``) or fields
    (``rdata[0].preference``).

    ``ttl`` is the seconds the answer stays valid (the remaining time when it
    comes from the cache); ``error`` says what went wrong for TEMPFAIL.
    """

    status: Status
    records: tuple[str, ...] = ()
    ttl: int = 0
    rdata: tuple[dns.rdata.Rdata, ...] = field(default=(), compare=False, repr=False)
    error: str = ""

    @property
    def ok(self) -> bool:
        """True if there are records."""
        return self.status is Status.RECORDS

    @property
    def temporary(self) -> bool:
        """True if the question could not be answered now (TEMPFAIL)."""
        return self.status is Status.TEMPFAIL

    @property
    def negative(self) -> bool:
        """True for a definite "no" (NXDOMAIN or NODATA)."""
        return self.status in (Status.NXDOMAIN, Status.NODATA)


@dataclass(frozen=True, slots=True)
class CacheStats:
    """Counters since the resolver was created (for metrics and tests)."""

    hits: int  #: answered from the cache
    coalesced: int  #: joined a query already in flight
    sent: int  #: resolutions actually started (dnspython may retry inside one)
    size: int  #: entries in the cache now


# ------------------------------------------------------------------ names


@dataclass(frozen=True, slots=True)
class ReverseDNS:
    """What :meth:`Resolver.fcrdns` found.

    :param names: the PTR names that are host names (none if the lookup
        failed).
    :param confirmed: those whose addresses include the client's.
    :param ptr_temporary: the PTR lookup failed temporarily.
    :param unsure: names whose own lookup failed temporarily.
    :param first: the first PTR name as published, host name or not (the
        one Postfix's lookup takes, as getnameinfo gives it).
    :param ttl: seconds every answer it was made of stays valid (the
        shortest remaining TTL; 0 after a temporary failure).
    """

    names: tuple[str, ...] = ()
    confirmed: tuple[str, ...] = ()
    ptr_temporary: bool = False
    unsure: tuple[str, ...] = ()
    first: str = ""
    ttl: int = field(default=0, compare=False)

    @property
    def temporary(self) -> bool:
        """No name is confirmed, and a temporary failure may be why."""
        return not self.confirmed and (self.ptr_temporary or bool(self.unsure))

    def as_postfix(self) -> tuple[str, str, bool]:
        """``(name, reverse name, name failed temporarily)`` as Postfix's
        smtpd takes them: from the first PTR name only (getnameinfo's),
        ``"unknown"`` if it is no host name or does not lead back."""
        first = self.first
        if first not in self.names:
            return "unknown", "unknown", self.ptr_temporary
        return (first if first in self.confirmed else "unknown"), first, first in self.unsure


def _ip(ip: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """Parse ``ip``; an IPv4-mapped IPv6 address (``::ffff:a.b.c.d``, what a
    dual-stack socket reports) counts as the IPv4 address it carries."""
    address = ipaddress.ip_address(ip)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


# Names are asked for the same few client addresses again and again (every
# zone, every session from one server); parsing the address each time cost
# more than the cached DNS answer it leads to.
@functools.lru_cache(maxsize=4096)
def reverse_name(ip: str) -> str:
    """The PTR name of ``ip``: ``4.3.2.1.in-addr.arpa`` or the 32-nibble
    ``....ip6.arpa`` form.  Raises ValueError if ``ip`` is not an address."""
    return _ip(ip).reverse_pointer


@functools.lru_cache(maxsize=4096)
def dnsbl_name(ip: str, zone: str) -> str:
    """The name to look ``ip`` up in DNSBL ``zone`` (RFC 5782 section 2):
    reversed octets for IPv4, reversed nibbles for IPv6.

    >>> dnsbl_name("192.0.2.99", "dnsbl.example.")
    '99.2.0.192.dnsbl.example'
    """
    address = _ip(ip)
    labels = address.reverse_pointer.rsplit(".", 2)[0]  # drop in-addr.arpa / ip6.arpa
    return f"{labels}.{zone.strip('.')}"


def _parse_nameserver(text: str) -> dns.nameserver.Do53Nameserver:
    """``IP``, ``IP:PORT``, ``[V6]`` or ``[V6]:PORT`` (a bare v6 has no port)."""
    return dns.nameserver.Do53Nameserver(*parse_nameserver(text))


# --------------------------------------------------------------- resolver


class TtlMemo:
    """What a check concluded from DNS answers alone, kept while the
    answers it used are: a busy client asks the same questions session
    after session, and judging the cached answers again cost more than
    asking the cache.  Get one from :meth:`Resolver.memo`.

    The key must hold every input besides the answers.  A value is kept
    for the ``ttl`` given (the shortest remaining TTL of the answers; 0,
    as a temporary failure's, keeps nothing), at most ``size`` of them,
    the least recently used dropped first."""

    __slots__ = ("__weakref__", "_clock", "_entries", "size")

    def __init__(self, clock: Callable[[], float], size: int) -> None:
        self._clock = clock
        self.size = size
        self._entries: OrderedDict[Any, tuple[float, Any]] = OrderedDict()

    def get(self, key: Any) -> Any:
        """The value kept under ``key``, or None."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry[0] <= self._clock():
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return entry[1]

    def put(self, key: Any, value: Any, ttl: float) -> None:
        if ttl <= 0 or self.size <= 0:
            return
        self._entries[key] = (self._clock() + ttl, value)
        self._entries.move_to_end(key)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


def _text(rdata: dns.rdata.Rdata) -> str:
    if isinstance(rdata, dns.rdtypes.txtbase.TXTBase):
        return b"".join(rdata.strings).decode("utf-8", "replace")
    return rdata.to_text()


def _negative_ttl(response: dns.message.Message | None) -> int:
    """RFC 2308: min(SOA TTL, SOA minimum) and any CNAME on the way.  Without
    an SOA the answer SHOULD NOT be cached (section 5), so 0."""
    if response is None:
        return 0
    soas = [rrset for rrset in response.authority if rrset.rdtype == dns.rdatatype.SOA]
    if not soas:
        return 0
    ttl: int = min(soas[0].ttl, soas[0][0].minimum)
    return min([ttl] + [rrset.ttl for rrset in response.answer])


_BESIDE_THE_CHAIN = frozenset({dns.rdatatype.DNAME, dns.rdatatype.RRSIG})


def _not_about(response: dns.message.Message, qname: dns.name.Name) -> str | None:
    """Why a negative response (NXDOMAIN, or NOERROR without the records
    asked for) says nothing of ``qname``, or None if it is the "no" it
    looks like.

    dnspython takes any NOERROR response without the records for "no
    data".  But one that holds only another name's records, or the SOA of
    a zone that does not hold the name, answers another question (a broken
    server, a confused middlebox); and a CNAME chain whose target gets
    neither records nor its zone's SOA was never followed to its end.
    Taken as "no such domain", such an answer refuses a sender (550) for
    a fault that a retry may not meet: it must be a temporary failure."""
    try:
        chain = response.resolve_chaining()  # type: ignore[attr-defined]
    except Exception as exc:  # a loop, or records for NXDOMAIN
        return f"{type(exc).__name__} in the answer for {qname}"
    end: dns.name.Name = chain.canonical_name
    on_chain = {rrset.name for rrset in chain.cnames} | {qname, end}
    # A DNAME (RFC 6672) is owned by a name above the chain, whose CNAMEs
    # it made; signatures go with what they sign.
    stray = next((rrset.name for rrset in response.answer
                  if rrset.name not in on_chain and rrset.rdtype not in _BESIDE_THE_CHAIN), None)
    if stray is not None:
        return f"answer for {stray} instead of {qname}"
    soas = [rrset.name for rrset in response.authority if rrset.rdtype == dns.rdatatype.SOA]
    if soas and not any(end.is_subdomain(zone) for zone in soas):
        return f"negative answer with the SOA of {soas[0]}, not of a zone above {end}"
    if chain.cnames and not soas and response.rcode() == dns.rcode.NOERROR:
        return f"CNAME chain ends at {end} without an answer"
    return None


@functools.lru_cache(maxsize=4096)
def _query_key(name: str, rdtype: str) -> _Key:
    """The cache key of a question.  Memoised: parsing the name was a
    visible cost of every cache hit, and busy senders ask the same names."""
    return (
        dns.name.from_text(to_ascii_domain(name)).canonicalize().to_text(),
        dns.rdatatype.from_text(rdtype),
    )


def _weight(answer: Answer) -> int:
    """About the bytes ``answer`` takes in the cache: its text twice (as
    ``records`` and in ``rdata``) and a fixed cost per record."""
    return _ENTRY_BYTES + sum(2 * len(text) + _RECORD_BYTES for text in answer.records)


class Resolver:
    """Asynchronous stub resolver with a TTL cache and in-flight de-duplication.

    :param nameservers: ``"IP"``, ``"IP:PORT"`` or ``"[V6]:PORT"``; empty means
        the system's (/etc/resolv.conf; 127.0.0.1 if it names none, as
        the C library's resolver takes it).
    :param timeout: seconds one question may take in all (retries and TCP
        fallback included) before it is TEMPFAIL; with several nameservers
        each gets an equal share before the next is asked.
    :param cache_size: most entries kept (least recently used go first); 0
        disables the cache (de-duplication still works).
    :param cache_bytes: about the most memory the entries take; least
        recently used go first.  The count alone bounds nothing: whoever
        runs a domain chooses how big its answers are (a 64 KB answer of
        4,000 A records takes 650 KB here), and any client can make us ask
        for its names (SPF, DKIM keys, MAIL FROM).
    :param tempfail_ttl: seconds a TEMPFAIL is remembered (0 = not at all).
    :param clock: monotonic clock, replaceable in tests.

    Why the cache is ours, not dnspython's: negative answers are cached by
    their SOA only (dnspython assumes 300 s when there is none; RFC 2308 says
    do not cache those), TTLs are capped, TEMPFAIL is remembered briefly, hits
    are counted, and the cache sits behind the de-duplication.

    Why de-duplicate: a spam run opens many sessions from the same client at
    once, and each asks the same DNSBL and SPF questions before the first
    answer is cached.  Concurrent askers of one (name, type) await a single
    shared task; a waiter that is cancelled (its session timed out or hung up)
    does not cancel the others, thanks to :func:`asyncio.shield`.

    Why TEMPFAIL is cached, but only for ``tempfail_ttl`` (5 s): RFC 9520
    requires resolvers to cache resolution failures (briefly), so that a
    dead or slow server (or a DNSBL that blocks us) costs one timeout per few
    seconds instead of one per session -- without that, a flood waits out the
    full timeout on every connection.  Not longer: a TEMPFAIL makes the
    gateway answer 4xx, and one lost packet must not defer all mail for a
    domain for minutes.

    Use one Resolver per event loop thread; it is not thread-safe (the SPF
    bridge calls it through the loop, so that is fine).
    """

    def __init__(
        self,
        nameservers: Sequence[str] = (),
        timeout: float = 5.0,
        cache_size: int = 10000,
        *,
        cache_bytes: int = CACHE_BYTES,
        tempfail_ttl: float = TEMPFAIL_TTL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        servers = [_parse_nameserver(ns) for ns in nameservers]
        try:
            self._dns = dns.asyncresolver.Resolver(configure=not servers)
        except dns.resolver.NoResolverConfiguration as exc:
            # No nameserver line in /etc/resolv.conf, or no file: the C
            # library's resolver then asks the local server (resolv.conf(5)),
            # and so do we -- dnspython raised, and every worker died at start.
            log.warning("the system names no DNS server (%s): asking 127.0.0.1, as the C library does", exc)
            self._dns = dns.asyncresolver.Resolver(configure=False)
            self._dns.nameservers = ["127.0.0.1"]
        if servers:
            self._dns.nameservers = servers
        self._dns.cache = None  # ours, see above
        self._dns.lifetime = timeout
        # One try per server, each an equal share of the time: a retry sends
        # a new query and drops the late answer to the first, so with short
        # tries a list that always takes longer than a try could never be
        # read, whatever `timeout` says; but a second server must still get
        # its turn when the first is silent.
        self._dns.timeout = timeout / max(1, len(self._dns.nameservers))
        self._dns.use_edns(0, 0, _EDNS_PAYLOAD)
        self.timeout = timeout
        self._cache_size = cache_size
        self._cache_bytes = cache_bytes
        self._cache_weight = 0
        self._tempfail_ttl = tempfail_ttl
        self._clock = clock
        #: key: (expires, answer, weight)
        self._cache: OrderedDict[_Key, tuple[float, Answer, int]] = OrderedDict()
        #: spf_check results by (ip, sender, helo): (expires, (result, explanation)).
        self._spf_results: OrderedDict[tuple[str, str, str], tuple[float, tuple[str, str]]] = OrderedDict()
        #: SPF pool shares of the client addresses with checks under way.
        self._spf_slots: dict[str, _ClientSlots] = {}
        self._inflight: dict[_Key, asyncio.Task[Answer]] = {}
        self._hits = self._coalesced = self._sent = 0
        self._memos: weakref.WeakSet[TtlMemo] = weakref.WeakSet()

    # ---------------------------------------------------------------- query

    async def query(self, name: str, rdtype: str) -> Answer:
        """Ask for ``rdtype`` records of ``name`` (always absolute; no search
        list).  Never raises for DNS trouble; a name that cannot exist in the
        DNS (empty label, label over 63 bytes...) is NXDOMAIN without a query.
        Raises ValueError only for an unknown ``rdtype`` (a programming error)."""
        try:
            key = _query_key(name, rdtype)
        except dns.rdatatype.UnknownRdatatype:
            raise ValueError(f"unknown DNS type {rdtype!r}") from None
        except (dns.exception.DNSException, UnicodeError) as exc:
            return Answer(Status.NXDOMAIN, error=f"invalid name {name!r}: {exc}")
        cached = self._cache_get(key)
        if cached is not None:
            self._hits += 1
            return cached
        return await self._fetch(key)

    def cached(self, name: str, rdtype: str) -> Answer | None:
        """The answer :meth:`query` would give at once from the cache, or
        None if it would have to ask.  For callers that can then skip a
        task or a timer: most lookups on a busy gateway are cache hits."""
        try:
            key = _query_key(name, rdtype)
        except (dns.exception.DNSException, UnicodeError):
            return None  # query() answers these itself
        cached = self._cache_get(key)
        if cached is not None:
            self._hits += 1
        return cached

    def is_cached(self, name: str, *rdtypes: str) -> bool:
        """Whether the cache would answer every ``rdtype`` of ``name`` now
        (for choosing between awaiting in turn and gathering)."""
        try:
            keys = [_query_key(name, rdtype) for rdtype in rdtypes]
        except (dns.exception.DNSException, UnicodeError):
            return False
        now = self._clock()
        return all((entry := self._cache.get(key)) is not None and entry[0] > now for key in keys)

    def is_asking(self, name: str, rdtype: str) -> bool:
        """Whether a query for ``name`` is on its way now (one whose waiter
        gave up goes on, to fill the cache)."""
        try:
            key = _query_key(name, rdtype)
        except (dns.exception.DNSException, UnicodeError):
            return False
        return key in self._inflight

    async def query_all(self, questions: Sequence[tuple[str, str]]) -> list[Answer]:
        """:meth:`query` for each ``(name, rdtype)``, concurrently; what the
        cache holds is answered without a task."""
        answers: list[Answer | None] = [self.cached(name, rdtype) for name, rdtype in questions]
        missing = [i for i, answer in enumerate(answers) if answer is None]
        if len(missing) == 1:
            answers[missing[0]] = await self.query(*questions[missing[0]])
        elif missing:
            found = await asyncio.gather(*(self.query(*questions[i]) for i in missing))
            for i, answer in zip(missing, found):
                answers[i] = answer
        return answers  # type: ignore[return-value]  # every slot is filled now

    async def _fetch(self, key: _Key) -> Answer:
        """Ask for ``key`` once, however many sessions want it meanwhile."""
        loop = asyncio.get_running_loop()
        task = self._inflight.get(key)
        if task is not None and task.get_loop() is loop:
            self._coalesced += 1
        else:
            task = loop.create_task(self._resolve(key))
            self._inflight[key] = task
            task.add_done_callback(lambda done: self._forget(key, done))
        return await asyncio.shield(task)

    def _forget(self, key: _Key, task: asyncio.Task[Answer]) -> None:
        if self._inflight.get(key) is task:
            del self._inflight[key]

    async def _resolve(self, key: _Key) -> Answer:
        """Ask the nameservers once and cache the outcome."""
        self._sent += 1
        answer = await self._ask(dns.name.from_text(key[0]), key[1])
        if answer.status is Status.TEMPFAIL:
            log.debug("DNS %s %s: %s", key[0], dns.rdatatype.to_text(key[1]), answer.error)
            lifetime = self._tempfail_ttl
        else:
            lifetime = float(answer.ttl)
        self._cache_put(key, answer, lifetime)
        return answer

    async def _ask(self, qname: dns.name.Name, qtype: dns.rdatatype.RdataType) -> Answer:
        """One resolution through dnspython, classified into an Answer."""
        try:
            # dnspython bounds itself by lifetime; the outer bound is a guard.
            async with asyncio.timeout(self.timeout + 1.0):
                result = await self._dns.resolve(qname, qtype, raise_on_no_answer=False, search=False)
        except dns.resolver.NXDOMAIN as exc:
            responses = exc.responses()  # type: ignore[no-untyped-call]
            response = next(iter(responses.values()), None)
            wrong = None if response is None else _not_about(response, qname)
            if wrong is not None:
                return Answer(Status.TEMPFAIL, error=wrong)
            return Answer(Status.NXDOMAIN, ttl=min(_negative_ttl(response), MAX_NEGATIVE_TTL))
        except (dns.exception.Timeout, TimeoutError):
            return Answer(Status.TEMPFAIL, error=f"timeout after {self.timeout:g}s")
        except dns.resolver.NoNameservers as exc:
            # SERVFAIL or REFUSED from every server (dnspython does not retry those)
            return Answer(Status.TEMPFAIL, error=str(exc))
        except Exception as exc:  # a hostile or broken server must not crash a session
            return Answer(Status.TEMPFAIL, error=f"{type(exc).__name__}: {exc}")
        if result.rrset is None:
            wrong = _not_about(result.response, qname)
            if wrong is not None:
                return Answer(Status.TEMPFAIL, error=wrong)
            return Answer(Status.NODATA, ttl=min(_negative_ttl(result.response), MAX_NEGATIVE_TTL))
        rdata = tuple(result.rrset)
        ttl = min(result.chaining_result.minimum_ttl, MAX_TTL)
        return Answer(Status.RECORDS, tuple(_text(rd) for rd in rdata), ttl, rdata)

    # ---------------------------------------------------------------- cache

    def _cache_get(self, key: _Key) -> Answer | None:
        entry = self._cache.get(key)
        if entry is None:
            return None
        expires, answer, weight = entry
        remaining = expires - self._clock()
        if remaining <= 0:
            del self._cache[key]
            self._cache_weight -= weight
            return None
        self._cache.move_to_end(key)
        ttl = int(remaining)
        if ttl >= answer.ttl:
            return answer
        # Built directly: dataclasses.replace() costs several times more, and
        # this runs for every lookup a warm cache answers.
        return Answer(answer.status, answer.records, ttl, answer.rdata, answer.error)

    def _cache_put(self, key: _Key, answer: Answer, lifetime: float) -> None:
        weight = _weight(answer)
        if lifetime <= 0 or self._cache_size <= 0 or weight > self._cache_bytes:
            return
        old = self._cache.pop(key, None)
        if old is not None:
            self._cache_weight -= old[2]
        self._cache[key] = (self._clock() + lifetime, answer, weight)
        self._cache_weight += weight
        while len(self._cache) > self._cache_size or self._cache_weight > self._cache_bytes:
            self._cache_weight -= self._cache.popitem(last=False)[1][2]

    def cache_clear(self) -> None:
        self._spf_results.clear()
        self._cache.clear()
        self._cache_weight = 0
        for memo in self._memos:
            memo.clear()

    def memo(self) -> TtlMemo:
        """A :class:`TtlMemo` on this resolver's clock, as large as its
        cache, cleared with it."""
        memo = TtlMemo(self._clock, max(self._cache_size, 0))
        self._memos.add(memo)
        return memo

    @property
    def stats(self) -> CacheStats:
        return CacheStats(self._hits, self._coalesced, self._sent, len(self._cache))

    # -------------------------------------------------------------- helpers

    async def txt(self, name: str) -> Answer:
        """TXT records of ``name``, each as one joined string."""
        return await self.query(name, "TXT")

    async def mx(self, name: str) -> Answer:
        """MX records of ``name`` sorted by preference (``rdata`` likewise).
        A null MX (RFC 7505) is the one record ``"0 ."``."""
        answer = await self.query(name, "MX")
        if not answer.ok:
            return answer
        ordered = sorted(answer.rdata, key=lambda rd: (rd.preference, rd.exchange))  # type: ignore[attr-defined]
        return replace(answer, records=tuple(_text(rd) for rd in ordered), rdata=tuple(ordered))

    async def ptr(self, ip: str) -> Answer:
        """PTR names of ``ip`` (IPv4, IPv6 or IPv4-mapped IPv6)."""
        return await self.query(reverse_name(ip), "PTR")

    async def fcrdns(self, ip: str, *, max_names: int = 10) -> ReverseDNS:
        """Forward-confirmed reverse DNS of ``ip``: its PTR names (the first
        ``max_names``), then A (or AAAA) of each, concurrently: which of
        them resolve back to ``ip``?"""
        address = ipaddress.ip_address(ip)
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        ptr = await self.ptr(str(address))
        if not ptr.ok:
            return ReverseDNS(ptr_temporary=ptr.temporary, ttl=ptr.ttl)
        # A PTR "name" that is no host name (all digits, a bad label) is
        # none, as Postfix takes it; the next hop's XCLIENT would refuse it.
        published = [record.rstrip(".") for record in ptr.records[:max_names]]
        names = tuple(name for name in published if is_hostname(name))
        if not names:
            return ReverseDNS(first=published[0] if published else "", ttl=ptr.ttl)
        rdtype = "A" if address.version == 4 else "AAAA"
        answers = await self.query_all([(name, rdtype) for name in names])
        confirmed = tuple(
            name for name, answer in zip(names, answers)
            if answer.ok and any(ipaddress.ip_address(record) == address for record in answer.records)
        )
        unsure = tuple(name for name, answer in zip(names, answers) if answer.temporary)
        ttl = min(ptr.ttl, *(answer.ttl for answer in answers))
        return ReverseDNS(names, confirmed, unsure=unsure, first=published[0], ttl=ttl)

    async def a_aaaa(self, name: str) -> Answer:
        """A and AAAA of ``name``, asked concurrently, IPv4 first.

        RECORDS if either has records (a TEMPFAIL on the other is dropped:
        the address we have is still an address); else TEMPFAIL if either
        failed; else NXDOMAIN if both say so; else NODATA."""
        return (await self.a_aaaa_ttl(name))[0]

    async def a_aaaa_ttl(self, name: str) -> tuple[Answer, int]:
        """:meth:`a_aaaa`, and the seconds both answers it was made of stay
        valid (whose ``ttl`` leaves out one dropped)."""
        a, aaaa = await self.query_all(((name, "A"), (name, "AAAA")))
        return self._a_aaaa(a, aaaa), min(a.ttl, aaaa.ttl)

    @staticmethod
    def _a_aaaa(a: Answer, aaaa: Answer) -> Answer:
        found = [x for x in (a, aaaa) if x.ok]
        if found:
            return Answer(
                Status.RECORDS,
                tuple(r for x in found for r in x.records),
                min(x.ttl for x in found),
                tuple(rd for x in found for rd in x.rdata),
            )
        for x in (a, aaaa):
            if x.temporary:
                return x
        if a.status is Status.NXDOMAIN and aaaa.status is Status.NXDOMAIN:
            return Answer(Status.NXDOMAIN, ttl=min(a.ttl, aaaa.ttl))
        return Answer(Status.NODATA, ttl=min(a.ttl, aaaa.ttl))


# ------------------------------------------------------------------- DKIM

DkimDnsFunc = Callable[..., Awaitable[bytes | None]]


def dkim_dnsfunc(resolver: Resolver) -> DkimDnsFunc:
    """A ``dnsfunc`` for ``dkim.asyncsupport.verify_async`` (and ``arc``) that
    asks ``resolver``.

    dkimpy calls it as ``await f(name: bytes, timeout=5)`` and wants the first
    TXT record with its strings joined, as bytes, or None if there is none.
    Without ``timeout`` (as the dkim plugin calls it) a lookup takes as long
    as ``resolver`` lets any question take: ``[dns] timeout``.  A
    TEMPFAIL raises ``dkim.DnsTimeoutError`` (a DKIMException), so callers
    using ``dkim.asyncsupport.DKIM`` directly can tell "temperror" from
    "no key"; ``verify_async`` itself turns it into False.  ``name`` may also
    be ``str`` (authheaders passes str for DMARC).
    """

    async def dnsfunc(name: bytes | str, timeout: float | None = None) -> bytes | None:
        qname = name.decode("utf-8", "replace") if isinstance(name, bytes) else name
        # A cached key (the usual case) needs no task and no timer.
        answer = resolver.cached(qname, "TXT")
        if answer is None and timeout is None:
            answer = await resolver.query(qname, "TXT")  # bounded by the resolver's timeout
        elif answer is None:
            try:
                answer = await asyncio.wait_for(resolver.query(qname, "TXT"), timeout)
            except TimeoutError:
                raise dkim.DnsTimeoutError(f"{qname}: timeout after {timeout}s") from None
        return dkim_key_record(qname, answer)

    return dnsfunc


def dkim_key_record(qname: str, answer: Answer) -> bytes | None:
    """What a dkimpy ``dnsfunc`` returns for ``answer``: the first TXT record
    with its strings joined, or None; a temporary failure raises
    ``dkim.DnsTimeoutError``."""
    if answer.temporary:
        raise dkim.DnsTimeoutError(f"{qname}: {answer.error}")
    if not answer.ok:
        return None
    return b"".join(answer.rdata[0].strings)  # type: ignore[attr-defined]


# -------------------------------------------------------------------- SPF
#
# pyspf is synchronous and has no DNS parameter: spf.query.dns() calls the
# module-level function spf.DNSLookup(name, qtype, strict, timeout).  We
# replace that function once with a router that answers through the Resolver
# stored in a context variable, which spf_check sets inside its worker thread.
# Outside spf_check the router calls pyspf's original lookup, so any other
# user of pyspf in the process sees no change.  Overriding query.dns() in a
# subclass instead would mean copying its ~50 lines (CNAME chains, void-lookup
# and time limits) and following every pyspf release.

_SpfLookup = Callable[[str, str, float], list[tuple[tuple[str, str], Any]]]
_SPF_LOOKUP: contextvars.ContextVar[_SpfLookup | None] = contextvars.ContextVar("smtpgate_spf_lookup", default=None)
_spf_install_lock = threading.Lock()
_spf_original: Callable[..., Any] | None = None
_spf_executor: concurrent.futures.ThreadPoolExecutor | None = None
# Threads mostly sleep waiting for the event loop, so many are cheap; a pool
# of its own keeps slow SPF checks from starving the loop's default executor
# (which asyncio uses for getaddrinfo).
_SPF_WORKERS = 32
#: Threads of that pool one client address may hold at once.  A client can
#: make its own checks slow (its domains' DNS, an include: of its choice);
#: without a share of its own, 32 such sessions from one address would
#: leave every other session's SPF check waiting for a thread until its
#: hook ran out of time.
_SPF_PER_CLIENT = _SPF_WORKERS // 4


class _ClientSlots:
    """One client address's share of the SPF pool, kept while in use."""

    __slots__ = ("free", "users")

    def __init__(self) -> None:
        self.free = asyncio.Semaphore(_SPF_PER_CLIENT)
        self.users = 0


def _spf_router(name: str, qtype: str, strict: Any = True, timeout: float = 20) -> list[tuple[tuple[str, str], Any]]:
    lookup = _SPF_LOOKUP.get()
    if lookup is None:
        assert _spf_original is not None
        return _spf_original(name, qtype, strict, timeout)  # type: ignore[no-any-return]
    return lookup(name, qtype, timeout)


def _install_spf_router() -> concurrent.futures.ThreadPoolExecutor:
    global _spf_original, _spf_executor
    with _spf_install_lock:
        if spf.DNSLookup is not _spf_router:
            _spf_original = spf.DNSLookup
            spf.DNSLookup = _spf_router
        if _spf_executor is None:
            _spf_executor = concurrent.futures.ThreadPoolExecutor(_SPF_WORKERS, thread_name_prefix="smtpgate-spf")
        return _spf_executor


def _spf_records(name: str, qtype: str, answer: Answer) -> list[tuple[tuple[str, str], Any]]:
    """Our Answer in the shape pyspf's DNSLookup_dnspython returns."""
    key = (name, qtype)
    if qtype in ("A", "AAAA"):
        return [(key, rd.address) for rd in answer.rdata]  # type: ignore[attr-defined]
    if qtype == "MX":
        return [(key, (rd.preference, rd.exchange.to_text(True))) for rd in answer.rdata]  # type: ignore[attr-defined]
    if qtype == "PTR":
        return [(key, rd.target.to_text(True)) for rd in answer.rdata]  # type: ignore[attr-defined]
    if qtype in ("TXT", "SPF"):
        return [(key, tuple(rd.strings)) for rd in answer.rdata]  # type: ignore[attr-defined]
    return []


def _spf_lookup_via(resolver: Resolver, loop: asyncio.AbstractEventLoop, ttls: list[int]) -> _SpfLookup:
    """A blocking lookup for a worker thread: runs resolver.query on ``loop``
    and appends each answer's remaining TTL to ``ttls``."""

    def lookup(name: str, qtype: str, timeout: float) -> list[tuple[tuple[str, str], Any]]:
        bound = min(timeout, resolver.timeout) + 1.0
        try:
            future = asyncio.run_coroutine_threadsafe(resolver.query(name, qtype), loop)
        except RuntimeError as exc:  # the loop is closed
            raise spf.TempError(f"DNS {name} {qtype}: {exc}") from None
        try:
            answer = future.result(bound)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise spf.TempError(f"DNS {name} {qtype}: timeout") from None
        if answer.temporary:
            raise spf.TempError(f"DNS {name} {qtype}: {answer.error}")
        ttls.append(answer.ttl)
        return _spf_records(name, qtype, answer)

    return lookup


def _spf_query(ip: str, sender: str, helo: str, querytime: float) -> spf.query:
    """pyspf's query for ``sender`` -- what ``spf.check2`` builds, with the
    sender split at its last "@".

    pyspf splits at the first, so a quoted local part holding "@"
    (``"x@y"@auth.test``) would have it judge ``y"@auth.test``: a name
    auth.test never published, whose ``none`` or ``temperror`` let a forged
    sender past auth.test's ``-all``.  The domain is what follows the last
    "@" (RFC 7208 §4.3); ``l``, ``o`` and ``d`` are the macro variables
    pyspf's query documents, read only once ``check()`` runs."""
    query = spf.query(i=ip, s=sender, h=helo, querytime=querytime)
    local, at, domain = sender.rpartition("@")
    if at:
        # §4.3: a sender without a local part is postmaster's, as pyspf does.
        query.l, query.o, query.d = local or "postmaster", domain, domain
    return query


#: Most seconds an SPF result is reused for the same (ip, sender, HELO):
#: no longer than the shortest TTL among the answers it was made of, and
#: short anyway, so a domain that changes its SPF record is obeyed soon.
SPF_RESULT_TTL = 60.0


def spf_cached(resolver: Resolver, ip: str, sender: str, helo: str) -> tuple[str, str] | None:
    """What :func:`spf_check` would return at once from its short-lived
    cache of results, or None if it would have to evaluate."""
    cached = resolver._spf_results.get((ip, sender.lower(), helo.lower()))
    if cached is not None and cached[0] > resolver._clock():
        return cached[1]
    return None


async def _in_pool(
    resolver: Resolver, ip: str, executor: concurrent.futures.Executor, run: Callable[[], tuple[str, str]]
) -> tuple[str, str]:
    """``run()`` in the SPF pool, within ``ip``'s share of it.  The share is
    given back when the thread is done, not when our wait ends: a client
    that disconnects leaves its check running, and must not start more."""
    slots = resolver._spf_slots.get(ip)
    if slots is None:
        slots = resolver._spf_slots[ip] = _ClientSlots()
    slots.users += 1
    try:
        await slots.free.acquire()
    except BaseException:
        _left(resolver, ip, slots)
        raise
    loop = asyncio.get_running_loop()

    def done(_: object) -> None:  # in the pool's thread, or here if cancelled before it ran
        with contextlib.suppress(RuntimeError):  # the loop has closed: nothing to give back to
            loop.call_soon_threadsafe(_freed, resolver, ip, slots)

    job = executor.submit(run)
    job.add_done_callback(done)
    return await asyncio.wrap_future(job)


def _freed(resolver: Resolver, ip: str, slots: _ClientSlots) -> None:
    slots.free.release()
    _left(resolver, ip, slots)


def _left(resolver: Resolver, ip: str, slots: _ClientSlots) -> None:
    slots.users -= 1
    if not slots.users and resolver._spf_slots.get(ip) is slots:
        del resolver._spf_slots[ip]


async def spf_check(resolver: Resolver, ip: str, sender: str, helo: str, *, querytime: float = 20.0) -> tuple[str, str]:
    """RFC 7208 check of ``sender`` (MAIL FROM; empty for bounces, then the
    HELO identity is checked) sent from ``ip`` -- what pyspf's ``check2``
    does, with the domain taken after the sender's last "@" and every DNS
    question through ``resolver`` (shared cache, our timeouts, loopback in
    tests).

    :param querytime: seconds for the whole evaluation (RFC 7208 4.6.4 says 20).
    :returns: (result, explanation); result is one of ``pass``, ``fail``,
        ``softfail``, ``neutral``, ``none``, ``temperror``, ``permerror``.
    """
    cached = spf_cached(resolver, ip, sender, helo)
    if cached is not None:
        return cached
    key = (ip, sender.lower(), helo.lower())
    executor = _install_spf_router()
    ttls: list[int] = []
    lookup = _spf_lookup_via(resolver, asyncio.get_running_loop(), ttls)

    def run() -> tuple[str, str]:
        token = _SPF_LOOKUP.set(lookup)
        try:
            result, _, explanation = _spf_query(ip, sender, helo, querytime).check()
        except spf.PermError as exc:  # raised before evaluation, e.g. a bad IP
            return "permerror", f"SPF Permanent Error: {exc}"
        finally:
            _SPF_LOOKUP.reset(token)
        return str(result), str(explanation)

    outcome = await _in_pool(resolver, ip, executor, run)
    keep = min([SPF_RESULT_TTL, *ttls])
    if outcome[0] != "temperror" and keep > 0:
        # The same client, sender and HELO get the same answer while the DNS
        # data does: keeping it a short while saves the thread hop and
        # pyspf's evaluation for every message of a busy sender.
        results = resolver._spf_results
        results[key] = (resolver._clock() + keep, outcome)
        results.move_to_end(key)
        while len(results) > max(resolver._cache_size, 1):
            results.popitem(last=False)
    return outcome
