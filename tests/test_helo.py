"""plugins.helo: the pure checks, then the hook with a real Resolver against
the loopback DNS server (tests/zones/mail.test.zone, reverse zones added
here at runtime)."""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import ipaddress
from collections.abc import Mapping

import pytest

from gateway import Action, Context, Session, Verdict
from gateway.actions import ActionSpec
from gateway.config import GatewaySettings, Policy, PolicyError
from gateway.dns import Answer, Resolver, Status, reverse_name
from gateway.pipeline import run_stage
from gateway.plugins import load_plugins
from plugins import helo as helo_module
from plugins.helo import (
    DEFAULT_ACTIONS,
    FINDINGS,
    Fcrdns,
    Finding,
    HeloPlugin,
    HeloState,
    check_fcrdns,
    check_helo,
    classify,
    host_finding,
    parse_literal,
    valid_hostname,
)
from tests.fixtures.clock import FakeClock
from tests.fixtures.dnsserver import DNSServer
from tests.fixtures.hooks import settle

SETTINGS = GatewaySettings(
    hostname="gw.test.example",
    listen="192.0.2.200:25",
    trusted_networks=("198.51.100.0/24",),
)
OUTSIDE = ipaddress.ip_address("203.0.113.7")
INSIDE = ipaddress.ip_address("198.51.100.7")
OWN_NAMES = frozenset({"gw.test.example", "mx.example.com"})
OWN_NETWORKS = (ipaddress.ip_network("192.0.2.200/32"), ipaddress.ip_network("2001:db8:ff::/64"))

# PTR records for the FCrDNS tests, served as runtime zones.
REVERSE_V4_ORIGIN = "113.0.203.in-addr.arpa."
REVERSE_V4 = (
    "7 IN PTR fcrdns.mail.test.\n"
    "8 IN PTR liar.mail.test.\n"  # liar.mail.test is 192.0.2.99
    "10 IN PTR nowhere.mail.test.\n"  # NXDOMAIN forward
    "12 IN PTR liar.mail.test.\n"
    "12 IN PTR multi.mail.test.\n"  # one of two names confirms
    "14 IN PTR fwdfail.mail.test.\n"  # forward lookup made to SERVFAIL
)
# 203.0.113.9 has no PTR (NXDOMAIN in the zone); 203.0.113.13's PTR is made to SERVFAIL.
REVERSE_V6_ORIGIN = "8.b.d.0.1.0.0.2.ip6.arpa."


def add_reverse_zones(dns: DNSServer) -> None:
    """PTR records for 203.0.113.0/24 and 2001:db8::7, as runtime zones."""
    dns.add_zone(REVERSE_V4_ORIGIN, REVERSE_V4)
    v6 = reverse_name("2001:db8::7").removesuffix("." + REVERSE_V6_ORIGIN.rstrip("."))
    dns.add_zone(REVERSE_V6_ORIGIN, f"{v6} IN PTR fcrdns6.mail.test.\n")


@pytest.fixture
def resolver(dns: DNSServer) -> Resolver:
    return Resolver([dns.nameserver], timeout=5.0)


@pytest.fixture
def reverse(dns: DNSServer) -> DNSServer:
    add_reverse_zones(dns)
    dns.servfail(reverse_name("203.0.113.13"))
    dns.servfail("fwdfail.mail.test")
    return dns


def options(**kw: object) -> HeloPlugin.Options:
    return HeloPlugin.Options(**kw)  # type: ignore[arg-type]


def plugin(resolver: Resolver | None = None, **kw: object) -> HeloPlugin:
    return HeloPlugin(options(**kw), Context(SETTINGS, resolver), "helo")


def session(ip: ipaddress.IPv4Address | ipaddress.IPv6Address = OUTSIDE) -> Session:
    return Session(client_ip=ip, trusted=Context(SETTINGS).is_trusted(ip))


# ------------------------------------------------------------------ syntax


@pytest.mark.parametrize("name", [
    "mail.example.org", "MX1.Example.ORG", "a.b", "host_name.example.org", "x-1.example.org",
    "a" * 63 + ".example.org", "123.example.org", "mailserver",
])
def test_valid_hostnames(name: str) -> None:
    assert valid_hostname(name)


@pytest.mark.parametrize("name", [
    "", ".example.org", "example.org.", "a..example.org", "-a.example.org", "a-.example.org",
    "a" * 64 + ".example.org", ("a" * 62 + ".") * 4 + "org", "exa mple.org", "ex@mple.org",
    "example.123", "1.2.3", "b\u00fccher.example", "<host.example>", "host.example:25",
])
def test_invalid_hostnames(name: str) -> None:
    assert not valid_hostname(name)


@pytest.mark.parametrize("text, address", [
    ("[192.0.2.1]", "192.0.2.1"),
    ("[IPv6:2001:db8::1]", "2001:db8::1"),
    ("[ipv6:2001:DB8::1]", "2001:db8::1"),
    ("[IPv6:::ffff:192.0.2.1]", "::ffff:192.0.2.1"),
])
def test_parse_literal(text: str, address: str) -> None:
    assert parse_literal(text) == ipaddress.ip_address(address)


@pytest.mark.parametrize("text", [
    "[]", "[192.0.2.300]", "[192.0.2]", "[01.2.3.4]", "[2001:db8::1]", "[IPv6:192.0.2.1]",
    "[IPv6:fe80::1%eth0]", "[x400:something]", "[192.0.2.1", "192.0.2.1]", "[ 192.0.2.1]",
])
def test_parse_literal_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        parse_literal(text)


@pytest.mark.parametrize("name, expected", [
    ("mail.example.org", None),
    ("[203.0.113.7]", None),  # the client's own address
    ("[IPv6:::ffff:203.0.113.7]", None),
    ("MAILSERVER", Finding.NOT_FQDN),
    ("host_name", Finding.NOT_FQDN),
    ("-bad-.example.org", Finding.INVALID),
    ("[192.0.2.300]", Finding.INVALID),
    ("[tag:content]", Finding.INVALID),
    ("example.org.", None),  # one trailing dot: the root, as Postfix takes it
    ("example.org..", Finding.INVALID),
    ("mailserver.", Finding.NOT_FQDN),
    ("localhost.", Finding.LOCALHOST),
    ("gw.test.example.", Finding.IMPERSONATION),
    (".", Finding.INVALID),
    ("1.2.3", Finding.INVALID),
    ("b\u00fccher.example", Finding.INVALID),
    ("203.0.113.7", Finding.BARE_IP),
    ("2001:db8::7", Finding.BARE_IP),
    ("localhost", Finding.LOCALHOST),
    ("LocalHost.LocalDomain", Finding.LOCALHOST),
    ("anything.localhost", Finding.LOCALHOST),
    ("[127.0.0.1]", Finding.LOCALHOST),
    ("[IPv6:::1]", Finding.LOCALHOST),
    ("127.0.0.2", Finding.LOCALHOST),
    ("gw.test.example", Finding.IMPERSONATION),
    ("GW.Test.Example", Finding.IMPERSONATION),
    ("mx.example.com", Finding.IMPERSONATION),
    ("[192.0.2.200]", Finding.IMPERSONATION),
    ("192.0.2.200", Finding.IMPERSONATION),
    ("[IPv6:2001:db8:ff::25]", Finding.IMPERSONATION),
    ("[192.0.2.1]", Finding.LITERAL_MISMATCH),
])
def test_classify(name: str, expected: Finding | None) -> None:
    assert classify(name, OUTSIDE, own_names=OWN_NAMES, own_networks=OWN_NETWORKS) == expected


def test_plugin_knows_its_own_names_and_listen_address() -> None:
    p = plugin(own_names=["Mail.Example.COM"], own_addresses=["198.18.0.0/15"])
    assert p.own_names == {"gw.test.example", "mail.example.com"}
    assert ipaddress.ip_network("192.0.2.200/32") in p.own_networks
    assert ipaddress.ip_network("198.18.0.0/15") in p.own_networks
    wildcard = HeloPlugin(options(), Context(dataclasses.replace(SETTINGS, listen="0.0.0.0:25")), "helo")
    assert wildcard.own_networks == ()


@pytest.mark.parametrize("answer, expected", [
    (Answer(Status.RECORDS, ("192.0.2.1",)), None),
    (Answer(Status.NXDOMAIN), Finding.NOT_FOUND),
    (Answer(Status.NODATA), Finding.NOT_FOUND),
    (Answer(Status.TEMPFAIL), Finding.TEMPFAIL),
])
def test_host_finding(answer: Answer, expected: Finding | None) -> None:
    assert host_finding(answer) == expected


# ----------------------------------------------------------------- replies


def judge(
    name: str, previous: HeloState | None = None, *, actions: Mapping[str, ActionSpec] = DEFAULT_ACTIONS
) -> tuple[Verdict, HeloState]:
    """check_helo without DNS, with the test's own names and addresses."""
    return asyncio.run(check_helo(
        name, OUTSIDE, previous, resolver=None, actions=actions, own_names=OWN_NAMES, own_networks=OWN_NETWORKS
    ))


@pytest.mark.parametrize("name, reply", [
    ("-bad-.example.org", "501 5.5.2 <-bad-.example.org>: Helo command rejected: Invalid name"),
    ("[192.0.2.300]", "501 5.5.2 <[192.0.2.300]>: Helo command rejected: Invalid name"),
    ("mailserver", "504 5.5.2 <mailserver>: Helo command rejected: need fully-qualified hostname"),
    ("mailserver.", "504 5.5.2 <mailserver.>: Helo command rejected: need fully-qualified hostname"),
    ("203.0.113.7", "550 5.7.1 <203.0.113.7>: Helo command rejected: Bare IP address, use an address literal in brackets"),
    ("localhost", "550 5.7.1 <localhost>: Helo command rejected: You are not localhost"),
    ("[127.0.0.1]", "550 5.7.1 <[127.0.0.1]>: Helo command rejected: You are not localhost"),
    ("gw.test.example", "550 5.7.1 <gw.test.example>: Helo command rejected: Host name or address is our own"),
    ("[192.0.2.200]", "550 5.7.1 <[192.0.2.200]>: Helo command rejected: Host name or address is our own"),
])
def test_refusals(name: str, reply: str) -> None:
    verdict, state = judge(name)
    assert verdict.action is Action.REJECT
    assert str(verdict.reply) == reply
    assert state.refusal == verdict


def test_good_name_and_own_literal_pass() -> None:
    for name in ("mail.example.org", "[203.0.113.7]"):
        verdict, state = judge(name)
        assert verdict.action is Action.CONTINUE and verdict.result == "helo=ok"
        assert state.refusal is None and state.findings == ()


def test_literal_mismatch_only_informs_by_default() -> None:
    verdict, state = judge("[192.0.2.1]")
    assert verdict.action is Action.CONTINUE
    assert verdict.result == "helo=literal_mismatch"
    assert state.findings == ("literal_mismatch",)


def test_literal_mismatch_can_be_refused() -> None:
    verdict, _ = judge("[192.0.2.1]", actions={**DEFAULT_ACTIONS, "literal_mismatch": "reject"})
    assert str(verdict.reply) == "550 5.7.1 <[192.0.2.1]>: Helo command rejected: Address literal is not your address"


def test_a_refusal_sticks_whatever_the_next_name() -> None:
    first, state = judge("mailserver")
    assert first.refuses
    for name in ("mail.example.org", "mailserver", "[203.0.113.7]"):
        again, state2 = judge(name, state)
        assert again.reply == first.reply
        assert again.action is Action.REJECT
        assert again.result == "helo=not_fqdn (repeated)"
        assert state2 is state


def test_an_accepted_helo_does_not_protect_a_later_bad_one() -> None:
    _, state = judge("mail.example.org")
    verdict, state = judge("localhost", state)
    assert verdict.refuses
    verdict, _ = judge("mail.example.org", state)
    assert str(verdict.reply) == "550 5.7.1 <localhost>: Helo command rejected: You are not localhost"


def test_every_helo_verdict_carries_its_score() -> None:
    # The gateway drops what the previous HELO contributed, so a repeated
    # HELO must bring its score again or the session loses it.
    actions = {**DEFAULT_ACTIONS, "not_fqdn": 2.5}
    first, state = judge("mailserver", actions=actions)
    assert (first.action, first.score, first.result) == (Action.CONTINUE, 2.5, "helo=not_fqdn")
    second, state = judge("mailserver", state, actions=actions)
    assert (second.score, second.result) == (2.5, "helo=not_fqdn")


def test_defer_action_uses_the_temporary_twin() -> None:
    verdict, _ = judge("mailserver", actions={**DEFAULT_ACTIONS, "not_fqdn": "defer"})
    assert str(verdict.reply) == "451 4.5.2 <mailserver>: Helo command rejected: need fully-qualified hostname"


@pytest.mark.parametrize("reply", [v for k, v in vars(helo_module).items() if k.isupper() and hasattr(v, "enhanced")])
def test_reply_constants_have_matching_classes(reply: object) -> None:
    assert reply.code // 100 == int(reply.enhanced[0])  # type: ignore[attr-defined]


# ----------------------------------------------------------------- options


def test_default_actions_cover_every_finding() -> None:
    assert set(DEFAULT_ACTIONS) == set(FINDINGS)
    assert options().actions == DEFAULT_ACTIONS


def test_actions_table_is_merged_over_the_defaults() -> None:
    opts = options(actions={"no_fcrdns": 3.0, "not_fqdn": "continue"})
    assert opts.actions["no_fcrdns"] == 3.0
    assert opts.actions["not_fqdn"] == "continue"
    assert opts.actions["invalid"] == "reject"


def test_policy_problems_name_the_key() -> None:
    table = {
        "actions": {"bogus": "reject", "tempfail": "reject", "invalid": "bounce"},
        "own_names": ["ok.example", "not a name"],
        "own_addresses": ["192.0.2.1", "nonsense"],
    }
    with pytest.raises(PolicyError) as info:
        load_plugins(Policy("policy.toml", SETTINGS, plugins={"helo": table}))
    assert sorted(p.key for p in info.value.problems) == [
        "plugins.helo.actions.bogus",
        "plugins.helo.actions.invalid",
        "plugins.helo.actions.tempfail",
        "plugins.helo.own_addresses[1]",
        "plugins.helo.own_names[1]",
    ]


def test_not_enabled_without_a_table() -> None:
    registry = load_plugins(Policy("policy.toml", SETTINGS))
    assert "helo" not in [p.name for p in registry.plugins]


# --------------------------------------------------------------- resolve


@pytest.mark.parametrize("name", ["good.mail.test", "GOOD.mail.test", "v6host.mail.test"])
async def test_resolve_accepts_names_with_an_address(resolver: Resolver, name: str) -> None:
    verdict = await settle(plugin(resolver, resolve=True).helo(session(), name))
    assert verdict.action is Action.CONTINUE
    assert verdict.result == "helo=ok"


@pytest.mark.parametrize("name", ["nohost.mail.test", "nodata.mail.test"])
async def test_resolve_refuses_unknown_names(resolver: Resolver, name: str) -> None:
    verdict = await settle(plugin(resolver, resolve=True).helo(session(), name))
    assert verdict.action is Action.REJECT
    assert str(verdict.reply) == f"550 5.7.1 <{name}>: Helo command rejected: Host not found"
    assert verdict.result == "helo=not_found"


@pytest.mark.parametrize("fault", ["servfail", "timeout"])
async def test_resolve_defers_on_dns_trouble(dns: DNSServer, fault: str) -> None:
    name = f"{fault}.mail.test"
    getattr(dns, fault)(name)
    verdict = await settle(plugin(Resolver([dns.nameserver], timeout=0.5), resolve=True).helo(session(), name))
    assert verdict.action is Action.DEFER
    assert str(verdict.reply) == f"450 4.7.1 <{name}>: Helo command rejected: Host not found"
    assert verdict.result == "helo=tempfail"


async def test_resolve_off_asks_nothing(resolver: Resolver, dns: DNSServer) -> None:
    verdict = await settle(plugin(resolver).helo(session(), "nohost.mail.test"))
    assert verdict.action is Action.CONTINUE
    assert dns.total_queries == 0


async def test_syntax_refusal_asks_nothing(resolver: Resolver, dns: DNSServer) -> None:
    verdict = await settle(plugin(resolver, resolve=True, fcrdns=True).helo(session(), "nohost"))
    assert verdict.action is Action.REJECT
    assert dns.total_queries == 0


async def test_literals_are_not_resolved(resolver: Resolver, dns: DNSServer) -> None:
    verdict = await settle(plugin(resolver, resolve=True).helo(session(), "[203.0.113.7]"))
    assert verdict.action is Action.CONTINUE
    assert dns.total_queries == 0


async def test_trusted_clients_skip_every_check(resolver: Resolver, dns: DNSServer) -> None:
    p = plugin(resolver, resolve=True, fcrdns=True)
    s = session(INSIDE)
    for name in ("localhost", "gw.test.example", "nohost.mail.test", "x"):
        verdict = await settle(p.helo(s, name))
        assert verdict.action is Action.CONTINUE and verdict.result == "helo=trusted"
    assert s.results == {}
    assert dns.total_queries == 0


async def test_refusal_sticks_in_the_session_until_it_is_cleared(resolver: Resolver) -> None:
    p = plugin(resolver, resolve=True)
    s = session()
    first = await settle(p.helo(s, "nohost.mail.test"))
    assert first.refuses
    again = await settle(p.helo(s, "good.mail.test"))
    assert again.reply == first.reply
    s.results.clear()  # what the core does after XCLIENT
    assert not (await settle(p.helo(s, "good.mail.test"))).refuses


# ----------------------------------------------------------------- FCrDNS


@pytest.mark.parametrize("ip, expected", [
    ("203.0.113.7", Fcrdns(None, ("fcrdns.mail.test",))),
    ("::ffff:203.0.113.7", Fcrdns(None, ("fcrdns.mail.test",))),
    ("2001:db8::7", Fcrdns(None, ("fcrdns6.mail.test",))),
    ("203.0.113.12", Fcrdns(None, ("multi.mail.test",))),
    ("203.0.113.8", Fcrdns(Finding.NO_FCRDNS)),  # the name resolves elsewhere
    ("203.0.113.9", Fcrdns(Finding.NO_FCRDNS)),  # no PTR
    ("203.0.113.10", Fcrdns(Finding.NO_FCRDNS)),  # the name does not exist
    ("203.0.113.13", Fcrdns(Finding.FCRDNS_TEMPFAIL)),  # PTR SERVFAIL
    ("203.0.113.14", Fcrdns(Finding.FCRDNS_TEMPFAIL)),  # forward SERVFAIL
])
async def test_check_fcrdns(resolver: Resolver, reverse: DNSServer, ip: str, expected: Fcrdns) -> None:
    assert await check_fcrdns(resolver, ipaddress.ip_address(ip)) == expected


async def test_fcrdns_pass_is_recorded(resolver: Resolver, reverse: DNSServer) -> None:
    verdict = await settle(plugin(resolver, fcrdns=True).helo(session(), "good.mail.test"))
    assert verdict.action is Action.CONTINUE
    assert verdict.result == "helo=ok fcrdns=pass (fcrdns.mail.test)"


async def test_no_fcrdns_only_informs_by_default(resolver: Resolver, reverse: DNSServer) -> None:
    verdict = await settle(plugin(resolver, fcrdns=True).helo(session(ipaddress.ip_address("203.0.113.8")), "good.mail.test"))
    assert (verdict.action, verdict.score, verdict.result) == (Action.CONTINUE, 0.0, "helo=ok fcrdns=fail")


async def test_no_fcrdns_is_checked_once_and_scored_at_every_helo(resolver: Resolver, reverse: DNSServer) -> None:
    p = plugin(resolver, fcrdns=True, actions={"no_fcrdns": 2.0})
    s = session(ipaddress.ip_address("203.0.113.9"))
    first = await settle(p.helo(s, "good.mail.test"))
    assert (first.score, first.result) == (2.0, "helo=ok fcrdns=fail")
    reverse.reset_counts()
    second = await settle(p.helo(s, "good.mail.test"))
    assert (second.score, second.result) == (2.0, "helo=ok fcrdns=fail")
    assert reverse.total_queries == 0  # checked once per session


@pytest.mark.parametrize("ip, action, reply", [
    ("203.0.113.8", "reject", "550 5.7.25 Client host rejected: cannot find your hostname, [203.0.113.8]"),
    ("203.0.113.8", "defer", "450 4.7.25 Client host rejected: cannot find your hostname, [203.0.113.8]"),
    ("::ffff:203.0.113.9", "reject", "550 5.7.25 Client host rejected: cannot find your hostname, [203.0.113.9]"),
])
async def test_no_fcrdns_can_refuse(resolver: Resolver, reverse: DNSServer, ip: str, action: str, reply: str) -> None:
    verdict = await settle(plugin(resolver, fcrdns=True, actions={"no_fcrdns": action}).helo(
        session(ipaddress.ip_address(ip)), "good.mail.test"
    ))
    assert str(verdict.reply) == reply


async def test_fcrdns_tempfail_can_defer(resolver: Resolver, reverse: DNSServer) -> None:
    p = plugin(resolver, fcrdns=True, actions={"fcrdns_tempfail": "defer"})
    verdict = await settle(p.helo(session(ipaddress.ip_address("203.0.113.13")), "good.mail.test"))
    assert str(verdict.reply) == "450 4.7.25 Client host rejected: cannot find your hostname, [203.0.113.13]"
    assert verdict.result == "helo=ok fcrdns=tempfail"


async def test_resolve_and_fcrdns_combine(resolver: Resolver, reverse: DNSServer) -> None:
    p = plugin(resolver, resolve=True, fcrdns=True, actions={"no_fcrdns": 1.5})
    verdict = await settle(p.helo(session(ipaddress.ip_address("203.0.113.8")), "nohost.mail.test"))
    assert verdict.action is Action.REJECT
    assert str(verdict.reply) == "550 5.7.1 <nohost.mail.test>: Helo command rejected: Host not found"
    assert verdict.result == "helo=not_found fcrdns=fail"


# --------------------------------------------------------------- pipeline


async def test_through_the_real_stage(dns: DNSServer) -> None:
    policy = Policy("policy.toml", SETTINGS, plugins={"helo": {"resolve": True}})
    context = Context(SETTINGS, Resolver([dns.nameserver], timeout=0.5))
    registry = load_plugins(policy, context)
    s = session()
    kwargs = {"session": s, "hostname": "nohost.mail.test"}
    verdict = await run_stage(registry.calls["helo"], kwargs, 2.0, "test")
    assert (verdict.action, verdict.plugin) == (Action.REJECT, "helo")
    assert isinstance(s.results["helo"], HeloState)
    assert s.results["helo"].findings == ("not_found",)


async def test_host_and_fcrdns_lookups_run_at_once_and_then_come_from_the_cache(dns: DNSServer, reverse: DNSServer) -> None:
    # Both answers are held: asked one after the other, the second
    # question would never be sent.
    dns.hold("good.mail.test")
    dns.hold(reverse_name(str(OUTSIDE)))
    resolver = Resolver([dns.nameserver], timeout=10.0)
    p = plugin(resolver, resolve=True, fcrdns=True)
    helo = asyncio.ensure_future(p.helo(session(), "good.mail.test"))
    await dns.asked(("good.mail.test", None), (reverse_name(str(OUTSIDE)), "PTR"))
    assert not helo.done()
    dns.release()
    first = await helo
    assert first.result == "helo=ok fcrdns=pass (fcrdns.mail.test)"
    asked = dns.query_count("good.mail.test"), dns.query_count(reverse_name(str(OUTSIDE)))
    # Then from the cache, without waiting: the coroutine ends on its first step
    # (a plugin of its own, which has judged nothing yet)...
    with pytest.raises(StopIteration) as again:
        plugin(resolver, resolve=True, fcrdns=True).helo(session(), "good.mail.test").send(None)
    assert again.value.value == first
    # ... and the plugin that judged it answers at once.
    assert p.helo(session(), "good.mail.test") == first
    assert (dns.query_count("good.mail.test"), dns.query_count(reverse_name(str(OUTSIDE)))) == asked


async def test_a_judged_name_is_kept_while_its_answers_are(dns: DNSServer, reverse: DNSServer) -> None:
    clock = FakeClock()
    resolver = Resolver([dns.nameserver], timeout=2.0, clock=clock)
    p = plugin(resolver, resolve=True, fcrdns=True)
    first = await settle(p.helo(session(), "good.mail.test"))
    used = [("good.mail.test", "A"), ("good.mail.test", "AAAA"), (reverse_name(str(OUTSIDE)), "PTR"), ("fcrdns.mail.test", "A")]
    ttl = min(resolver.cached(name, rdtype).ttl for name, rdtype in used)  # type: ignore[union-attr]
    assert ttl > 0
    clock.now += ttl - 0.5
    s = session()
    assert p.helo(s, "good.mail.test") is first  # judged once, no coroutine
    assert isinstance(s.results["helo"], HeloState) and s.results["helo"].fcrdns == Fcrdns(None, ("fcrdns.mail.test",))
    clock.now += 1.0  # the shortest TTL is up: asked and judged again
    again = p.helo(session(), "good.mail.test")
    assert inspect.isawaitable(again)
    assert await again == first


async def test_a_temporary_failure_is_not_kept(reverse: DNSServer) -> None:
    p = plugin(Resolver([reverse.nameserver], timeout=2.0), fcrdns=True)
    client = ipaddress.ip_address("203.0.113.13")  # PTR SERVFAIL
    first = await settle(p.helo(session(client), "good.mail.test"))
    assert "fcrdns=tempfail" in first.result
    again = p.helo(session(client), "good.mail.test")
    assert inspect.isawaitable(again)
    assert await again == first


async def test_judged_names_are_kept_per_client_and_bounded(dns: DNSServer) -> None:
    p = plugin(Resolver([dns.nameserver], timeout=2.0, cache_size=2))
    for name in ("a.mail.test", "b.mail.test", "c.mail.test"):
        await settle(p.helo(session(), name))
    assert len(p._judged) == 2
    other_client = p.helo(session(ipaddress.ip_address("203.0.113.99")), "c.mail.test")
    assert inspect.iscoroutine(other_client)
    other_client.close()
    assert not inspect.isawaitable(p.helo(session(), "c.mail.test"))
