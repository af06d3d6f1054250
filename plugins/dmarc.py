"""DMARC (RFC 7489): does the author's domain vouch for the message?

At end of DATA the plugin takes the domain of the RFC5322.From address (the
author domain), looks up its DMARC record (``_dmarc.DOMAIN``, else
``_dmarc.ORGDOMAIN``, RFC 7489 §6.6.3; the organisational domain comes from
the public suffix list, parsed once per process), and passes the message if
SPF or DKIM authenticated a domain *aligned* with the author domain:

* SPF: the result of the MAIL FROM identity (the HELO identity for ``<>``)
  is ``pass`` and that domain is aligned (``aspf``);
* DKIM: some signature passed and its ``d=`` is aligned (``adkim``).

Aligned means the same organisational domain (relaxed, ``r``, the default)
or the same domain (strict, ``s``).  SPF is taken from the ``spf`` plugin
when it ran for this transaction, else checked here; DKIM is verified once
per message and shared with the ``dkim`` plugin.

When neither aligns, the record's policy applies: ``p=`` for the domain
that published it, ``sp=`` for its subdomains (when the record was found at
the organisational domain), ``np=`` for its subdomains that do not exist
(RFC 9091: no A, AAAA or MX records).  ``pct=`` is honoured by default (RFC 7489
§6.6.4: mail outside the sample gets the next milder policy).  The finding is
``reject``, ``quarantine`` or ``fail`` (``p=none``); the others are
``pass``, ``none`` (no record), ``temperror``, ``permerror`` (an unusable
record), ``bad_from`` (no From field, or one that gives no usable domain)
and ``many_authors`` (more From domains than :data:`MAX_AUTHOR_DOMAINS`,
refused by default: none of them is looked up).

A message with several From domains (several addresses, several From
fields) is checked with each as the author domain, and the strictest
result decides (RFC 7489 §6.6.1, :func:`strictest`): it passes only if
every one passes.

The plugin writes the message's one Authentication-Results header, with
the spf, dkim and dmarc results together (:mod:`plugins._authresults`).
Clients in ``trusted_networks`` are not checked.
"""

from __future__ import annotations

import asyncio
import functools
import random
import re
import time
from collections.abc import Coroutine, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from publicsuffixlist import PublicSuffixList

from gateway import (
    Context,
    Envelope,
    Message,
    Plugin,
    Reply,
    Session,
    Verdict,
    hookimpl,
)
from gateway.actions import ActionOptions, ActionSpec, check_actions, decide
from gateway.dns import MAX_TTL, Answer, Resolver, TtlMemo

from . import _authresults as ar
from . import dkim, spf

__all__ = [
    "DEFAULT_ACTIONS",
    "DMARC_BAD_FROM",
    "DMARC_REJECT",
    "DMARC_REJECTED",
    "DMARC_TEMPERROR",
    "FINDINGS",
    "MAX_AUTHOR_DOMAINS",
    "MAX_LOOKUPS",
    "Discovery",
    "DmarcPlugin",
    "DmarcRecord",
    "DmarcResult",
    "aligned",
    "ar_result",
    "evaluate",
    "evaluate_all",
    "find_record",
    "organizational_domain",
    "parse_record",
    "strictest",
]

FINDINGS = ("pass", "none", "fail", "quarantine", "reject", "temperror", "permerror", "bad_from", "many_authors")
DEFAULT_ACTIONS: Mapping[str, ActionSpec] = {"reject": "reject", "quarantine": "tag", "many_authors": "reject"}
#: DMARC records looked up at once for a message with several From domains.
MAX_LOOKUPS = 8
#: More From domains than this are not looked up (finding ``many_authors``).
#: Each costs up to two queries, to domains the sender chose: a From of
#: 20,000 domains made one message send 6,514 before the hook's time ran
#: out.  Checking only some would let a domain with p=reject hide among
#: the others, hence a finding of its own, refused by default.
MAX_AUTHOR_DOMAINS = 16

# Replies (OpenDMARC's wording for the rejection).
DMARC_REJECT = Reply(550, "5.7.1", "Rejected by DMARC policy for {domain}")
DMARC_TEMPERROR = Reply(451, "4.7.1", "Temporary error evaluating DMARC policy for {domain}, try again later")
DMARC_BAD_FROM = Reply(550, "5.7.1", "Message needs From addresses with domains that can be checked: {problem}")
#: For a policy that refuses on a finding that is no DMARC failure.
DMARC_REJECTED = Reply(550, "5.7.1", "Message rejected: DMARC {finding} for {domain}")


# ------------------------------------------------------------ org domain


@functools.cache
def _psl() -> PublicSuffixList:
    """The public suffix list, parsed once (about 0.1 s)."""
    return PublicSuffixList()


def organizational_domain(domain: str) -> str:
    """RFC 7489 §3.2: the public suffix plus one label; a public suffix
    itself (or an unknown name) stands for itself."""
    if len(domain) > 253:  # no domain name: not worth keeping (d= can be any length)
        return _psl().privatesuffix(domain) or domain
    return _organizational_domain(domain)


# The list does not change while the process runs, and every message asks
# for the same few domains (its author's, its DKIM and SPF domains').
@functools.lru_cache(maxsize=4096)
def _organizational_domain(domain: str) -> str:
    return _psl().privatesuffix(domain) or domain


def aligned(domain: str, author: str, mode: str) -> bool:
    """Identifier alignment (RFC 7489 §3.1): strict ``s`` is equality,
    relaxed ``r`` the same organisational domain."""
    domain, author = domain.lower().rstrip("."), author.lower().rstrip(".")
    if not domain or not author:
        return False
    if mode == "s":
        return domain == author
    return domain == author or organizational_domain(domain) == organizational_domain(author)


# ------------------------------------------------------------ records

_VERSION = re.compile(r"\s*v\s*=\s*DMARC1\s*(?:;|\Z)", re.IGNORECASE)
_POLICIES = ("none", "quarantine", "reject")
#: RFC 7489 §6.4: ``dmarc-percent = "pct" *WSP "=" *WSP 1*3DIGIT``.
_PCT = re.compile(r"[0-9]{1,3}\Z")


@dataclass(frozen=True, slots=True)
class DmarcRecord:
    """The parts of a DMARC record (RFC 7489 §6.3) a receiver acts on."""

    p: str
    sp: str
    adkim: str = "r"
    aspf: str = "r"
    pct: int = 100
    #: RFC 9091 ``np=``, the policy for subdomains that do not exist; ""
    #: when absent (or invalid): ``sp`` applies to them as to the others.
    np: str = ""


@functools.lru_cache(maxsize=1024)
def parse_record(text: str) -> DmarcRecord:
    """Parse one ``v=DMARC1`` record; ValueError if it cannot be used.

    An invalid or missing ``p=`` (or invalid ``sp=``) makes the record
    ``p=none`` when it names a report address (``rua=``), else unusable
    (RFC 7489 §6.6.3 step 6).  Bad ``adkim``/``aspf``/``pct``/``np`` values fall
    back to their defaults (§6.3: syntax errors in the rest of the record
    are discarded for default values); unknown tags are ignored.
    """
    tags: dict[str, str] = {}
    for part in text.split(";"):
        key, eq, value = part.partition("=")
        if eq:
            tags.setdefault(key.strip().lower(), value.strip())
    p = tags.get("p", "").lower()
    sp = tags.get("sp", p).lower()
    if p not in _POLICIES or sp not in _POLICIES:
        if not tags.get("rua", "").strip():
            raise ValueError(f"no valid p= (or sp=) in {text!r}")
        p = sp = "none"
    adkim = tags.get("adkim", "r").lower()
    aspf = tags.get("aspf", "r").lower()
    np = tags.get("np", "").lower()
    pct_text = tags.get("pct", "100")
    # str.isdigit() and int() take digits of every script ("٥٠" is 50, "¹"
    # raises): the grammar's DIGIT is ASCII only.
    pct = int(pct_text) if _PCT.match(pct_text) and int(pct_text) <= 100 else 100
    return DmarcRecord(
        p, sp, adkim if adkim in ("r", "s") else "r", aspf if aspf in ("r", "s") else "r", pct,
        np if np in _POLICIES else "",
    )


@dataclass(frozen=True, slots=True)
class Discovery:
    """The outcome of policy discovery (RFC 7489 §6.6.3).

    :param status: ``found``, ``none``, ``temperror`` or ``permerror``.
    :param at: the domain whose ``_dmarc`` record was used.
    :param exists: whether the author domain exists (RFC 9091 §2.1), asked
        only when it decides the policy: the record was found at the
        organisational domain and its ``np=`` differs from ``sp=``.  True
        when not asked, None when the DNS could not say.
    """

    status: str
    record: DmarcRecord | None = None
    at: str = ""
    error: str = ""
    exists: bool | None = True


def _places(domain: str) -> tuple[str, ...]:
    """Where the record of author domain ``domain`` may be: its own
    ``_dmarc`` name, else its organisational domain's."""
    org = organizational_domain(domain)
    return (domain, org) if org != domain else (domain,)


def _found_at(at: str, answer: Answer) -> Discovery | None:
    """What the TXT answer for ``_dmarc.{at}`` settles; None if it holds no
    DMARC record (look further)."""
    if answer.temporary:
        return Discovery("temperror", at=at, error=f"_dmarc.{at}: {answer.error or 'DNS error'}")
    records = [r for r in answer.records if _VERSION.match(r)]
    if len(records) > 1:
        # §6.6.3 step 5: discovery ends here and "DMARC processing is not
        # applied" -- no policy at all, not the organisational domain's.
        return Discovery("none", at=at, error=f"_dmarc.{at}: {len(records)} DMARC records, no policy applied")
    if records:
        try:
            return Discovery("found", parse_record(records[0]), at)
        except ValueError as exc:
            return Discovery("permerror", at=at, error=f"_dmarc.{at}: {exc}")
    return None


def _needs_existence(domain: str, found: Discovery) -> bool:
    """Whether the policy for ``domain`` depends on its existence: its
    record is its organisational domain's, with an ``np=`` unlike ``sp=``
    (RFC 9091 §4.1: np is for non-existent subdomains, never the domain
    that published it)."""
    record = found.record
    return record is not None and found.at != domain and record.np not in ("", record.sp)


#: RFC 9091 §2.1: what tells whether a domain exists for DMARC.
_EXISTENCE_TYPES = ("A", "AAAA", "MX")


def _existence(answers: Sequence[Answer]) -> bool | None:
    """RFC 9091 §2.1: a domain is non-existent when A, AAAA and MX all get
    NXDOMAIN or NODATA (a name with only a TXT record does not exist for
    DMARC); None when one failed and none had records."""
    if any(answer.ok for answer in answers):
        return True
    return None if any(answer.temporary for answer in answers) else False


async def find_record(resolver: Resolver, domain: str) -> Discovery:
    """The DMARC record for author domain ``domain``: its own, else its
    organisational domain's, with whether ``domain`` exists when the
    record's ``np=`` makes that matter.  Answers come from the shared
    resolver, so a record is asked for once per TTL, not once per message."""
    for at in _places(domain):
        found = _found_at(at, await resolver.txt(f"_dmarc.{at}"))
        if found is not None:
            if _needs_existence(domain, found):
                answers = await resolver.query_all([(domain, rdtype) for rdtype in _EXISTENCE_TYPES])
                found = replace(found, exists=_existence(answers))
            return found
    return Discovery("none")


def cached_record(resolver: Resolver, domain: str) -> Discovery | None:
    """:func:`find_record` from the resolver's cache alone; None if an
    answer it needs is not cached."""
    return _cached_record(resolver, domain)[0]


def _cached_record(resolver: Resolver, domain: str) -> tuple[Discovery | None, int]:
    """:func:`cached_record`, and the seconds the answers it used stay valid."""
    ttl = MAX_TTL
    for at in _places(domain):
        answer = resolver.cached(f"_dmarc.{at}", "TXT")
        if answer is None:
            return None, 0
        ttl = min(ttl, answer.ttl)
        found = _found_at(at, answer)
        if found is None:
            continue
        if _needs_existence(domain, found):
            answers = [resolver.cached(domain, rdtype) for rdtype in _EXISTENCE_TYPES]
            if any(a is None for a in answers):
                return None, 0
            known = [a for a in answers if a is not None]
            ttl = min(ttl, *(a.ttl for a in known))
            found = replace(found, exists=_existence(known))
        return found, ttl
    return Discovery("none"), ttl


# ------------------------------------------------------------ evaluation


@dataclass(frozen=True, slots=True)
class DmarcResult:
    """What DMARC concluded for one message.

    :param result: the RFC 8601 ``dmarc=`` result: ``pass``, ``fail``,
        ``none``, ``temperror`` or ``permerror``.
    :param finding: what the policy's ``actions`` see (:data:`FINDINGS`).
    :param policy: the requested policy that applied (``p``, ``sp``, or
        ``np`` for a subdomain that does not exist).
    :param disposition: the policy after ``pct`` sampling.
    :param authors: of how many checks this is the strictest: one per
        From domain, and one for From fields that gave none
        (:func:`strictest`).
    """

    result: str
    finding: str
    domain: str = ""
    record: DmarcRecord | None = None
    policy: str = ""
    disposition: str = ""
    reason: str = ""
    authors: int = 1


def evaluate(
    author: ar.Author,
    discovery: Discovery,
    spf_result: spf.SpfResult | None,
    dkim_results: Sequence[dkim.DkimResult],
    *,
    sample: float = 0.0,
    honour_pct: bool = True,
) -> DmarcResult:
    """The DMARC result of one message (pure: everything looked up before).

    :param spf_result: the SPF result of the MAIL FROM identity (HELO for
        ``<>``), None if SPF was not checked.
    :param sample: a number in [0, 1): the message is in the ``pct`` sample
        when ``sample * 100 < pct``.
    """
    domain = author.domain
    if not domain:
        return DmarcResult("permerror", "bad_from", reason=author.problem)
    if discovery.status != "found" or discovery.record is None:
        return DmarcResult(discovery.status, discovery.status, domain, reason=discovery.error)
    record = discovery.record
    policy = record.p if discovery.at == domain else record.sp
    absent = discovery.at != domain and record.np != "" and discovery.exists is False
    if absent:
        policy = record.np  # RFC 9091 §4.1
    spf_aligned = spf_result is not None and aligned(spf_result.domain, domain, record.aspf)
    dkim_aligned = [r for r in dkim_results if aligned(r.domain, domain, record.adkim)]
    if (spf_aligned and spf_result is not None and spf_result.result == "pass") or any(
        r.result == "pass" for r in dkim_aligned
    ):
        return DmarcResult("pass", "pass", domain, record, policy, "none")
    if (spf_aligned and spf_result is not None and spf_result.result == "temperror") or any(
        r.result == "temperror" for r in dkim_aligned
    ):
        return DmarcResult("temperror", "temperror", domain, record, policy, reason="aligned identifier not verified: DNS error")
    if discovery.exists is None:
        # np= or sp= depends on an answer the DNS did not give.
        return DmarcResult("temperror", "temperror", domain, record, policy, reason="existence of the From domain not known: DNS error")
    disposition = policy
    reasons = ["From domain does not exist"] if absent else []
    if honour_pct and record.pct < 100 and sample * 100 >= record.pct:
        disposition = {"reject": "quarantine", "quarantine": "none"}.get(policy, policy)
        reasons.append(f"outside pct={record.pct} sample")
    finding = {"reject": "reject", "quarantine": "quarantine"}.get(disposition, "fail")
    return DmarcResult("fail", finding, domain, record, policy, disposition, ", ".join(reasons))


#: Which result decides for a message with several From domains, the
#: first listed first: a failure by the policy it applies (reject,
#: quarantine), then a From field that gave no domain, then a DNS error (a
#: retry might fail), then the rest; ``pass`` only if every domain passed.
_SEVERITY = ("many_authors", "reject", "quarantine", "bad_from", "temperror", "fail", "permerror", "none", "pass")


def strictest(results: Sequence[DmarcResult]) -> DmarcResult:
    """The result that decides for a message with several From domains
    (RFC 7489 §6.6.1: the strictest policy among the checks that fail), by
    :data:`_SEVERITY`; the first of equals.  ``authors`` counts them."""
    worst = min(results, key=lambda r: _SEVERITY.index(r.finding))
    return worst if len(results) == 1 else replace(worst, authors=len(results))


def evaluate_all(
    authors: ar.Authors,
    discoveries: Sequence[Discovery],
    spf_result: spf.SpfResult | None,
    dkim_results: Sequence[dkim.DkimResult],
    *,
    sample: float = 0.0,
    honour_pct: bool = True,
) -> DmarcResult:
    """The DMARC result of a message: :func:`evaluate` for each From domain
    (``discoveries`` in the order of ``authors.domains``; one ``sample``
    for the message), the :func:`strictest` deciding.  A From field that
    gave no domain (``authors.problem``) counts as ``bad_from``; without
    any domain that is the result.  Over :data:`MAX_AUTHOR_DOMAINS` From
    domains the result is ``many_authors``, whatever ``discoveries`` holds."""
    if len(authors.domains) > MAX_AUTHOR_DOMAINS:
        return DmarcResult("permerror", "many_authors", reason=_too_many(authors))
    results = [
        evaluate(ar.Author(domain), found, spf_result, dkim_results, sample=sample, honour_pct=honour_pct)
        for domain, found in zip(authors.domains, discoveries, strict=True)
    ]
    if authors.problem or not results:
        results.append(DmarcResult("permerror", "bad_from", reason=authors.problem or "no From address"))
    return strictest(results)


def _checked(authors: ar.Authors) -> tuple[str, ...]:
    """The From domains whose records are looked up: all, or none at all."""
    return authors.domains if len(authors.domains) <= MAX_AUTHOR_DOMAINS else ()


def _too_many(authors: ar.Authors) -> str:
    return f"{len(authors.domains)} From domains, at most {MAX_AUTHOR_DOMAINS} are checked"


def _replies(result: DmarcResult) -> tuple[Reply, Reply | None]:
    """(reply if refused, temporary reply if deferred); made once per
    distinct result, as most are never sent."""
    return _REPLIES(result)


def _make_replies(result: DmarcResult) -> tuple[Reply, Reply | None]:
    domain = result.domain or "sender"
    if result.finding in ("bad_from", "many_authors"):
        return DMARC_BAD_FROM.format(problem=ar.comment(result.reason)), None
    if result.finding in ("reject", "quarantine", "fail", "temperror"):
        return DMARC_REJECT.format(domain=domain), DMARC_TEMPERROR.format(domain=domain)
    return DMARC_REJECTED.format(finding=result.finding, domain=domain), None


_REPLIES = ar.Memo(_make_replies, lambda r: len(r.domain) + len(r.reason))


def ar_result(result: DmarcResult) -> Any:
    """The ``dmarc=`` clause (RFC 7489 §11.2): ``header.from`` and, in a
    comment, the published policies and the disposition applied."""
    notes = []
    if result.record is not None:
        notes.append(f"p={result.record.p} sp={result.record.sp}" + (f" np={result.record.np}" if result.record.np else ""))
        if result.disposition:
            notes.append(f"dis={result.disposition}")
    if result.reason:
        notes.append(result.reason)
    if result.authors > 1:
        notes.append(f"strictest of {result.authors} From checks")
    props = [ar.property_("header", "from", result.domain)] if result.domain else []
    return ar.clause("dmarc", result.result, " ".join(notes), props)


_AR_TEXTS = ar.Memo(ar.clause_text(ar_result), lambda r: len(r.domain) + len(r.reason))


# ------------------------------------------------------------ plugin


class DmarcPlugin(Plugin):
    """Applies the author domain's DMARC policy at end of DATA and writes
    the Authentication-Results header."""

    @dataclass(frozen=True)
    class Options(ActionOptions):
        DEFAULT_ACTIONS = DEFAULT_ACTIONS

        #: apply pct= sampling (RFC 7489 §6.6.4); false treats every record as pct=100.
        honour_pct: bool = True

        def check(self) -> dict[str, str]:
            return check_actions(self.actions, FINDINGS, ("temperror",))

    def __init__(self, options: Any, context: Context, name: str = "") -> None:
        super().__init__(options, context, name)
        _psl()  # parsed at start-up, not by the first message
        resolver = context.resolver
        #: Each author domain's discovery, kept while its answers are valid.
        self._records = resolver.memo() if resolver is not None else TtlMemo(time.monotonic, 0)

    def _cached_record(self, domain: str) -> Discovery | None:
        """:func:`cached_record`, judged once while the answers hold."""
        known: Discovery | None = self._records.get(domain)
        if known is None:
            known, ttl = _cached_record(self.context.resolver, domain)
            if known is not None:
                self._records.put(domain, known, ttl)
        return known

    @hookimpl
    def data(
        self, session: Session, envelope: Envelope, message: Message
    ) -> Verdict | None | Coroutine[Any, Any, Verdict | None]:
        if session.trusted:
            return None
        authors = ar.authors_of(message)
        resolver = self.context.resolver
        # The DKIM verification is shared with the dkim plugin: done already,
        # or a task that goes on while we wait for the rest.
        verified = dkim.dkim_results(message, resolver)
        stored = spf.stored_outcome(session, envelope)  # the spf plugin's, if it ran
        discoveries = [self._cached_record(domain) for domain in _checked(authors)]
        cached = [d for d in discoveries if d is not None]
        if isinstance(verified, tuple) and stored is not None and len(cached) == len(discoveries):
            return self._decided(authors, cached, stored, verified)  # a plain answer: no task
        return self._waited(session, envelope, authors, verified, stored, discoveries)

    async def _waited(
        self,
        session: Session,
        envelope: Envelope,
        authors: ar.Authors,
        verified: tuple[dkim.DkimResult, ...] | asyncio.Future[tuple[dkim.DkimResult, ...]],
        stored: spf.SpfOutcome | None,
        discoveries: list[Discovery | None],
    ) -> Verdict | None:
        try:
            if stored is None:
                outcome, found = await asyncio.gather(
                    spf.check_envelope(self.context.resolver, session, envelope), self._discover(_checked(authors), discoveries)
                )
            else:
                outcome = stored
                found = await self._discover(_checked(authors), discoveries)
        except BaseException:
            if not isinstance(verified, tuple):
                verified.cancel()  # our wait only; the shared verification goes on
            raise
        results = verified if isinstance(verified, tuple) else await verified
        return self._decided(authors, found, outcome, results)

    def _decided(
        self,
        authors: ar.Authors,
        discoveries: Sequence[Discovery],
        outcome: spf.SpfOutcome,
        dkim_results: tuple[dkim.DkimResult, ...],
    ) -> Verdict | None:
        result = evaluate_all(
            authors, discoveries, outcome.identity, dkim_results,
            sample=random.random(), honour_pct=self.options.honour_pct,
        )
        clauses = [*spf.ar_texts(outcome), *dkim.ar_texts(dkim_results), _AR_TEXTS(result)]
        header = ar.authentication_results(self.context.hostname, clauses)
        reject, defer = _replies(result)
        label = f"dmarc={result.finding}" + (f" {result.domain}" if result.domain else "")
        return decide(result.finding, self.options.actions, reject=reject, defer=defer, headers=(header,), result=label)

    async def _discover(self, domains: Sequence[str], discoveries: list[Discovery | None]) -> list[Discovery]:
        """``discoveries`` with the records the cache did not have looked
        up: :data:`MAX_LOOKUPS` at a time, so a From stuffed with domains
        costs time (bounded by the hook timeout), not a flood of queries."""
        resolver = self.context.resolver
        missing = [domain for domain, d in zip(domains, discoveries, strict=True) if d is None]
        looked_up: list[Discovery] = []
        for start in range(0, len(missing), MAX_LOOKUPS):
            batch = missing[start : start + MAX_LOOKUPS]
            if len(batch) == 1:  # the usual case: no task
                looked_up.append(await find_record(resolver, batch[0]))
            else:
                looked_up += await asyncio.gather(*(find_record(resolver, domain) for domain in batch))
        answers = iter(looked_up)
        return [d if d is not None else next(answers) for d in discoveries]
