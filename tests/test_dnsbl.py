"""plugins.dnsbl: block, allow and domain lists against the real loopback DNS
server (tests/zones/bl.test.zone, wl.test.zone, rhs.test.zone).

The pure pieces (code filters, answer classification, TXT cleaning, the
circuit breaker, option validation) are tested directly; the hooks are
called as the core calls them, with a real Resolver, and the server counts
the queries that actually went out.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import Action, Address, Context, Envelope, Recipient, Session, Verdict
from gateway.address import parse_path
from gateway.config import GatewaySettings, PolicyError, parse_table, policy_from_dict
from gateway.dns import Answer, Resolver, Status, dnsbl_name
from gateway.plugins import load_plugins
from gateway.replies import Reply
from plugins.dnsbl import (
    LISTED,
    LOOKUP_FAILED,
    Breaker,
    Codes,
    DnsblPlugin,
    DnsblResults,
    ZoneStatus,
    allowlisted,
    classify,
    clean_txt,
    lookup_domain,
    parse_codes,
)
from tests.fixtures.clock import FakeClock
from tests.fixtures.dnsserver import DNSServer
from tests.fixtures.hooks import settle

SETTINGS = GatewaySettings(
    hostname="gw.example.net",
    local_domains=("example.com",),
    trusted_networks=("198.51.100.0/24",),
)
BL = {"bl.test": {}}
WL = {"wl.test": {"type": "allow"}}
RHS = {"rhs.test": {"type": "rhs"}}
REASON_99 = "Listed for testing, see https://bl.test/q?ip=192.0.2.99"


# ------------------------------------------------------------------ helpers


@pytest.fixture
def resolver(dns: DNSServer) -> Resolver:
    return Resolver([dns.nameserver], timeout=5.0)


def make(resolver: Resolver | None, zones: dict[str, Any], **options: Any) -> DnsblPlugin:
    """The plugin as the gateway builds it: options through the policy parser."""
    opts, problems = parse_table(DnsblPlugin.Options, {"zones": zones, **options}, "plugins.dnsbl", "<test>")
    assert not problems, problems
    return DnsblPlugin(opts, Context(SETTINGS, resolver), "dnsbl")


def session(ip: str) -> Session:
    address = ipaddress.ip_address(ip)
    return Session(client_ip=address, trusted=Context(SETTINGS).is_trusted(address))


def envelope(sender: str = "bob@example.org") -> Envelope:
    return Envelope(parse_path(f"FROM:<{sender}>", "FROM")[0] if sender else Address(""))


def rcpt(path: str = "<alice@example.com>") -> Recipient:
    return Recipient(parse_path(f"TO:{path}", "TO")[0])


def problems(table: dict[str, Any]) -> dict[str, str]:
    with pytest.raises(PolicyError) as info:
        load_plugins(policy_from_dict({"plugins": {"dnsbl": table}}, "p.toml"), Context(SETTINGS))
    return {p.key: p.expected for p in info.value.problems}


@pytest.fixture
def records() -> Iterator[list[logging.LogRecord]]:
    """Log records of the plugin's logger (attached directly: the gateway's
    log setup may stop propagation to the root logger)."""
    found: list[logging.LogRecord] = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = found.append  # type: ignore[method-assign]
    logger = logging.getLogger("smtpgate.plugin.dnsbl")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield found
    logger.removeHandler(handler)
    logger.setLevel(old_level)


def listed(ip: str, zone: str = "bl.test", reason: str = "") -> Reply:
    return Reply(554, "5.7.1", f"Service unavailable; Client host [{ip}] blocked using {zone}{reason}")


# ---------------------------------------------------------------- pure parts


def test_parse_codes_single_range_network() -> None:
    codes = parse_codes(["127.0.0.2", "127.0.0.4-127.0.0.11", "127.0.10.0/24"])
    match = [c for c in ("127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.11", "127.0.0.12", "127.0.10.7")
             if codes.matches(ipaddress.IPv4Address(c))]
    assert match == ["127.0.0.2", "127.0.0.4", "127.0.0.11", "127.0.10.7"]


@pytest.mark.parametrize(
    "spec,why",
    [
        ("10.0.0.2", "127.0.0.0/8"),
        ("127.0.0.2-128.0.0.1", "127.0.0.0/8"),
        ("127.255.255.254", "error codes"),
        ("127.255.0.0/16", "error codes"),
        ("127.0.0.9-127.0.0.3", "ends before"),
        ("zen", "expected an address"),
        ("127.0.0.1/24", "expected an address"),
    ],
)
def test_parse_codes_refuses(spec: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        parse_codes([spec])


def test_default_codes_and_bitmask() -> None:
    default = Codes()
    assert default.matches(ipaddress.IPv4Address("127.0.0.2"))
    assert default.matches(ipaddress.IPv4Address("127.0.10.3"))
    assert not default.matches(ipaddress.IPv4Address("127.0.0.1"))
    bits = parse_codes([], bitmask=0x06)
    assert [n for n in range(1, 9) if bits.matches(ipaddress.IPv4Address(f"127.0.0.{n}"))] == [2, 3, 4, 5, 6, 7]


def answer(*records: str) -> Answer:
    return Answer(Status.RECORDS, records)


@pytest.mark.parametrize(
    "given,status,codes",
    [
        (answer("127.0.0.2"), ZoneStatus.LISTED, ("127.0.0.2",)),
        (answer("127.0.0.4", "127.0.0.2"), ZoneStatus.LISTED, ("127.0.0.2", "127.0.0.4")),
        (Answer(Status.NXDOMAIN), ZoneStatus.CLEAR, ()),
        (Answer(Status.NODATA), ZoneStatus.CLEAR, ()),
        (Answer(Status.TEMPFAIL, error="timeout"), ZoneStatus.TEMPFAIL, ()),
        (answer("127.255.255.254"), ZoneStatus.ERROR, ("127.255.255.254",)),
        (answer("127.255.255.1"), ZoneStatus.ERROR, ("127.255.255.1",)),
        (answer("192.0.2.1"), ZoneStatus.ERROR, ("192.0.2.1",)),
        (answer("127.0.0.1"), ZoneStatus.ERROR, ("127.0.0.1",)),
        # a real listing next to an error code is still a listing
        (answer("127.255.255.254", "127.0.0.2"), ZoneStatus.LISTED, ("127.0.0.2",)),
    ],
)
def test_classify(given: Answer, status: ZoneStatus, codes: tuple[str, ...]) -> None:
    outcome = classify(given, Codes())
    assert (outcome.status, outcome.codes) == (status, codes)


def test_classify_explains_operator_codes() -> None:
    assert "public or open resolver" in classify(answer("127.255.255.254"), Codes()).error
    assert "outside 127.0.0.0/8" in classify(answer("10.1.2.3"), Codes()).error


def test_classify_filters_codes() -> None:
    only_2 = parse_codes(["127.0.0.2"])
    assert classify(answer("127.0.0.10"), only_2).status is ZoneStatus.CLEAR
    assert classify(answer("127.0.0.10", "127.0.0.2"), only_2).codes == ("127.0.0.2",)
    # codes may name 127.0.0.1 explicitly; then it is a listing
    assert classify(answer("127.0.0.1"), parse_codes(["127.0.0.1"])).status is ZoneStatus.LISTED


#: Records a list may answer with: listing codes, the codes that mean
#: "refused"/"blocked", operator error codes, and addresses outside 127/8.
list_answers = st.one_of(
    st.sampled_from(["127.0.0.1", "127.0.0.255", "127.255.255.252", "127.255.255.254", "127.255.255.255"]),
    st.integers(int(ipaddress.IPv4Address("127.0.0.0")), int(ipaddress.IPv4Address("127.255.255.255"))).map(
        lambda n: str(ipaddress.IPv4Address(n))),
    st.ip_addresses(v=4).map(str),
)


@st.composite
def code_filters(draw: st.DrawFn) -> Codes:
    """Any filter a policy can write: ranges inside 127/8 (below the
    operator block), or a bitmask."""
    if draw(st.booleans()):
        return parse_codes([], bitmask=draw(st.integers(1, 255)))
    low = int(ipaddress.IPv4Address("127.0.0.0"))
    high = int(ipaddress.IPv4Address("127.255.254.255"))
    specs = []
    for first, span in draw(st.lists(st.tuples(st.integers(low, high), st.integers(0, 300)), max_size=3)):
        last = min(first + span, high)
        specs.append(f"{ipaddress.IPv4Address(first)}-{ipaddress.IPv4Address(last)}")
    return parse_codes(specs)


def counts_as_listing(record: str, codes: Codes) -> bool:
    """The documented rule, restated: in 127/8 and outside 127.255.255/24;
    127.0.0.1 and 127.0.0.255 only where a range is exactly that address;
    else as the bitmask (last octet) or the ranges say, or always."""
    ip = ipaddress.IPv4Address(record)
    if ip not in ipaddress.IPv4Network("127.0.0.0/8") or ip in ipaddress.IPv4Network("127.255.255.0/24"):
        return False
    if record in ("127.0.0.1", "127.0.0.255"):
        return (int(ip), int(ip)) in codes.ranges
    if codes.bitmask:
        return bool(int(ip) & 0xFF & codes.bitmask)
    return not codes.ranges or any(first <= int(ip) <= last for first, last in codes.ranges)


@settings(max_examples=300)
@given(answer_records=st.lists(list_answers, min_size=1, max_size=6, unique=True), codes=code_filters())
def test_only_a_listing_code_the_policy_counts_ever_lists(answer_records: list[str], codes: Codes) -> None:
    outcome = classify(Answer(Status.RECORDS, tuple(answer_records)), codes)
    listing = {r for r in answer_records if counts_as_listing(r, codes)}
    if listing:
        assert outcome.status is ZoneStatus.LISTED and set(outcome.codes) == listing
    else:
        # Operator error codes and stray addresses never reject: they are
        # logged as the zone's error, or ignored.
        assert outcome.status in (ZoneStatus.CLEAR, ZoneStatus.ERROR)


@pytest.mark.parametrize("record", ["127.0.0.1", "127.0.0.255"])
@pytest.mark.parametrize(
    "codes",
    [Codes(), parse_codes([], bitmask=0x03), parse_codes([], bitmask=0xFF), parse_codes(["127.0.0.0/24"]),
     parse_codes(["127.0.0.1-127.0.0.255"])],
    ids=["any", "bitmask-3", "bitmask-255", "network", "range"],
)
def test_refused_and_blocked_answers_are_errors_whatever_the_codes(codes: Codes, record: str) -> None:
    """127.0.0.1 (URIBL/SURBL "query refused") and 127.0.0.255 (what
    list.dnswl.org answers to everything once it blocks the resolver) are
    no listing, with a bitmask too (their last octets have every bit)."""
    outcome = classify(answer(record), codes)
    assert (outcome.status, outcome.codes) == (ZoneStatus.ERROR, (record,))
    assert not codes.matches(ipaddress.IPv4Address(record))
    # ... unless the zone's codes name that very address
    assert classify(answer(record), parse_codes([record])).status is ZoneStatus.LISTED
    assert classify(answer(record), parse_codes([f"{record}/32", "127.0.0.2"])).status is ZoneStatus.LISTED


def test_clean_txt_keeps_one_printable_line() -> None:
    assert clean_txt(Answer(Status.RECORDS, ("a\r\n250 ok\x00 \t b  é",))) == "a??250 ok? b ?"
    assert len(clean_txt(Answer(Status.RECORDS, ("x" * 1000,)))) == 200
    assert clean_txt(Answer(Status.NXDOMAIN)) == ""


@pytest.mark.parametrize(
    "text,expected",
    [
        ("Spam.Example.", "spam.example"),
        ("[192.0.2.1]", None),
        ("[IPv6:2001:db8::1]", None),
        ("192.0.2.1", None),
        ("bad_name!", None),
        ("", None),
        ("bücher.example", "xn--bcher-kva.example"),
        ("test", "test"),
    ],
)
def test_lookup_domain(text: str, expected: str | None) -> None:
    assert lookup_domain(text) == expected


def test_breaker_pauses_after_n_failures_and_probes() -> None:
    clock = FakeClock()
    breaker = Breaker(3, 60.0, clock)
    assert not breaker.failure() and not breaker.failure()
    assert breaker.failure()  # the third in a row
    assert not breaker.allows()
    clock.now += 60
    assert breaker.allows()
    assert breaker.failure()  # a failed probe pauses again at once
    assert not breaker.allows()
    clock.now += 60
    assert breaker.success()  # closes: reported once
    assert not breaker.success()
    assert not breaker.failure()  # counting starts over


def test_breaker_success_resets_the_count_and_zero_never_pauses() -> None:
    breaker = Breaker(2, 60.0, FakeClock())
    breaker.failure()
    breaker.success()
    assert not breaker.failure()
    never = Breaker(0, 60.0, FakeClock())
    assert not any(never.failure() for _ in range(100))


# ------------------------------------------------------------------- options


def test_defaults_and_actions_merged() -> None:
    plugin = make(None, BL, actions={"tempfail": "defer"})
    assert plugin.options.actions == {"listed": "reject", "allowed": "accept", "tempfail": "defer", "error": "continue"}
    assert plugin.options.delay_reject is True
    assert plugin.options.exempt_recipients == ("postmaster",)


def test_policy_errors_name_the_key() -> None:
    found = problems({
        "zones": {
            "sbl": {"codes": ["127.0.0.2"]},
            "xbl": {"zone": "xbl.test", "codes": ["127.0.0.2", "10.0.0.1"]},
            "bl.test": {"type": "allow", "action": "reject", "domains": ["helo"]},
            "x.test": {"bitmask": 300, "reply": "{ip} {nope}", "colour": "red"},
            "rhs.test": {"type": "rhs", "domains": ["rcpt"]},
        },
        "actions": {"error": "reject", "tempfail": "accept", "spam": "reject"},
        "timeout": 0,
    })
    assert set(found) == {
        "plugins.dnsbl.zones.sbl.zone",  # the name is no zone, and zone is missing
        "plugins.dnsbl.zones.xbl.codes",
        'plugins.dnsbl.zones."bl.test".action',
        'plugins.dnsbl.zones."x.test".colour',
        # An unknown key does not hide the same table's other problems.
        'plugins.dnsbl.zones."x.test".bitmask',
        'plugins.dnsbl.zones."x.test".reply',
        'plugins.dnsbl.zones."rhs.test".domains',
        "plugins.dnsbl.actions.error",
        "plugins.dnsbl.actions.tempfail",
        "plugins.dnsbl.actions.spam",
        "plugins.dnsbl.timeout",
    }
    assert "127.0.0.0/8" in found["plugins.dnsbl.zones.xbl.codes"]
    assert "not 'reject' for allowed" in found['plugins.dnsbl.zones."bl.test".action']


def test_policy_errors_in_zone_values() -> None:
    found = problems({"zones": {
        "bl.test": {"bitmask": 300, "reply": "{ip} {nope}", "codes": "127.0.0.2"},
        "wl.test": {"type": "allow", "domains": ["helo"]},
        "rhs.test": {"type": "rhs", "codes": ["127.0.0.2"], "bitmask": 2},
    }})
    assert set(found) == {
        # A wrong type (codes) does not hide the values wrong in the same table.
        'plugins.dnsbl.zones."bl.test".codes',
        'plugins.dnsbl.zones."bl.test".bitmask',
        'plugins.dnsbl.zones."bl.test".reply',
        'plugins.dnsbl.zones."wl.test".domains',
        'plugins.dnsbl.zones."rhs.test".bitmask',
    }


def test_each_wrong_zone_value_is_one_problem_named_by_its_own_key() -> None:
    # The zone tables' values were typed as one union for all keys: a wrong
    # type got "expected a string, true or false, an integer, a finite
    # number or a list" under a key path without quotes, and hid every
    # other problem of every zone (an unknown key, an action misspelt).
    found = problems({"zones": {
        "x.example.org": {"zone": {"a": 1}, "action": "rejekt", "colour": "red"},
        "y.example.org": {"codes": [1, "127.0.0.2"], "type": "blok", "score": "high"},
        "bad": 3,
    }})
    assert found == {
        'plugins.dnsbl.zones."x.example.org".zone': "expected a string, got {'a': 1}",
        'plugins.dnsbl.zones."x.example.org".action': "one of reject, defer, tag, accept, continue or a score",
        'plugins.dnsbl.zones."x.example.org".colour':
            "unknown key (expected one of: action, bitmask, codes, domains, reply, score, type, zone)",
        'plugins.dnsbl.zones."y.example.org".codes': "item 0: expected a string, got 1",
        'plugins.dnsbl.zones."y.example.org".type': "expected one of 'client', 'allow', 'rhs', got 'blok'",
        'plugins.dnsbl.zones."y.example.org".score': "expected a finite number, got 'high'",
        "plugins.dnsbl.zones.bad": "expected a table, got 3",
    }


def test_loaded_through_its_entry_point() -> None:
    policy = policy_from_dict({"plugins": {"dnsbl": {"zones": {**BL, **WL, **RHS}}}}, "p.toml")
    registry = load_plugins(policy, Context(SETTINGS))
    (loaded,) = [p for p in registry.plugins if p.name == "dnsbl"]
    assert loaded.hooks == ("connect", "helo", "mail", "rcpt")
    assert [e.name for e in loaded.instance.entries] == ["bl.test", "wl.test", "rhs.test"]


# ------------------------------------------------- client lists, real DNS


@pytest.mark.parametrize(
    "ip,is_listed",
    [
        ("127.0.0.2", True),  # RFC 5782 §5 test points
        ("127.0.0.1", False),
        ("::FFFF:7F00:2", True),
        ("::FFFF:7F00:1", False),
        ("2001:db8::99", True),  # IPv6, nibble form
        ("2001:db8::98", False),
        ("192.0.2.99", True),
        ("203.0.113.7", False),
    ],
)
async def test_rfc5782_test_points(resolver: Resolver, ip: str, is_listed: bool) -> None:
    plugin = make(resolver, BL, delay_reject=False)
    verdict = await settle(plugin.connect(session(ip)))
    if is_listed:
        assert verdict is not None and verdict.action is Action.REJECT
        assert verdict.result.startswith("dnsbl=listed bl.test:127.0.0.2")
    else:
        assert verdict is None


async def test_ipv6_is_asked_in_nibble_form(dns: DNSServer, resolver: Resolver) -> None:
    plugin = make(resolver, BL, delay_reject=False)
    verdict = await settle(plugin.connect(session("2001:db8::99")))
    assert verdict is not None
    assert verdict.reply == Reply(554, "5.7.1", "Service unavailable; Client host [2001:db8::99] blocked using bl.test; IPv6 listing")
    nibbles = "9.9.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.bl.test"
    assert dnsbl_name("2001:db8::99", "bl.test") == nibbles
    assert dns.query_count(nibbles, "A") == 1


async def test_reply_quotes_the_txt_record(resolver: Resolver) -> None:
    plugin = make(resolver, BL, delay_reject=False)
    verdict = await settle(plugin.connect(session("192.0.2.99")))
    assert verdict is not None
    assert str(verdict.reply) == f"554 5.7.1 Service unavailable; Client host [192.0.2.99] blocked using bl.test; {REASON_99}"


async def test_reply_without_txt_is_postfix_default(resolver: Resolver) -> None:
    verdict = await settle(make(resolver, BL, delay_reject=False).connect(session("192.0.2.95")))
    assert verdict is not None and verdict.reply == listed("192.0.2.95")


async def test_txt_with_line_breaks_cannot_split_the_reply(resolver: Resolver) -> None:
    verdict = await settle(make(resolver, BL, delay_reject=False).connect(session("192.0.2.94")))
    assert verdict is not None and verdict.reply is not None
    assert verdict.reply.wire() == b"554 5.7.1 Service unavailable; Client host [192.0.2.94] blocked using bl.test; first??250 2.0.0 smuggled\r\n"


async def test_custom_reply_template(resolver: Resolver) -> None:
    zones = {"bl.test": {"reply": "{ip} is listed ({code}): {txt}"}}
    verdict = await settle(make(resolver, zones, delay_reject=False).connect(session("192.0.2.99")))
    assert verdict is not None
    assert verdict.reply == Reply(554, "5.7.1", f"192.0.2.99 is listed (127.0.0.2): {REASON_99}")


async def test_txt_is_not_asked_when_nothing_is_refused(dns: DNSServer, resolver: Resolver) -> None:
    verdict = await settle(make(resolver, {"bl.test": {"action": 2.5}}).connect(session("192.0.2.99")))
    assert verdict is not None and verdict.action is Action.CONTINUE and verdict.score == 2.5
    assert dns.query_count("99.2.0.192.bl.test", "A") == 1
    assert dns.query_count("99.2.0.192.bl.test", "TXT") == 0


async def test_a_warm_cache_gives_the_same_verdicts_without_asking(dns: DNSServer, resolver: Resolver) -> None:
    # The score-only zone asks A only; the refusing one then needs the TXT
    # reason, which the cache does not have yet: only that is asked.
    scored = await settle(make(resolver, {"bl.test": {"action": 2.5}}).connect(session("192.0.2.99")))
    plugin = make(resolver, BL, delay_reject=False)
    first = await settle(plugin.connect(session("192.0.2.99")))
    assert (dns.query_count("99.2.0.192.bl.test", "A"), dns.query_count("99.2.0.192.bl.test", "TXT")) == (1, 1)
    assert first is not None and str(first.reply).endswith(REASON_99)
    again = plugin.connect(session("192.0.2.99"))
    assert again == first  # a plain answer: no coroutine, so no task for the gateway
    assert await settle(make(resolver, {"bl.test": {"action": 2.5}}).connect(session("192.0.2.99"))) == scored
    assert await settle(plugin.connect(session("203.0.113.7"))) is None
    assert await settle(plugin.connect(session("203.0.113.7"))) is None
    assert dns.query_count("99.2.0.192.bl.test", "A") == 1 and dns.query_count("99.2.0.192.bl.test", "TXT") == 1
    assert dns.query_count("7.113.0.203.bl.test", "A") == 1


@pytest.mark.parametrize(
    "ip,code,words",
    [
        ("192.0.2.254", "127.255.255.254", "public or open resolver"),
        ("192.0.2.253", "192.0.2.1", "outside 127.0.0.0/8"),
        ("192.0.2.252", "127.0.0.1", "never a listing"),
    ],
)
async def test_answers_that_are_no_listing_never_reject(
    resolver: Resolver, records: list[logging.LogRecord], ip: str, code: str, words: str
) -> None:
    plugin = make(resolver, BL, delay_reject=False)
    verdict = await settle(plugin.connect(session(ip)))
    assert verdict is not None
    assert verdict.action is Action.CONTINUE and verdict.reply is None
    assert verdict.result == f"dnsbl=error bl.test:{code}"
    (record,) = [r for r in records if r.levelno == logging.WARNING]
    assert "zone bl.test answered" in record.getMessage() and words in record.getMessage()
    assert not plugin.rcpt(session(ip), envelope(), rcpt())


async def test_error_can_be_scored_but_never_rejected(resolver: Resolver) -> None:
    verdict = await settle(make(resolver, BL, actions={"error": 0.5}).connect(session("192.0.2.254")))
    assert verdict is not None and (verdict.action, verdict.score) == (Action.CONTINUE, 0.5)
    assert "error" in problems({"zones": BL, "actions": {"error": "defer"}})["plugins.dnsbl.actions.error"]


async def test_code_filtering_and_one_zone_split_in_two(dns: DNSServer, resolver: Resolver) -> None:
    # Like zen.spamhaus.org: SBL codes reject, PBL codes only score.
    zones = {
        "sbl": {"zone": "bl.test", "codes": ["127.0.0.2-127.0.0.9"]},
        "pbl": {"zone": "bl.test", "codes": ["127.0.0.10-127.0.0.11"], "action": 1.5},
    }
    plugin = make(resolver, zones, delay_reject=False)
    pbl = await settle(plugin.connect(session("192.0.2.98")))
    assert pbl is not None
    assert (pbl.action, pbl.score, pbl.result) == (Action.CONTINUE, 1.5, "dnsbl=listed pbl:127.0.0.10")
    sbl = await settle(plugin.connect(session("192.0.2.97")))
    assert sbl is not None and sbl.action is Action.REJECT
    assert sbl.result == "dnsbl=listed sbl:127.0.0.2,127.0.0.4"
    # both entries share one question on the wire
    assert dns.query_count("98.2.0.192.bl.test", "A") == 1


async def test_codes_not_counted_are_not_listed(resolver: Resolver) -> None:
    plugin = make(resolver, {"bl.test": {"codes": ["127.0.0.2"]}}, delay_reject=False)
    assert await settle(plugin.connect(session("192.0.2.98"))) is None


@pytest.mark.parametrize("bitmask,is_listed", [(0x02, True), (0x01, True), (0x04, False)])
async def test_bitmask(resolver: Resolver, bitmask: int, is_listed: bool) -> None:
    plugin = make(resolver, {"bl.test": {"bitmask": bitmask}}, delay_reject=False)
    verdict = await settle(plugin.connect(session("192.0.2.93")))  # 127.0.0.3
    assert (verdict is not None and verdict.refuses) is is_listed


async def test_tag_action_adds_a_header(resolver: Resolver) -> None:
    verdict = await settle(make(resolver, {"bl.test": {"action": "tag", "score": 3}}).connect(session("192.0.2.99")))
    assert verdict is not None and verdict.action is Action.TAG and verdict.score == 3.0
    assert verdict.headers == (("X-DNSBL", "listed bl.test:127.0.0.2 (client host [192.0.2.99])"),)


async def test_trusted_clients_are_not_looked_up(dns: DNSServer, resolver: Resolver) -> None:
    plugin = make(resolver, {**BL, **WL, **RHS})
    trusted = session("198.51.100.7")
    assert await settle(plugin.connect(trusted)) is None
    assert await settle(plugin.helo(trusted, "bot.spamhelo.example")) is None
    assert await settle(plugin.mail(trusted, envelope("x@spam.example"))) is None
    assert dns.total_queries == 0


# ------------------------------------------------------- delayed rejection


async def test_listing_is_refused_at_rcpt_by_default(resolver: Resolver) -> None:
    plugin = make(resolver, {"bl.test": {"score": 4}})
    client = session("192.0.2.99")
    found = await settle(plugin.connect(client))
    assert found is not None
    assert (found.action, found.score) == (Action.CONTINUE, 4.0)
    assert found.result == "dnsbl=listed bl.test:127.0.0.2 (refused at RCPT)"
    env = envelope()
    assert await settle(plugin.mail(client, env)) is None
    refused = plugin.rcpt(client, env, rcpt())
    assert refused is not None and refused.action is Action.REJECT
    assert refused.reply == listed("192.0.2.99", reason=f"; {REASON_99}")
    assert refused.score == 0.0  # the score counted once, at connect
    state = client.results["dnsbl"]
    assert isinstance(state, DnsblResults)
    assert [(h.name, h.subject, h.codes) for h in state.hits] == [("bl.test", "192.0.2.99", ("127.0.0.2",))]


@pytest.mark.parametrize(
    "path,exempt",
    [
        ("<postmaster@example.com>", True),
        ("<PostMaster@EXAMPLE.COM>", True),
        ("<Postmaster>", True),
        ('<"postmaster"@example.com>', True),
        ("<postmaster@remote.example>", False),
        ("<abuse@example.com>", False),
        ("<alice@example.com>", False),
    ],
)
async def test_postmaster_may_still_be_written_to(resolver: Resolver, path: str, exempt: bool) -> None:
    plugin = make(resolver, BL)
    client = session("192.0.2.99")
    await settle(plugin.connect(client))
    verdict = plugin.rcpt(client, envelope(), rcpt(path))
    assert verdict is not None
    assert verdict.refuses is not exempt
    if exempt:
        assert "(exempt: " in verdict.result


async def test_exempt_recipients_option(resolver: Resolver) -> None:
    plugin = make(resolver, BL, exempt_recipients=["abuse"])
    client = session("192.0.2.99")
    await settle(plugin.connect(client))
    assert not plugin.rcpt(client, envelope(), rcpt("<abuse@example.com>")).refuses  # type: ignore[union-attr]
    assert plugin.rcpt(client, envelope(), rcpt("<postmaster@example.com>")).refuses  # type: ignore[union-attr]


async def test_without_delay_the_connection_is_refused(resolver: Resolver) -> None:
    plugin = make(resolver, BL, delay_reject=False)
    client = session("192.0.2.99")
    verdict = await settle(plugin.connect(client))
    assert verdict is not None and verdict.action is Action.REJECT
    assert plugin.rcpt(client, envelope(), rcpt()) is None  # nothing held back


# ------------------------------------------------------------ lookup failures


async def test_servfail_of_one_zone_does_not_stop_mail(dns: DNSServer, resolver: Resolver) -> None:
    dns.add_zone("bl2.test", "99.2.0.192 A 127.0.0.2\n")
    dns.servfail("99.2.0.192.bl.test")
    # SERVFAIL is an answer: nothing waits for the resolver's time limit.
    plugin = make(Resolver([dns.nameserver], timeout=60.0), {**BL, "bl2.test": {}}, delay_reject=False, timeout=60.0)
    async with asyncio.timeout(10):
        verdict = await settle(plugin.connect(session("192.0.2.99")))
    assert verdict is not None and verdict.action is Action.REJECT
    assert verdict.reply == listed("192.0.2.99", "bl2.test")  # the zone that answered
    assert verdict.result == "dnsbl=tempfail bl.test dnsbl=listed bl2.test:127.0.0.2"
    dns.remove_runtime_zones()
    # Alone, a failing zone lets the client through.
    alone = await settle(make(Resolver([dns.nameserver], timeout=0.5), BL, delay_reject=False).connect(session("192.0.2.99")))
    assert alone is not None and alone.action is Action.CONTINUE and alone.result == "dnsbl=tempfail bl.test"


async def test_a_silent_zone_costs_at_most_the_timeout(dns: DNSServer) -> None:
    dns.add_zone("bl2.test", "99.2.0.192 A 127.0.0.2\n")
    dns.timeout("bl.test")
    plugin = make(Resolver([dns.nameserver], timeout=60.0), {**BL, "bl2.test": {}}, timeout=0.3, delay_reject=False)
    start = time.monotonic()
    async with asyncio.timeout(10):  # the resolver alone would wait 60 s
        verdict = await settle(plugin.connect(session("192.0.2.99")))
    assert time.monotonic() - start >= 0.25  # it did wait for the silent zone
    assert verdict is not None and verdict.action is Action.REJECT
    assert "dnsbl=tempfail bl.test" in verdict.result


async def test_tempfail_may_defer(dns: DNSServer, resolver: Resolver) -> None:
    dns.servfail("99.2.0.192.bl.test")
    plugin = make(resolver, BL, actions={"tempfail": "defer"})
    client = session("192.0.2.99")
    await settle(plugin.connect(client))
    verdict = plugin.rcpt(client, envelope(), rcpt())
    assert verdict is not None and verdict.action is Action.DEFER
    assert verdict.reply == LOOKUP_FAILED.format(**{"class": "Client host", "what": "192.0.2.99", "zone": "bl.test"})
    assert str(verdict.reply) == "451 4.4.3 Service unavailable; Client host [192.0.2.99]: lookup in bl.test failed, try again later"


async def test_circuit_breaker_pauses_a_failing_zone(dns: DNSServer, records: list[logging.LogRecord]) -> None:
    dns.servfail("bl.test", subtree=True)
    # tempfail_ttl=0: every session asks again, as after the resolver's short cache
    plugin = make(Resolver([dns.nameserver], timeout=0.5, tempfail_ttl=0), BL, pause_after=3, pause=60)
    clock = FakeClock()
    plugin.clock = clock
    name = "99.2.0.192.bl.test"
    for _ in range(3):
        assert (await settle(plugin.connect(session("192.0.2.99")))).result == "dnsbl=tempfail bl.test"  # type: ignore[union-attr]
    assert dns.query_count(name) == 3
    # paused: not asked, no finding, nothing refused
    assert await settle(plugin.connect(session("192.0.2.99"))) is None
    assert dns.query_count(name) == 3
    (paused,) = [r for r in records if r.levelno == logging.ERROR]
    assert "zone bl.test paused for 60s after 3 failures in a row" in paused.getMessage()
    # after the pause one probe; it fails, so the zone is paused again at once
    clock.now += 60
    await settle(plugin.connect(session("192.0.2.99")))
    assert dns.query_count(name) == 4
    assert await settle(plugin.connect(session("192.0.2.99"))) is None
    assert dns.query_count(name) == 4
    assert "after a failed probe" in [r for r in records if r.levelno == logging.ERROR][-1].getMessage()
    # the zone recovers: the next probe closes the breaker and it lists again
    dns.reset_faults()
    clock.now += 60
    verdict = await settle(plugin.connect(session("192.0.2.99")))
    assert verdict is not None and "dnsbl=listed bl.test" in verdict.result
    assert "zone bl.test answers again; resumed" == records[-1].getMessage()


async def test_the_breaker_does_not_count_cache_hits(dns: DNSServer, resolver: Resolver) -> None:
    """One SERVFAIL, remembered by the resolver for a few seconds, is one
    failure: the sessions that find it in the cache do not pause the zone."""
    plugin = make(resolver, BL, delay_reject=False)  # pause_after = 5
    dns.servfail("1.2.0.192.bl.test")
    for _ in range(5):
        verdict = await settle(plugin.connect(session("192.0.2.1")))
        assert verdict is not None and verdict.result == "dnsbl=tempfail bl.test"
    assert dns.query_count("1.2.0.192.bl.test", "A") == 1
    assert plugin.entries[0].breaker.failures == 1
    dns.reset_faults()
    verdict = await settle(plugin.connect(session("192.0.2.99")))
    assert verdict is not None and verdict.reply == listed("192.0.2.99", reason=f"; {REASON_99}")


async def test_the_breaker_does_not_count_sessions_waiting_for_one_answer(dns: DNSServer, resolver: Resolver) -> None:
    plugin = make(resolver, BL, delay_reject=False, pause_after=2)
    dns.servfail("1.2.0.192.bl.test")
    dns.delay("bl.test", 0.1)
    verdicts = await asyncio.gather(*(settle(plugin.connect(session("192.0.2.1"))) for _ in range(5)))
    assert [v.result for v in verdicts if v is not None] == ["dnsbl=tempfail bl.test"] * 5
    assert dns.query_count("1.2.0.192.bl.test", "A") == 1
    assert plugin.entries[0].breaker.failures == 1 and plugin.entries[0].breaker.allows()


async def test_cached_successes_do_not_reset_the_failure_count(dns: DNSServer) -> None:
    """A zone that fails every question it is asked is paused, even while
    sessions keep finding its earlier good answers in the cache."""
    plugin = make(Resolver([dns.nameserver], timeout=0.5, tempfail_ttl=0), BL, pause_after=2, delay_reject=False)
    plugin.clock = FakeClock()
    assert (await settle(plugin.connect(session("192.0.2.99")))).action is Action.REJECT  # type: ignore[union-attr]
    dns.servfail("bl.test", subtree=True)
    assert (await settle(plugin.connect(session("192.0.2.1")))).result == "dnsbl=tempfail bl.test"  # type: ignore[union-attr]
    assert (await settle(plugin.connect(session("192.0.2.99")))).action is Action.REJECT  # type: ignore[union-attr]
    assert (await settle(plugin.connect(session("192.0.2.2")))).result == "dnsbl=tempfail bl.test"  # type: ignore[union-attr]
    # two failures in a row: paused, not asked
    assert await settle(plugin.connect(session("192.0.2.3"))) is None
    assert dns.query_count("3.2.0.192.bl.test") == 0


async def test_operator_error_codes_pause_the_zone(dns: DNSServer, resolver: Resolver) -> None:
    dns.add_zone("err.test", "* A 127.255.255.254\n")
    plugin = make(resolver, {"err.test": {}}, pause_after=2, pause=60)
    for ip in ("192.0.2.10", "192.0.2.11"):
        assert (await settle(plugin.connect(session(ip)))).result.startswith("dnsbl=error err.test")  # type: ignore[union-attr]
    assert await settle(plugin.connect(session("192.0.2.12"))) is None
    assert dns.query_count("12.2.0.192.err.test") == 0


async def test_zones_are_asked_concurrently(dns: DNSServer) -> None:
    """Four zones whose answers are held: every question is asked before
    any is answered, and the verdict holds all four results."""
    zones = ["slow1.test", "slow2.test", "slow3.test", "slow4.test"]
    for zone in zones:
        dns.add_zone(zone, "99.2.0.192 A 127.0.0.2\n")
        dns.hold(zone)
    plugin = make(Resolver([dns.nameserver], timeout=10.0), {z: {"action": 1.0} for z in zones}, timeout=10.0)
    connect = asyncio.ensure_future(settle(plugin.connect(session("192.0.2.99"))))
    await dns.asked(*((f"99.2.0.192.{zone}", "A") for zone in zones))
    assert not connect.done()
    dns.release()
    verdict = await connect
    assert verdict is not None and verdict.score == 4.0
    assert verdict.result.split(" dnsbl=") == [
        "dnsbl=listed slow1.test:127.0.0.2", "listed slow2.test:127.0.0.2",
        "listed slow3.test:127.0.0.2", "listed slow4.test:127.0.0.2",
    ]


# ----------------------------------------------------------------- allow lists


async def test_allow_list_wins_and_skips_later_checks(dns: DNSServer, resolver: Resolver) -> None:
    plugin = make(resolver, {**BL, **WL, **RHS})
    client = session("192.0.2.96")  # in bl.test and in wl.test
    verdict = await settle(plugin.connect(client))
    assert verdict is not None
    assert (verdict.action, verdict.result) == (Action.ACCEPT, "dnsbl=allowed wl.test:127.0.10.2")
    hit = allowlisted(client)
    assert hit is not None and (hit.name, hit.codes) == ("wl.test", ("127.0.10.2",))
    assert client.results["dnsbl"].hits == []
    assert await settle(plugin.helo(client, "bot.spamhelo.example")) is None
    env = envelope("x@spam.example")
    assert await settle(plugin.mail(client, env)) is None
    assert plugin.rcpt(client, env, rcpt()) is None
    assert dns.query_count("bot.spamhelo.example.rhs.test") == dns.query_count("spam.example.rhs.test") == 0


async def test_allow_list_codes_and_scores(resolver: Resolver) -> None:
    # list.dnswl.org style: trust levels 1-3 in the last octet; 0 is "none"
    plugin = make(resolver, {**BL, "wl.test": {"type": "allow", "bitmask": 3, "score": -2}})
    none = session("192.0.2.92")
    assert await settle(plugin.connect(none)) is None and allowlisted(none) is None
    medium = session("192.0.2.96")
    verdict = await settle(plugin.connect(medium))
    assert verdict is not None and (verdict.action, verdict.score) == (Action.ACCEPT, -2.0)


@pytest.mark.parametrize(
    "code,options",
    [("127.0.0.255", {"bitmask": 3}), ("127.0.0.255", {}), ("127.0.0.1", {"bitmask": 3})],
)
async def test_a_blocked_allow_list_allows_nobody(
    dns: DNSServer, resolver: Resolver, records: list[logging.LogRecord], code: str, options: dict[str, Any]
) -> None:
    """list.dnswl.org answers 127.0.0.255 to every query once it blocks the
    resolver (URIBL-style lists 127.0.0.1): an error, not an allow-listing
    that would let every client skip every check; counted by the breaker.
    Nor is it an answer for the client: the list might have let it in, so a
    block-list refusal is a 451, as when the list fails or is paused."""
    dns.add_zone("dnswl.test", f"* A {code}\n")
    plugin = make(resolver, {**BL, "dnswl.test": {"type": "allow", **options}}, delay_reject=False, pause_after=2)
    client = session("192.0.2.99")
    verdict = await settle(plugin.connect(client))
    deferred = Reply(451, "4.7.1", f"Service unavailable; Client host [192.0.2.99] blocked using bl.test; {REASON_99}")
    assert verdict is not None and verdict.action is Action.DEFER
    assert verdict.reply == deferred
    assert verdict.result == (
        f"dnsbl=listed bl.test:127.0.0.2 dnsbl=error dnswl.test:{code} (an allow list did not answer)")
    assert allowlisted(client) is None
    (warning,) = [r for r in records if r.levelno == logging.WARNING]
    assert warning.getMessage().startswith(f"zone dnswl.test answered {code} for 99.2.0.192.dnswl.test: {code}: ")
    # an error like the others: a second one in a row pauses the zone
    await settle(plugin.connect(session("192.0.2.1")))
    assert not plugin.entries[1].breaker.allows()
    # ... and the listed client gets the same reply while it is paused
    verdict = await settle(plugin.connect(session("192.0.2.99")))
    assert verdict is not None and verdict.reply == deferred


async def test_allow_list_as_a_score_only(resolver: Resolver) -> None:
    """Mapped to a score, an allow-list hit lowers the score and the block
    lists still count: for [scoring] policies."""
    plugin = make(resolver, {**BL, **WL}, actions={"allowed": -3, "listed": 5})
    client = session("192.0.2.96")
    verdict = await settle(plugin.connect(client))
    assert verdict is not None and (verdict.action, verdict.score) == (Action.CONTINUE, 2.0)
    assert allowlisted(client) is None


async def test_allow_list_rfc5782_test_point(resolver: Resolver) -> None:
    verdict = await settle(make(resolver, WL).connect(session("::ffff:7f00:2")))
    assert verdict is not None and verdict.action is Action.ACCEPT
    assert await settle(make(resolver, WL).connect(session("127.0.0.1"))) is None


# ----------------------------------------------------------------- domain lists


@pytest.mark.parametrize(
    "sender,is_listed",
    [
        ("bob@spam.example", True),
        ("bob@SPAM.example", True),
        ("x@test", True),  # RFC 5782 §5: TEST listed, INVALID not
        ("x@invalid", False),
        ("bob@example.org", False),
        ("", False),  # <> is never looked up
        ("bob@[192.0.2.1]", False),
    ],
)
async def test_rhsbl_on_sender(resolver: Resolver, sender: str, is_listed: bool) -> None:
    plugin = make(resolver, RHS)
    client = session("203.0.113.7")
    await settle(plugin.connect(client))
    env = envelope(sender)
    await settle(plugin.mail(client, env))
    verdict = plugin.rcpt(client, env, rcpt())
    assert (verdict is not None and verdict.refuses) is is_listed
    if sender == "bob@spam.example":
        assert verdict is not None and verdict.reply == Reply(
            554, "5.7.1", "Service unavailable; Sender address [spam.example] blocked using rhs.test; Spam domain"
        )
        assert verdict.result == "dnsbl=listed rhs.test:127.0.0.2 sender=spam.example"


async def test_a_listed_sender_scores_in_every_transaction(resolver: Resolver) -> None:
    # Scores live with their transaction: the second message's must not be 0.
    plugin = make(resolver, {"rhs.test": {"type": "rhs", "action": 3.0}})
    client = session("203.0.113.7")
    for _ in range(2):
        verdict = await settle(plugin.mail(client, envelope("bob@spam.example")))
        assert verdict is not None and (verdict.action, verdict.score) == (Action.CONTINUE, 3.0)


async def test_rhsbl_sender_refusal_belongs_to_its_transaction(resolver: Resolver) -> None:
    plugin = make(resolver, RHS)
    client = session("203.0.113.7")
    spam = envelope("bob@spam.example")
    await settle(plugin.mail(client, spam))
    assert plugin.rcpt(client, spam, rcpt()).refuses  # type: ignore[union-attr]
    clean = envelope("bob@example.org")
    await settle(plugin.mail(client, clean))
    assert plugin.rcpt(client, clean, rcpt()) is None


async def test_rhsbl_on_helo(dns: DNSServer, resolver: Resolver) -> None:
    plugin = make(resolver, RHS, delay_reject=False)
    verdict = await settle(plugin.helo(session("203.0.113.7"), "Bot.SpamHelo.example"))
    assert verdict is not None and verdict.reply == Reply(
        554, "5.7.1", "Service unavailable; Helo command [bot.spamhelo.example] blocked using rhs.test"
    )
    client = session("203.0.113.7")
    assert await settle(plugin.helo(client, "mail.example.org")) is None
    assert await settle(plugin.helo(client, "[192.0.2.1]")) is None
    assert await settle(plugin.helo(client, "192.0.2.1")) is None
    assert dns.query_count("1.2.0.192.rhs.test") == 0


async def test_rhsbl_domains_option(resolver: Resolver) -> None:
    plugin = make(resolver, {"rhs.test": {"type": "rhs", "domains": ["sender"]}}, delay_reject=False)
    client = session("203.0.113.7")
    assert await settle(plugin.helo(client, "bot.spamhelo.example")) is None
    assert (await settle(plugin.mail(client, envelope("a@spam.example")))).refuses  # type: ignore[union-attr]


HELO_LISTED = Reply(554, "5.7.1", "Service unavailable; Helo command [bot.spamhelo.example] blocked using rhs.test")


async def test_a_refused_helo_stays_refused(dns: DNSServer, resolver: Resolver) -> None:
    """As with the helo plugin: another name in a second HELO/EHLO gets the
    first refusal again, until XCLIENT (which clears session.results)."""
    plugin = make(resolver, RHS, delay_reject=False)
    client = session("203.0.113.7")
    first = await settle(plugin.helo(client, "bot.spamhelo.example"))
    assert first is not None and (first.action, first.reply) == (Action.REJECT, HELO_LISTED)
    for name in ("clean.example.org", "bot.spamhelo.example", "[192.0.2.1]"):
        again = await settle(plugin.helo(client, name))
        assert again is not None and (again.action, again.reply) == (Action.REJECT, HELO_LISTED)
        assert again.result == "dnsbl=listed rhs.test:127.0.0.2 helo=bot.spamhelo.example (repeated)"
    assert dns.query_count("clean.example.org.rhs.test") == 0
    assert len(client.results["dnsbl"].hits) == 1
    client.results.clear()  # XCLIENT: a new client identity
    assert await settle(plugin.helo(client, "clean.example.org")) is None


async def test_a_helo_refusal_held_for_rcpt_stays_held(resolver: Resolver) -> None:
    plugin = make(resolver, {"rhs.test": {"type": "rhs", "score": 2}})
    client = session("203.0.113.7")
    first = await settle(plugin.helo(client, "bot.spamhelo.example"))
    assert first is not None and (first.action, first.score) == (Action.CONTINUE, 2.0)
    assert first.result == "dnsbl=listed rhs.test:127.0.0.2 helo=bot.spamhelo.example (refused at RCPT)"
    env = envelope()
    for name in ("clean.example.org", "bot.spamhelo.example"):
        again = await settle(plugin.helo(client, name))
        # The same score: the gateway replaces the previous HELO's, so it
        # counts once (tests/e2e/test_dnsbl.py checks X-Spam-Status).
        assert again is not None and (again.action, again.score) == (Action.CONTINUE, 2.0)
        assert again.result == f"{first.result} (repeated)"
        await settle(plugin.mail(client, env))
        refused = plugin.rcpt(client, env, rcpt())
        assert refused is not None and (refused.action, refused.reply) == (Action.REJECT, HELO_LISTED)
    assert len(client.results["dnsbl"].hits) == 1


async def test_a_helo_listing_that_only_scores_scores_at_each_helo(resolver: Resolver) -> None:
    """Not refused, so not sticky: a new name is judged afresh.  The score
    of a repeated name goes out again, as the gateway replaces (not adds)
    what the previous HELO gave."""
    plugin = make(resolver, {"rhs.test": {"type": "rhs", "action": 2.0}})
    client = session("203.0.113.7")
    for _ in range(2):
        verdict = await settle(plugin.helo(client, "bot.spamhelo.example"))
        assert verdict is not None and (verdict.action, verdict.score) == (Action.CONTINUE, 2.0)
        assert verdict.result == "dnsbl=listed rhs.test:127.0.0.2 helo=bot.spamhelo.example"
    assert await settle(plugin.helo(client, "clean.example.org")) is None
    assert len(client.results["dnsbl"].hits) == 1


async def test_all_stages_in_one_session(resolver: Resolver) -> None:
    """Client, HELO and sender all listed: RCPT gives the client's reply
    (the first found), and the scores went out at each stage."""
    plugin = make(resolver, {"bl.test": {"score": 1}, "rhs.test": {"type": "rhs", "score": 1}})
    client = session("192.0.2.99")
    verdicts: list[Verdict | None] = [await settle(plugin.connect(client)), await settle(plugin.helo(client, "bot.spamhelo.example"))]
    env = envelope("a@spam.example")
    verdicts.append(await settle(plugin.mail(client, env)))
    assert [v.score for v in verdicts if v is not None] == [1.0, 1.0, 1.0]
    refused = plugin.rcpt(client, env, rcpt())
    assert refused is not None and refused.reply == listed("192.0.2.99", reason=f"; {REASON_99}")
    assert [h.identity for h in client.results["dnsbl"].hits] == ["client", "helo", "sender"]


def test_replies_are_well_formed() -> None:
    for reply in (LISTED, LOOKUP_FAILED):
        assert reply.enhanced[0] == str(reply.code)[0]
    assert LISTED.code == 554 and LISTED.enhanced == "5.7.1"


async def test_hook_runs_under_the_pipeline(dns: DNSServer, resolver: Resolver) -> None:
    """Through gateway.pipeline as the core calls it, next to another plugin."""
    from gateway.pipeline import run_stage
    from gateway.plugins import HookCall

    plugin = make(resolver, BL)
    calls = [HookCall("dnsbl", plugin.connect, ("session",), False)]
    verdict = await asyncio.wait_for(run_stage(calls, {"session": session("192.0.2.99")}, 5.0, "t"), 5)
    assert verdict.plugin == "dnsbl" and verdict.action is Action.CONTINUE


async def test_sessions_waiting_for_one_slow_query_count_it_once(dns: DNSServer) -> None:
    # The first session gives up after `timeout`; the query goes on, and
    # the next sessions wait for that same query: one failure, not three.
    dns.delay("bl.test", 1.5)
    resolver = Resolver([dns.nameserver], timeout=3.0)
    plugin = make(resolver, BL, timeout=0.3, pause_after=3, pause=300)
    for _ in range(3):
        verdict = await settle(plugin.connect(session("192.0.2.99")))
        assert verdict is not None and verdict.result == "dnsbl=tempfail bl.test"
    assert dns.query_count("99.2.0.192.bl.test", "A") == 1
    assert plugin.entries[0].breaker.allows() and plugin.entries[0].breaker.failures == 1


async def test_a_name_too_long_to_ask_proves_nothing_about_the_zone(
    dns: DNSServer, records: list[logging.LogRecord]
) -> None:
    # 252 octets: a valid name alone, too long with ".rhs.test" added. It
    # is no listing, and no probe of a paused zone either.
    dns.servfail("rhs.test", subtree=True)
    plugin = make(Resolver([dns.nameserver], timeout=0.5, tempfail_ttl=0), RHS, pause_after=2, pause=60)
    plugin.clock = clock = FakeClock()
    client = session("203.0.113.7")
    for name in ("a.example", "b.example"):
        await settle(plugin.helo(client, name))
    assert not plugin.entries[0].breaker.allows()
    clock.now += 60
    sent = dns.total_queries
    assert await settle(plugin.helo(client, ".".join(["a" * 63] * 3 + ["b" * 60]))) is None
    assert dns.total_queries == sent
    assert "zone rhs.test answers again; resumed" not in [r.getMessage() for r in records]
    assert plugin.entries[0].breaker.tripped  # the next real lookup is still the probe


async def test_a_listed_long_name_still_gets_a_reply_of_one_reply_line(dns: DNSServer, resolver: Resolver) -> None:
    # 240 octets of HELO name and 250 of TXT: the reason is cut to fit the
    # 512 octets of an SMTP reply line (RFC 5321 §4.5.3.1.5).
    dns.add_zone("rhs3.test", '* A 127.0.0.2\n* TXT "' + "A" * 250 + '"\n')
    plugin = make(resolver, {"rhs3.test": {"type": "rhs"}}, delay_reject=False)
    name = ".".join(["a" * 63] * 3 + ["b" * 40, "example"])
    verdict = await settle(plugin.helo(session("203.0.113.7"), name))
    assert verdict is not None and verdict.reply is not None
    assert len(verdict.reply.wire()) == 512
    assert verdict.reply.text.endswith("AAA...") and f"[{name}] blocked using rhs3.test; AAA" in verdict.reply.text


async def test_a_query_whose_asker_hung_up_is_still_counted(dns: DNSServer) -> None:
    # The gateway cancels the hook of a client that leaves; the query it
    # started goes on, and its failure still counts for the breaker.
    dns.timeout("bl.test")
    plugin = make(Resolver([dns.nameserver], timeout=1.0, tempfail_ttl=0), BL, timeout=2.0, pause_after=1,
                  delay_reject=False)
    first = asyncio.ensure_future(plugin.connect(session("192.0.2.99")))
    await asyncio.sleep(0.2)
    first.cancel()
    verdict = await plugin.connect(session("192.0.2.99"))
    assert verdict is not None and verdict.result.startswith("dnsbl=tempfail bl.test")
    assert not plugin.entries[0].breaker.allows()


# ------------------------------------------------------------- kept lookups


async def test_what_the_cache_said_is_kept_while_the_answers_hold(dns: DNSServer) -> None:
    clock = FakeClock()
    plugin = make(Resolver([dns.nameserver], timeout=0.5, clock=clock), BL, delay_reject=False)
    first = await settle(plugin.connect(session("192.0.2.99")))  # asked
    second = plugin.connect(session("192.0.2.99"))  # from the cache: kept
    assert isinstance(second, Verdict) and second == first and len(plugin._found) == 1
    ttl = min(plugin.resolver.cached(f"99.2.0.192.{zone}", rdtype).ttl  # type: ignore[union-attr]
              for zone, rdtype in (("bl.test", "A"), ("bl.test", "TXT")))
    clock.now += ttl - 0.5
    assert plugin._found.get(("client", "192.0.2.99", ("bl.test",))) is not None
    clock.now += 1.0
    assert plugin._found.get(("client", "192.0.2.99", ("bl.test",))) is None
    asked = dns.query_count("99.2.0.192.bl.test")
    assert await settle(plugin.connect(session("192.0.2.99"))) == first
    assert dns.query_count("99.2.0.192.bl.test") > asked  # the answers expired: asked again


async def test_a_paused_zone_is_not_answered_from_what_was_kept(dns: DNSServer, resolver: Resolver) -> None:
    plugin = make(resolver, BL, delay_reject=False)
    plugin.clock = FakeClock()
    await settle(plugin.connect(session("192.0.2.99")))
    assert plugin.connect(session("192.0.2.99")) is not None and len(plugin._found) == 1
    (entry,) = plugin.entries
    entry.breaker.paused_until = plugin.clock() + 60
    assert plugin.connect(session("192.0.2.99")) is None  # paused: no finding


async def test_kept_lookups_are_bounded(dns: DNSServer) -> None:
    plugin = make(Resolver([dns.nameserver], timeout=0.5, cache_size=2), BL, delay_reject=False)
    for ip in ("192.0.2.99", "192.0.2.98", "192.0.2.97"):
        await settle(plugin.connect(session(ip)))
        await settle(plugin.connect(session(ip)))
    assert len(plugin._found) <= 2
