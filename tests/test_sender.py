"""plugins.sender: the pure checks, then the hook with a real Resolver
against the loopback DNS server (tests/zones/mail.test.zone)."""

from __future__ import annotations

import asyncio
import ipaddress

import pytest

from gateway import Action, Context, Envelope, Session
from gateway.address import NULL, Address, parse_path
from gateway.config import GatewaySettings, Policy, PolicyError
from gateway.dns import Answer, Resolver, Status
from gateway.pipeline import run_stage
from gateway.plugins import load_plugins
from plugins import sender as sender_module
from plugins.sender import (
    DEFAULT_ACTIONS,
    FINDINGS,
    Finding,
    SenderPlugin,
    check_sender,
    domain_finding,
    is_null_mx,
    lookup_domain,
    syntax_finding,
)
from tests.fixtures.dnsserver import DNSServer
from tests.fixtures.hooks import settle

SETTINGS = GatewaySettings(hostname="gw.test.example", trusted_networks=("198.51.100.0/24",))
OUTSIDE = "203.0.113.7"
INSIDE = "198.51.100.7"


@pytest.fixture
def resolver(dns: DNSServer) -> Resolver:
    return Resolver([dns.nameserver], timeout=5.0)


def sender(path: str) -> Address:
    return parse_path(f"FROM:{path}", "FROM")[0]


def session(ip: str = OUTSIDE) -> Session:
    address = ipaddress.ip_address(ip)
    return Session(client_ip=address, trusted=Context(SETTINGS).is_trusted(address))


def plugin(resolver: Resolver | None, **kw: object) -> SenderPlugin:
    return SenderPlugin(SenderPlugin.Options(**kw), Context(SETTINGS, resolver), "sender")  # type: ignore[arg-type]


def mx(*records: str) -> Answer:
    return Answer(Status.RECORDS, records)


# ------------------------------------------------------------------ pure


@pytest.mark.parametrize("path, expected", [
    ("<>", None),
    ("<bob@example.org>", None),
    ("<bob@localhost>", Finding.NOT_FQDN),
    ("<bob@[192.0.2.1]>", Finding.ADDRESS_LITERAL),
    ("<bob@[IPv6:2001:db8::1]>", Finding.ADDRESS_LITERAL),
])
def test_syntax_finding(path: str, expected: Finding | None) -> None:
    assert syntax_finding(sender(path)) == expected


@pytest.mark.parametrize("domain, expected", [
    ("stra\u00dfe.mail.test", None),  # a U-label (IDNA2008)
    ("Stra\u00dfe.MAIL.test", None),  # ASCII letters in any case, as DNS takes them
    ("xn--strae-oqa.mail.test", None),
    ("b\u00fccher", Finding.NOT_FQDN),  # a U-label, but one label
    # Dots other than "." (U+3002 IDEOGRAPHIC FULL STOP, U+FF0E FULLWIDTH
    # FULL STOP, U+FF61): IDNA2003 and UTS #46 map them to ".", but in SMTP
    # only "." separates labels (RFC 5321 §4.1.2, RFC 6531 §3.3), and in
    # a label they are DISALLOWED (RFC 5892): no domain, not one unqualified.
    ("good\u3002mail\u3002test", Finding.INVALID_DOMAIN),
    ("good\uff0email\uff0etest", Finding.INVALID_DOMAIN),
    ("good\uff61mail.test", Finding.INVALID_DOMAIN),
    # other code points UTS #46 would map, or that IDNA2008 disallows
    ("\uff47ood.mail.test", Finding.INVALID_DOMAIN),  # fullwidth g
    ("x\u2603.mail.test", Finding.INVALID_DOMAIN),  # a snowman
    # What the DNS and IDNA2008 lookups read as a U-label: case and NFC.
    ("B\u00dcCHER.mail.test", None),  # a capital Ü is bücher
    ("bu\u0308cher.mail.test", None),  # u + combining diaeresis (NFD)
])
def test_an_internationalised_domain_must_be_u_labels(domain: str, expected: Finding | None) -> None:
    address = parse_path(f"FROM:<bob@{domain}>", "FROM", utf8=True)[0]
    assert syntax_finding(address) == expected


async def test_an_invalid_domain_is_refused_as_bad_syntax_unasked(resolver: Resolver, dns: DNSServer) -> None:
    address = parse_path("FROM:<bob@good\u3002mail\u3002test>", "FROM", utf8=True)[0]
    verdict = await settle(check_sender(address, resolver))
    assert verdict.action is Action.REJECT and verdict.result == "sender=invalid_domain"
    assert str(verdict.reply) == "501 5.1.7 <bob@good\u3002mail\u3002test>: Sender address rejected: Invalid domain name"
    assert dns.query_count("good.mail.test", "MX") == 0


@pytest.mark.parametrize("answer, expected", [
    (mx("0 ."), True),
    (mx("10 ."), True),
    (mx("0 .", "10 mx.example.org."), False),
    (mx("10 mx.example.org."), False),
    (Answer(Status.NODATA), False),
])
def test_is_null_mx(answer: Answer, expected: bool) -> None:
    assert is_null_mx(answer) is expected


A = Answer(Status.RECORDS, ("192.0.2.1",))
NX = Answer(Status.NXDOMAIN)
NODATA = Answer(Status.NODATA)
TEMP = Answer(Status.TEMPFAIL)


@pytest.mark.parametrize("mx_answer, addresses, expected", [
    (mx("10 mx.example.org."), None, None),
    (mx("0 ."), A, Finding.NULL_MX),
    (NX, None, Finding.NOT_FOUND),
    (NX, TEMP, Finding.NOT_FOUND),  # NXDOMAIN is NXDOMAIN for every type
    (TEMP, A, Finding.TEMPFAIL),  # could be a null MX
    (TEMP, None, Finding.TEMPFAIL),
    (NODATA, A, None),  # implicit MX
    (NODATA, NODATA, Finding.NOT_FOUND),
    (NODATA, NX, Finding.NOT_FOUND),
    (NODATA, TEMP, Finding.TEMPFAIL),
    (NODATA, None, Finding.TEMPFAIL),
])
def test_domain_finding(mx_answer: Answer, addresses: Answer | None, expected: Finding | None) -> None:
    assert domain_finding(mx_answer, addresses) == expected


@pytest.mark.parametrize("reply", [v for k, v in vars(sender_module).items() if k.isupper() and hasattr(v, "enhanced")])
def test_reply_constants_have_matching_classes(reply: object) -> None:
    assert reply.code // 100 == int(reply.enhanced[0])  # type: ignore[attr-defined]


# ------------------------------------------------------------ with DNS


@pytest.mark.parametrize("domain", [
    "good.mail.test",  # MX
    "GOOD.MAIL.TEST",
    "aonly.mail.test",  # no MX, an A record
    "v6only.mail.test",  # no MX, an AAAA record
    "mixed.mail.test",  # a null MX next to a real one
    "badmx.mail.test",  # an MX whose host does not exist
])
async def test_domains_that_receive_mail(resolver: Resolver, domain: str) -> None:
    verdict = await settle(check_sender(sender(f"<bob@{domain}>"), resolver))
    assert verdict is not None
    assert (verdict.action, verdict.result) == (Action.CONTINUE, "sender=ok")


@pytest.mark.parametrize("path, reply", [
    ("<bob@missing.mail.test>", "550 5.1.8 <bob@missing.mail.test>: Sender address rejected: Domain not found"),
    ("<bob@nodata.mail.test>", "550 5.1.8 <bob@nodata.mail.test>: Sender address rejected: Domain not found"),
    ("<bob@nullmx.mail.test>", "550 5.7.27 <bob@nullmx.mail.test>: Sender address rejected: Domain does not accept mail (null MX)"),
    ("<bob@localhost>", "504 5.5.2 <bob@localhost>: Sender address rejected: need fully-qualified address"),
    ("<@relay.example:Bob@Missing.mail.test>", "550 5.1.8 <Bob@Missing.mail.test>: Sender address rejected: Domain not found"),
])
async def test_refused_senders(resolver: Resolver, path: str, reply: str) -> None:
    verdict = await settle(plugin(resolver).mail(session(), Envelope(sender(path))))
    assert verdict is not None and verdict.action is Action.REJECT
    assert str(verdict.reply) == reply


@pytest.mark.parametrize("fault", ["servfail", "timeout"])
async def test_dns_trouble_defers(dns: DNSServer, fault: str) -> None:
    getattr(dns, fault)(f"{fault}.mail.test")
    verdict = await settle(plugin(Resolver([dns.nameserver], timeout=0.5)).mail(session(), Envelope(sender(f"<bob@{fault}.mail.test>"))))
    assert verdict is not None and verdict.action is Action.DEFER
    assert str(verdict.reply) == f"450 4.1.8 <bob@{fault}.mail.test>: Sender address rejected: Domain not found"
    assert verdict.result == "sender=tempfail"


async def test_null_sender_is_accepted_without_dns(resolver: Resolver, dns: DNSServer) -> None:
    assert await settle(plugin(resolver).mail(session(), Envelope(NULL))) is None
    assert dns.total_queries == 0


async def test_address_literal_only_informs(resolver: Resolver, dns: DNSServer) -> None:
    verdict = await settle(check_sender(sender("<bob@[192.0.2.1]>"), resolver))
    assert verdict is not None
    assert (verdict.action, verdict.result) == (Action.CONTINUE, "sender=address_literal")
    assert dns.total_queries == 0


async def test_trusted_clients_skip_the_checks(resolver: Resolver, dns: DNSServer) -> None:
    for path in ("<bob@missing.mail.test>", "<root@localhost>"):
        verdict = await settle(plugin(resolver).mail(session(INSIDE), Envelope(sender(path))))
        assert verdict is not None
        assert (verdict.action, verdict.result) == (Action.CONTINUE, "sender=trusted")
    assert dns.total_queries == 0


async def test_not_fqdn_asks_nothing(resolver: Resolver, dns: DNSServer) -> None:
    await settle(check_sender(sender("<bob@localhost>"), resolver))
    assert dns.total_queries == 0


async def test_mx_and_addresses_are_asked_at_once(dns: DNSServer) -> None:
    # The MX question is never answered: asked one after the other, the
    # address question would not be sent before the lookup gives up.
    dns.timeout("aonly.mail.test")
    resolver = Resolver([dns.nameserver], timeout=0.5)
    lookup = asyncio.ensure_future(lookup_domain(resolver, "aonly.mail.test"))
    while not lookup.done() and not (dns.query_count("aonly.mail.test", "MX") and dns.query_count("aonly.mail.test", "A")):
        await asyncio.sleep(0.01)
    assert not lookup.done()
    assert await lookup is Finding.TEMPFAIL
    assert dns.query_count("aonly.mail.test", "MX") >= 1
    assert dns.query_count("aonly.mail.test", "A") >= 1


async def test_a_cached_mx_answers_at_once_and_costs_no_address_query(dns: DNSServer) -> None:
    resolver = Resolver([dns.nameserver], timeout=2.0)
    await resolver.mx("good.mail.test")
    dns.timeout("good.mail.test")
    # Answered from the cache without waiting: the coroutine ends on its first step.
    with pytest.raises(StopIteration) as ended:
        lookup_domain(resolver, "good.mail.test").send(None)
    assert ended.value.value is None
    # The plugin's hook then answers plainly: nothing for the gateway to await.
    assert plugin(resolver).mail(session(), Envelope(sender("<bob@good.mail.test>"))).result == "sender=ok"  # type: ignore[union-attr]
    await asyncio.sleep(0.4)
    assert dns.query_count("good.mail.test", "A") == 0


async def test_cancelled_address_queries_still_fill_the_cache(dns: DNSServer) -> None:
    resolver = Resolver([dns.nameserver], timeout=2.0)
    assert await lookup_domain(resolver, "good.mail.test") is None
    # Only our wait for A/AAAA was dropped once the MX answered; the
    # resolver's shielded queries complete for the next asker.
    await asyncio.sleep(0.2)
    sent = resolver.stats.sent
    assert sent == 3  # MX, A, AAAA
    assert (await resolver.a_aaaa("good.mail.test")).ok
    assert resolver.stats.sent == sent


async def test_nxdomain_is_cached_for_the_next_sender(resolver: Resolver, dns: DNSServer) -> None:
    for _ in range(3):
        verdict = await settle(check_sender(sender("<bob@missing.mail.test>"), resolver))
        assert verdict is not None and verdict.action is Action.REJECT
    assert dns.query_count("missing.mail.test", "MX") == 1


# --------------------------------------------------------------- options


def test_default_actions_cover_every_finding() -> None:
    assert set(DEFAULT_ACTIONS) == set(FINDINGS)
    assert SenderPlugin.Options().actions == DEFAULT_ACTIONS


async def test_actions_change_the_outcome(resolver: Resolver) -> None:
    p = plugin(resolver, actions={"not_found": 4.0, "null_mx": "defer", "address_literal": "reject"})
    verdict = await settle(p.mail(session(), Envelope(sender("<bob@missing.mail.test>"))))
    assert verdict is not None
    assert (verdict.action, verdict.score, verdict.result) == (Action.CONTINUE, 4.0, "sender=not_found")
    verdict = await settle(p.mail(session(), Envelope(sender("<bob@nullmx.mail.test>"))))
    assert verdict is not None
    assert str(verdict.reply) == "451 4.7.27 <bob@nullmx.mail.test>: Sender address rejected: Domain does not accept mail (null MX)"
    verdict = await settle(p.mail(session(), Envelope(sender("<bob@[192.0.2.1]>"))))
    assert verdict is not None
    assert str(verdict.reply) == "550 5.7.1 <bob@[192.0.2.1]>: Sender address rejected: Address literal not accepted"


async def test_not_found_deferred_gets_the_450(resolver: Resolver) -> None:
    verdict = await settle(plugin(resolver, actions={"not_found": "defer"}).mail(
        session(), Envelope(sender("<bob@missing.mail.test>"))
    ))
    assert verdict is not None
    assert str(verdict.reply) == "450 4.1.8 <bob@missing.mail.test>: Sender address rejected: Domain not found"


def test_policy_problems_name_the_key() -> None:
    table = {"actions": {"tempfail": "reject", "nonsense": "reject", "not_found": "drop", "null_mx": True}}
    with pytest.raises(PolicyError) as info:
        load_plugins(Policy("policy.toml", SETTINGS, plugins={"sender": table}))
    assert [p.key for p in info.value.problems] == ["plugins.sender.actions.null_mx"]  # type error first
    del table["actions"]["null_mx"]
    with pytest.raises(PolicyError) as info:
        load_plugins(Policy("policy.toml", SETTINGS, plugins={"sender": table}))
    assert sorted(p.key for p in info.value.problems) == [
        "plugins.sender.actions.nonsense",
        "plugins.sender.actions.not_found",
        "plugins.sender.actions.tempfail",
    ]


async def test_through_the_real_stage(dns: DNSServer) -> None:
    policy = Policy("policy.toml", SETTINGS, plugins={"sender": {}})
    registry = load_plugins(policy, Context(SETTINGS, Resolver([dns.nameserver], timeout=0.5)))
    kwargs = {"session": session(), "envelope": Envelope(sender("<bob@nullmx.mail.test>"))}
    verdict = await run_stage(registry.calls["mail"], kwargs, 2.0, "test")
    assert (verdict.action, verdict.plugin, verdict.result) == (Action.REJECT, "sender", "sender=null_mx")
    assert verdict.reply is not None and verdict.reply.enhanced == "5.7.27"
