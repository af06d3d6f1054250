"""gateway.dns against the real loopback DNS server (tests/fixtures/dnsserver.py).

The server counts the queries it receives, so caching and de-duplication are
checked from the outside: what actually went over the wire.  Cache expiry
uses a fake clock instead of sleeping.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Awaitable
from typing import TypeVar

import dkim
import dkim.asyncsupport
import dns.message as dns_message  # aliased: the `dns` fixture shadows the package name
import dns.resolver as dns_resolver
import dns.rrset as dns_rrset
import pytest
import spf

from gateway import dns as gdns
from gateway.config import DNSSettings
from gateway.dns import (
    Answer, Resolver, ReverseDNS, Status, dkim_dnsfunc, dnsbl_name, reverse_name, spf_cached, spf_check,
    _query_key,
)
from tests.fixtures.clock import FakeClock
from tests.fixtures.dkimkeys import keypair
from tests.fixtures.dnsserver import DNSServer, dns, dns_server  # noqa: F401

T = TypeVar("T")


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def resolver(dns: DNSServer, clock: FakeClock) -> Resolver:
    return Resolver([dns.nameserver], timeout=1.0, clock=clock)


async def timed(awaitable: Awaitable[T]) -> tuple[T, float]:
    started = time.monotonic()
    result = await awaitable
    return result, time.monotonic() - started


# ------------------------------------------------------------- each status


async def test_records(resolver: Resolver) -> None:
    answer = await resolver.query("host.test.example", "A")
    assert answer == Answer(Status.RECORDS, ("192.0.2.20",), 300)
    assert answer.ok and not answer.temporary and not answer.negative
    assert answer.rdata[0].to_text() == "192.0.2.20"


async def test_unicode_names_are_asked_by_idna2008(resolver: Resolver) -> None:
    answer = await resolver.query("Straße.mail.test", "MX")
    assert answer.status is Status.RECORDS and answer.records == ("10 good.mail.test.",)


async def test_txt_strings_are_joined_and_kept(resolver: Resolver) -> None:
    answer = await resolver.txt("multi.test.example")
    assert answer.records == ("onetwo",)
    assert answer.rdata[0].strings == (b"one", b"two")  # type: ignore[attr-defined]


async def test_txt_is_decoded_as_utf8_with_replacement(resolver: Resolver, dns: DNSServer) -> None:
    dns.add_zone("txt.test", 'ok IN TXT "caf\\195\\169"\nbad IN TXT "x\\255y"')
    assert (await resolver.txt("ok.txt.test")).records == ("café",)
    bad = await resolver.txt("bad.txt.test")
    assert bad.records == ("x\ufffdy",) and bad.rdata[0].strings == (b"x\xffy",)  # type: ignore[attr-defined]


async def test_nxdomain_with_negative_ttl_from_soa(resolver: Resolver) -> None:
    answer = await resolver.query("nothing.test.example", "A")
    assert answer == Answer(Status.NXDOMAIN, (), 60)
    assert answer.negative


@pytest.mark.parametrize("name, rdtype", [("v6only.test.example", "A"), ("ent.test.example", "A")])
async def test_nodata(resolver: Resolver, name: str, rdtype: str) -> None:
    assert await resolver.query(name, rdtype) == Answer(Status.NODATA, (), 60)


async def test_cname_is_followed_with_the_smallest_ttl(resolver: Resolver) -> None:
    assert await resolver.query("alias2.test.example", "A") == Answer(Status.RECORDS, ("192.0.2.20",), 60)
    assert (await resolver.query("dangling.test.example", "A")).status is Status.NXDOMAIN


@pytest.mark.parametrize("fault", ["servfail", "refused", "outside"])
async def test_tempfail(resolver: Resolver, dns: DNSServer, fault: str) -> None:
    name = "www.example.net" if fault == "outside" else "host.test.example"
    if fault != "outside":
        getattr(dns, fault)(name)
    answer = await resolver.query(name, "A")
    assert answer.status is Status.TEMPFAIL and answer.temporary
    assert ("REFUSED" if fault != "servfail" else "SERVFAIL") in answer.error


# What a recursive resolver says of a name with no data, or none at all,
# comes with the SOA of a zone above the name (RFC 2308).  An answer that
# holds only another name's records, or a CNAME and nothing of its target,
# says nothing of the name: dnspython reads it as "no data", and a sender
# domain was refused as not found (550) for a server's fault.
@pytest.mark.parametrize(("rdtype", "why"), [
    ("MX", "answer for test.example. instead of good.mail.test."),  # the MX records of another name
    ("A", "answer for test.example. instead of good.mail.test."),
    ("AAAA", "negative answer with the SOA of test.example., not of a zone above good.mail.test."),
])
async def test_an_answer_for_another_name_is_tempfail(resolver: Resolver, dns: DNSServer, rdtype: str, why: str) -> None:
    dns.answer_for("good.mail.test", "test.example")
    assert await resolver.query("good.mail.test", rdtype) == Answer(Status.TEMPFAIL, error=why)


async def test_a_negative_answer_for_another_name_is_tempfail(resolver: Resolver, dns: DNSServer) -> None:
    dns.answer_for("good.mail.test", "nothing.test.example")  # NXDOMAIN, with test.example's SOA
    assert await resolver.query("good.mail.test", "MX") == Answer(
        Status.TEMPFAIL, error="negative answer with the SOA of test.example., not of a zone above good.mail.test.")


async def test_a_cname_chain_that_ends_without_an_answer_is_tempfail(resolver: Resolver, dns: DNSServer) -> None:
    # The target is in no zone served here: the server gives the CNAME alone,
    # as a resolver that did not (or could not) follow it would.
    dns.add_zone("broken.test", "www IN CNAME www.unserved.example.\n")
    for rdtype in ("MX", "A", "AAAA"):
        assert await resolver.query("www.broken.test", rdtype) == Answer(
            Status.TEMPFAIL, error="CNAME chain ends at www.unserved.example. without an answer")
    # A chain that ends in a name without data, said with its zone's SOA, is NODATA.
    assert await resolver.query("outside.test.example", "MX") == Answer(Status.NODATA, ttl=120)


def test_a_negative_answer_through_a_dname_is_about_the_name() -> None:
    # The loopback server does not synthesise DNAMEs (RFC 6672): a response
    # as a resolver gives it, where the DNAME's owner is above the chain.
    query = dns_message.make_query("a.old.example", "MX")
    response = dns_message.make_response(query)
    response.answer.append(dns_rrset.from_text("old.example.", 300, "IN", "DNAME", "new.example."))
    response.answer.append(dns_rrset.from_text("a.old.example.", 300, "IN", "CNAME", "a.new.example."))
    response.authority.append(dns_rrset.from_text("new.example.", 300, "IN", "SOA", "ns.new.example. h.new.example. 1 2 3 4 60"))
    response = dns_message.from_wire(response.to_wire())  # as it arrives, indexed
    assert gdns._not_about(response, query.question[0].name) is None


@pytest.mark.parametrize("broken", ["answer_for", "cname"])
async def test_a_server_answering_another_name_defers_a_sender_not_refuses_it(
    resolver: Resolver, dns: DNSServer, broken: str,
) -> None:
    from plugins.sender import Finding, lookup_domain

    if broken == "answer_for":
        dns.answer_for("good.mail.test", "test.example")
        domain = "good.mail.test"
    else:
        dns.add_zone("broken.test", "www IN CNAME www.unserved.example.\n")
        domain = "www.broken.test"
    assert await lookup_domain(resolver, domain) is Finding.TEMPFAIL  # not NOT_FOUND: 450, not 550


async def test_timeout_is_tempfail_within_the_timeout(dns: DNSServer) -> None:
    dns.timeout("other.example")
    resolver = Resolver([dns.nameserver], timeout=0.5)
    answer, elapsed = await timed(resolver.query("www.other.example", "A"))
    assert answer.status is Status.TEMPFAIL and "timeout" in answer.error
    assert 0.45 <= elapsed < 2.0  # the limit, not dnspython's own 5 s


async def test_a_silent_first_nameserver_leaves_time_for_the_second(dns: DNSServer) -> None:
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # bound, never answers
    silent.bind(("127.0.0.1", 0))
    try:
        resolver = Resolver([f"127.0.0.1:{silent.getsockname()[1]}", dns.nameserver], timeout=1.0)
        answer, elapsed = await timed(resolver.query("host.test.example", "A"))
    finally:
        silent.close()
    assert answer.status is Status.RECORDS and answer.records == ("192.0.2.20",)
    assert 0.45 <= elapsed < 2.0


async def test_big_answer_falls_back_to_tcp(resolver: Resolver, dns: DNSServer) -> None:
    answer = await resolver.txt("big.test.example")
    assert answer.ok and len(answer.records) == 8
    assert dns.query_count("big.test.example", "TXT") == 2  # UDP (truncated), then TCP


async def test_invalid_names_are_nxdomain_without_a_query(resolver: Resolver, dns: DNSServer) -> None:
    for name in ("a..test.example", "x" * 64 + ".test.example"):
        answer = await resolver.query(name, "A")
        assert answer.status is Status.NXDOMAIN and "invalid name" in answer.error
    assert dns.total_queries == 0


async def test_unknown_type_is_a_programming_error(resolver: Resolver) -> None:
    with pytest.raises(ValueError):
        await resolver.query("host.test.example", "NOSUCHTYPE")


# ------------------------------------------------------------------- cache


async def test_positive_cache_honours_ttl(resolver: Resolver, dns: DNSServer, clock: FakeClock) -> None:
    await resolver.query("short.test.example", "A")  # TTL 30
    clock.now += 20
    again = await resolver.query("Short.Test.Example.", "A")
    assert again.ttl == 10  # the remaining time
    assert dns.query_count("short.test.example", "A") == 1
    clock.now += 11
    assert (await resolver.query("short.test.example", "A")).ttl == 30
    assert dns.query_count("short.test.example", "A") == 2
    assert resolver.stats.hits == 1


async def test_zero_ttl_is_not_cached(resolver: Resolver, dns: DNSServer) -> None:
    for _ in range(2):
        assert (await resolver.query("zero.test.example", "A")).ok
    assert dns.query_count("zero.test.example", "A") == 2


@pytest.mark.parametrize("name, rdtype", [("nothing.test.example", "A"), ("v6only.test.example", "A")])
async def test_negative_cache_by_soa_minimum(
    resolver: Resolver, dns: DNSServer, clock: FakeClock, name: str, rdtype: str
) -> None:
    first = await resolver.query(name, rdtype)
    clock.now += 59
    assert await resolver.query(name, rdtype) == Answer(first.status, (), 1)
    assert dns.query_count(name, rdtype) == 1
    clock.now += 2
    await resolver.query(name, rdtype)
    assert dns.query_count(name, rdtype) == 2


def test_negative_answer_without_soa_is_not_cached() -> None:
    response = dns_message.make_response(dns_message.make_query("x.example", "A"))
    assert gdns._negative_ttl(response) == 0


async def test_tempfail_is_cached_briefly(resolver: Resolver, dns: DNSServer, clock: FakeClock) -> None:
    dns.servfail("host.test.example")
    assert (await resolver.query("host.test.example", "A")).temporary
    assert (await resolver.query("host.test.example", "A")).temporary
    assert dns.query_count("host.test.example", "A") == 1
    dns.reset_faults()
    clock.now += gdns.TEMPFAIL_TTL + 0.1
    assert (await resolver.query("host.test.example", "A")).ok
    assert dns.query_count("host.test.example", "A") == 2


async def test_tempfail_caching_can_be_disabled(dns: DNSServer) -> None:
    dns.servfail("host.test.example")
    resolver = Resolver([dns.nameserver], timeout=1.0, tempfail_ttl=0)
    for _ in range(2):
        await resolver.query("host.test.example", "A")
    assert dns.query_count("host.test.example", "A") == 2


async def test_cache_is_bounded_lru(dns: DNSServer) -> None:
    resolver = Resolver([dns.nameserver], timeout=1.0, cache_size=2)
    for name in ("host", "mx1", "host", "mx2"):  # "host" used again: mx1 is the oldest
        await resolver.query(f"{name}.test.example", "A")
    assert resolver.stats.size == 2
    await resolver.query("host.test.example", "A")
    await resolver.query("mx1.test.example", "A")
    assert dns.query_count("host.test.example", "A") == 1
    assert dns.query_count("mx1.test.example", "A") == 2


async def test_cache_is_bounded_in_bytes_too(dns: DNSServer) -> None:
    # Whoever runs a domain chooses how big its answers are: 10,000 entries
    # of 4,000 A records each would be 6 GiB.  The oldest go first.
    dns.add_zone("big.test", "\n".join(f"n{j} IN A 10.0.{i // 256}.{i % 256}" for j in range(8) for i in range(300)))
    resolver = Resolver([dns.nameserver], timeout=5.0, cache_bytes=300_000)
    for j in range(8):
        assert len((await resolver.query(f"n{j}.big.test", "A")).records) == 300
    assert 1 < resolver.stats.size < 8
    assert sum(gdns._weight(entry[1]) for entry in resolver._cache.values()) <= 300_000
    asked = dns.total_queries
    await resolver.query("n7.big.test", "A")  # the newest: still cached
    assert dns.total_queries == asked
    await resolver.query("n0.big.test", "A")  # the oldest: gone
    assert dns.total_queries > asked
    # One answer larger than the whole budget is not kept at all.
    small = Resolver([dns.nameserver], timeout=5.0, cache_bytes=10_000)
    await small.query("n1.big.test", "A")
    assert small.stats.size == 0


def test_a_cache_entry_weighs_about_what_it_takes() -> None:
    import dns.rdata as dns_rdata
    import tracemalloc

    def answer() -> gdns.Answer:
        rdata = tuple(dns_rdata.from_text("IN", "A", f"10.0.{i // 256}.{i % 256}") for i in range(1000))
        return gdns.Answer(gdns.Status.RECORDS, tuple(rd.to_text() for rd in rdata), 300, rdata)

    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        made = answer()
        used = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert used / 2 <= gdns._weight(made) <= used * 2


async def test_cache_size_zero_disables_caching(dns: DNSServer) -> None:
    resolver = Resolver([dns.nameserver], timeout=1.0, cache_size=0)
    for _ in range(2):
        await resolver.query("host.test.example", "A")
    assert dns.query_count("host.test.example", "A") == 2


# ---------------------------------------------------------- de-duplication


async def test_concurrent_identical_queries_send_one(resolver: Resolver, dns: DNSServer) -> None:
    dns.delay("test.example", 0.1)  # keep the first query in flight while the others arrive
    answers = await asyncio.gather(*(resolver.query("host.test.example", "A") for _ in range(100)))
    assert {a.records for a in answers} == {("192.0.2.20",)}
    assert dns.query_count("host.test.example", "A") == 1
    assert resolver.stats.coalesced == 99


async def test_cancelled_waiter_does_not_cancel_the_others(resolver: Resolver, dns: DNSServer) -> None:
    dns.delay("test.example", 0.2)
    first = asyncio.create_task(resolver.query("host.test.example", "A"))
    second = asyncio.create_task(resolver.query("host.test.example", "A"))
    await asyncio.sleep(0.05)
    first.cancel()
    assert (await second).ok
    assert first.cancelled()
    assert dns.query_count("host.test.example", "A") == 1


async def test_slow_zone_does_not_delay_another(resolver: Resolver, dns: DNSServer) -> None:
    dns.delay("test.example", 0.5)
    (slow, slow_time), (fast, fast_time) = await asyncio.gather(
        timed(resolver.query("host.test.example", "A")), timed(resolver.query("www.other.example", "A"))
    )
    assert slow.ok and fast.ok
    assert slow_time >= 0.45
    assert fast_time < 0.2


async def test_cached_peeks_without_asking(resolver: Resolver, dns: DNSServer, clock: FakeClock) -> None:
    assert resolver.cached("host.test.example", "A") is None
    assert not resolver.is_cached("host.test.example", "A")
    assert dns.query_count("host.test.example", "A") == 0  # a peek never asks
    asked = await resolver.query("host.test.example", "A")
    assert resolver.cached("HOST.test.example.", "A") == asked
    assert resolver.is_cached("host.test.example", "A")
    assert not resolver.is_cached("host.test.example", "A", "AAAA")
    assert not resolver.is_cached("bad..name", "A")
    clock.now += 301  # past the TTL
    assert resolver.cached("host.test.example", "A") is None
    assert not resolver.is_cached("host.test.example", "A")


async def test_query_all_asks_only_for_what_the_cache_lacks(resolver: Resolver, dns: DNSServer) -> None:
    await resolver.query("host.test.example", "A")
    answers = await resolver.query_all(
        [("host.test.example", "A"), ("host.test.example", "AAAA"), ("nothing.test.example", "A"), ("bad..name", "A")]
    )
    assert [a.status for a in answers] == [Status.RECORDS, Status.RECORDS, Status.NXDOMAIN, Status.NXDOMAIN]
    assert answers[1].records == ("2001:db8::20",)
    assert dns.query_count("host.test.example", "A") == 1
    assert dns.query_count("host.test.example", "AAAA") == 1
    again = await resolver.query_all([("host.test.example", "AAAA"), ("nothing.test.example", "A")])
    assert again == answers[1:3]
    assert dns.query_count("host.test.example", "AAAA") == 1 and dns.query_count("nothing.test.example", "A") == 1


# ----------------------------------------------------------------- helpers


async def test_a_aaaa(resolver: Resolver, dns: DNSServer) -> None:
    both = await resolver.a_aaaa("host.test.example")
    assert both.status is Status.RECORDS and both.records == ("192.0.2.20", "2001:db8::20")
    assert (await resolver.a_aaaa("v6only.test.example")).records == ("2001:db8::21",)
    assert (await resolver.a_aaaa("nothing.test.example")).status is Status.NXDOMAIN
    assert (await resolver.a_aaaa("ent.test.example")).status is Status.NODATA
    dns.servfail("mx1.test.example")
    assert (await resolver.a_aaaa("mx1.test.example")).temporary


async def test_mx_sorted_by_preference(resolver: Resolver, dns: DNSServer) -> None:
    answer = await resolver.mx("test.example")
    assert answer.records == ("10 mx1.test.example.", "20 mx2.test.example.")
    assert [rd.preference for rd in answer.rdata] == [10, 20]  # type: ignore[attr-defined]
    dns.add_zone("nullmx.test", "@ IN MX 0 .")
    assert (await resolver.mx("nullmx.test")).records == ("0 .",)


@pytest.mark.parametrize("ip", ["192.0.2.20", "::ffff:192.0.2.20"])
async def test_ptr_ipv4(resolver: Resolver, dns: DNSServer, ip: str) -> None:
    dns.add_zone("2.0.192.in-addr.arpa", "20 IN PTR host.test.example.")
    assert (await resolver.ptr(ip)).records == ("host.test.example.",)


async def test_ptr_ipv6_nibbles(resolver: Resolver, dns: DNSServer) -> None:
    dns.add_zone("8.b.d.0.1.0.0.2.ip6.arpa", "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0 IN PTR v6.test.example.")
    assert (await resolver.ptr("2001:db8::1")).records == ("v6.test.example.",)


def test_reverse_and_dnsbl_names() -> None:
    assert reverse_name("192.0.2.99") == "99.2.0.192.in-addr.arpa"
    assert reverse_name("::ffff:192.0.2.99") == "99.2.0.192.in-addr.arpa"
    assert dnsbl_name("192.0.2.99", "dnsbl.example.") == "99.2.0.192.dnsbl.example"
    # RFC 5782 section 2.4's example
    assert dnsbl_name("2001:DB8:1:2:3:4:567:89AB", "ugly.example.com") == (
        "b.a.9.8.7.6.5.0.4.0.0.0.3.0.0.0.2.0.0.0.1.0.0.0.8.b.d.0.1.0.0.2.ugly.example.com"
    )
    assert reverse_name("2001:db8::1").endswith(".8.b.d.0.1.0.0.2.ip6.arpa")
    with pytest.raises(ValueError):
        reverse_name("not-an-ip")


async def test_dnsbl_lookup_ipv6(resolver: Resolver, dns: DNSServer) -> None:
    listed = "2001:db8:1:2:3:4:567:89ab"
    dns.add_zone("dnsbl.test", f"{dnsbl_name(listed, 'dnsbl.test.')}. IN A 127.0.0.2")
    assert (await resolver.query(dnsbl_name(listed, "dnsbl.test"), "A")).records == ("127.0.0.2",)
    assert (await resolver.query(dnsbl_name("2001:db8::2", "dnsbl.test"), "A")).status is Status.NXDOMAIN


@pytest.mark.parametrize(
    "text, address, port",
    [
        ("127.0.0.1", "127.0.0.1", 53),
        ("127.0.0.1:5353", "127.0.0.1", 5353),
        ("::1", "::1", 53),
        ("[::1]", "::1", 53),
        ("[::1]:5353", "::1", 5353),
    ],
)
def test_nameserver_forms(text: str, address: str, port: int) -> None:
    server = gdns._parse_nameserver(text)
    assert (server.address, server.port) == (address, port)
    assert DNSSettings(nameservers=(text,)).check() == {}  # lint takes what the resolver takes


@pytest.mark.parametrize("text", ["ns.example.com", "127.0.0.1:0", "[::1]x", "1.2.3.4:99999"])
def test_bad_nameservers(text: str) -> None:
    with pytest.raises(ValueError):
        Resolver([text])



@pytest.mark.parametrize("why", ["no nameservers", "cannot open /etc/resolv.conf"])
def test_a_system_without_nameservers_means_the_local_one(monkeypatch, caplog, why: str) -> None:
    # As the C library's resolver takes it (resolv.conf(5)).  dnspython
    # raised instead, so every worker of an empty [dns] died as it started,
    # and was replaced, and died, while serve had said it was listening.
    def unconfigured(self, filename="/etc/resolv.conf"):
        raise dns_resolver.NoResolverConfiguration(why)

    monkeypatch.setattr(dns_resolver.BaseResolver, "read_resolv_conf", unconfigured)
    with caplog.at_level(logging.WARNING, "smtpgate"):
        resolver = Resolver([], timeout=2.0)
    assert resolver._dns.nameservers == ["127.0.0.1"]
    assert resolver._dns.timeout == 2.0
    assert caplog.messages == [f"the system names no DNS server ({why}): asking 127.0.0.1, as the C library does"]


# -------------------------------------------------------------------- DKIM


@pytest.fixture(scope="module")
def rsa_key() -> tuple[bytes, str]:
    """(private key PEM, public key base64) generated for this test run."""
    return keypair()


MESSAGE = (
    b"From: Alice <alice@dkim.test>\r\nTo: bob@example.com\r\nSubject: hello\r\n"
    b"Date: Mon, 01 Jan 2024 00:00:00 +0000\r\nMessage-ID: <1@dkim.test>\r\n\r\nHi Bob.\r\n"
)


def publish_key(dns: DNSServer, public_b64: str, selector: str = "s1") -> None:
    """The key as one TXT record in 255-byte strings, the way big keys are published."""
    record = f"v=DKIM1; k=rsa; p={public_b64}"
    strings = " ".join(f'"{record[i : i + 255]}"' for i in range(0, len(record), 255))
    dns.add_zone("dkim.test", f"{selector}._domainkey IN TXT {strings}")


def sign(pem: bytes, selector: str = "s1") -> bytes:
    headers = [b"from", b"to", b"subject"]
    signature: bytes = dkim.sign(MESSAGE, selector.encode(), b"dkim.test", pem, include_headers=headers)
    return signature + MESSAGE


async def test_dkim_verify_pass(resolver: Resolver, dns: DNSServer, rsa_key: tuple[bytes, str]) -> None:
    pem, public = rsa_key
    publish_key(dns, public)
    assert await dkim.asyncsupport.verify_async(sign(pem), dnsfunc=dkim_dnsfunc(resolver))


async def test_dkim_verify_fails_on_tampered_body(
    resolver: Resolver, dns: DNSServer, rsa_key: tuple[bytes, str]
) -> None:
    pem, public = rsa_key
    publish_key(dns, public)
    tampered = sign(pem).replace(b"Hi Bob.", b"Hi Eve.")
    assert not await dkim.asyncsupport.verify_async(tampered, dnsfunc=dkim_dnsfunc(resolver))


async def test_dkim_missing_key(resolver: Resolver, dns: DNSServer, rsa_key: tuple[bytes, str]) -> None:
    pem, public = rsa_key
    publish_key(dns, public, selector="s1")
    dnsfunc = dkim_dnsfunc(resolver)
    assert await dnsfunc(b"s2._domainkey.dkim.test.") is None
    assert not await dkim.asyncsupport.verify_async(sign(pem, selector="s2"), dnsfunc=dnsfunc)


async def test_dkim_tempfail_raises_dns_error(resolver: Resolver, dns: DNSServer, rsa_key: tuple[bytes, str]) -> None:
    pem, public = rsa_key
    publish_key(dns, public)
    dns.servfail("s1._domainkey.dkim.test")
    dnsfunc = dkim_dnsfunc(resolver)
    with pytest.raises(dkim.DnsTimeoutError):
        await dnsfunc(b"s1._domainkey.dkim.test.")
    assert not await dkim.asyncsupport.verify_async(sign(pem), dnsfunc=dnsfunc)



async def test_dkim_key_lookups_get_the_dns_timeout_of_the_policy(dns: DNSServer, rsa_key: tuple[bytes, str]) -> None:
    # [dns] timeout is every check's; the dkim plugin asks without a
    # timeout of its own, and once got dkimpy's default of 5 s instead:
    # temperror for a key that arrived in 5.5 s, within the policy's 8.
    _, public = rsa_key
    publish_key(dns, public)
    dns.delay("dkim.test", 5.5)
    (record, took) = await timed(dkim_dnsfunc(Resolver([dns.nameserver], timeout=8.0))(b"s1._domainkey.dkim.test."))
    assert record is not None and record.startswith(b"v=DKIM1;") and took >= 5.4

async def test_dkim_key_from_zone_file(resolver: Resolver) -> None:
    record = await dkim_dnsfunc(resolver)(b"sel._domainkey.test.example.")
    assert record is not None and record.startswith(b"v=DKIM1;")
    _, keysize, ktag, _ = dkim.evaluate_pk(b"sel._domainkey.test.example.", record)
    assert (keysize, ktag) == (2048, b"rsa")


async def test_dkim_dnsfunc_accepts_str(resolver: Resolver) -> None:
    assert await dkim_dnsfunc(resolver)("txt.test.example") == b"hello world"


# --------------------------------------------------------------------- SPF


@pytest.mark.parametrize(
    "ip, sender, expected",
    [
        ("192.0.2.5", "a@strict.spf.example", "pass"),
        ("198.51.100.5", "a@strict.spf.example", "fail"),
        ("198.51.100.5", "a@soft.spf.example", "softfail"),
        ("198.51.100.5", "a@neutral.spf.example", "neutral"),
        ("192.0.2.5", "a@none.spf.example", "none"),
        ("192.0.2.5", "a@nonexistent.spf.example", "none"),
        ("192.0.2.5", "a@include.spf.example", "pass"),
        ("198.51.100.5", "a@include.spf.example", "fail"),
        ("192.0.2.5", "a@redirect.spf.example", "pass"),
        ("198.51.100.5", "a@redirect.spf.example", "softfail"),
        ("203.0.113.26", "a@mx.spf.example", "pass"),
        ("203.0.113.27", "a@mx.spf.example", "fail"),
        ("203.0.113.30", "a@a.spf.example", "pass"),
        ("2001:db8::25", "a@a.spf.example", "pass"),
        ("::ffff:203.0.113.30", "a@a.spf.example", "pass"),
        ("2001:db8::26", "a@a.spf.example", "fail"),
        ("1.2.3.4", "a@exists.spf.example", "pass"),
        ("1.2.3.5", "a@exists.spf.example", "fail"),
        ("192.0.2.5", "a@long.spf.example", "pass"),
        ("192.0.2.5", "a@badinc.spf.example", "permerror"),
        ("192.0.2.5", "a@syntax.spf.example", "permerror"),
        ("192.0.2.5", "a@two.spf.example", "permerror"),
        ("not-an-ip", "a@strict.spf.example", "permerror"),
    ],
)
async def test_spf_results(resolver: Resolver, ip: str, sender: str, expected: str) -> None:
    result, _ = await spf_check(resolver, ip, sender, "helo.example")
    assert result == expected


async def test_spf_explanation_is_expanded(resolver: Resolver) -> None:
    assert await spf_check(resolver, "198.51.100.5", "a@strict.spf.example", "helo.example") == (
        "fail",
        "198.51.100.5 is not allowed to send for strict.spf.example",
    )


@pytest.mark.parametrize("local", ['"a@elsewhere.example"', '"a@b"', '"@"'])
async def test_spf_domain_is_the_part_after_the_last_at(resolver: Resolver, local: str) -> None:
    # A quoted local part may hold "@" (RFC 5321 §4.1.2); pyspf alone splits
    # at the first one and would judge a name the sender's domain never
    # published.  The explanation expands %{d}: the domain evaluated.
    sender = f"{local}@strict.spf.example"
    assert await spf_check(resolver, "198.51.100.5", sender, "helo.example") == (
        "fail",
        "198.51.100.5 is not allowed to send for strict.spf.example",
    )
    assert (await spf_check(resolver, "192.0.2.5", sender, "helo.example"))[0] == "pass"
    # The result cache, keyed by the whole sender, hands back the same verdict.
    assert spf_cached(resolver, "198.51.100.5", sender, "helo.example") == (
        "fail",
        "198.51.100.5 is not allowed to send for strict.spf.example",
    )


async def test_spf_helo_identity_for_bounces(resolver: Resolver) -> None:
    assert (await spf_check(resolver, "192.0.2.5", "", "strict.spf.example"))[0] == "pass"


async def test_spf_ptr_mechanism(resolver: Resolver, dns: DNSServer) -> None:
    dns.add_zone("2.0.192.in-addr.arpa", "77 IN PTR named.spf.example.\n78 IN PTR elsewhere.test.example.")
    assert (await spf_check(resolver, "192.0.2.77", "a@ptr.spf.example", "h"))[0] == "pass"
    assert (await spf_check(resolver, "192.0.2.78", "a@ptr.spf.example", "h"))[0] == "fail"


@pytest.mark.parametrize("broken", ["strict.spf.example", "broken.spf.example"])
async def test_spf_servfail_is_temperror(resolver: Resolver, dns: DNSServer, broken: str) -> None:
    dns.servfail(broken)
    sender = "a@strict.spf.example" if broken.startswith("strict") else "a@tempinc.spf.example"
    result, explanation = await spf_check(resolver, "192.0.2.5", sender, "h")
    assert result == "temperror" and "SERVFAIL" in explanation


async def test_spf_timeout_is_temperror_within_bound(dns: DNSServer) -> None:
    dns.timeout("strict.spf.example")
    resolver = Resolver([dns.nameserver], timeout=0.3)
    (result, _), elapsed = await timed(spf_check(resolver, "192.0.2.5", "a@strict.spf.example", "h"))
    assert result == "temperror"
    assert elapsed < 3.0  # our limit, not pyspf's 20 s


async def test_spf_shares_the_resolver_cache(resolver: Resolver, dns: DNSServer) -> None:
    results = await asyncio.gather(*(spf_check(resolver, "192.0.2.5", "a@include.spf.example", "h") for _ in range(20)))
    assert {r for r, _ in results} == {"pass"}
    await spf_check(resolver, "192.0.2.5", "a@include.spf.example", "h")
    assert dns.query_count("include.spf.example", "TXT") == 1
    assert dns.query_count("strict.spf.example", "TXT") == 1
    assert (await resolver.txt("strict.spf.example")).ok
    assert dns.query_count("strict.spf.example", "TXT") == 1


async def test_one_client_cannot_hold_every_spf_thread(dns: DNSServer) -> None:
    # Its checks wait on DNS answers held back (its own slow zones, say):
    # past its share of the pool its next check waits for one of its own
    # to finish, while another client's check starts at once.
    dns.hold("spf.example")
    resolver = Resolver([dns.nameserver], timeout=10.0)
    share = gdns._SPF_PER_CLIENT
    busy = [asyncio.ensure_future(spf_check(resolver, "192.0.2.5", f"a@c{i}.spf.example", "h")) for i in range(share + 1)]
    other = asyncio.ensure_future(spf_check(resolver, "192.0.2.6", "a@other.spf.example", "h"))
    await dns.asked(*((f"c{i}.spf.example", "TXT") for i in range(share)), ("other.spf.example", "TXT"))
    assert dns.query_count(f"c{share}.spf.example") == 0
    assert resolver._spf_slots["192.0.2.5"].users == share + 1
    dns.release()
    assert {result for result, _ in await asyncio.gather(*busy, other)} == {"none"}
    assert dns.query_count(f"c{share}.spf.example", "TXT") == 1
    assert resolver._spf_slots == {}  # shares are not kept for clients gone


async def test_a_cancelled_spf_check_keeps_its_share_until_its_thread_is_done(dns: DNSServer) -> None:
    dns.hold("spf.example")
    resolver = Resolver([dns.nameserver], timeout=10.0)
    check = asyncio.ensure_future(spf_check(resolver, "192.0.2.5", "a@c0.spf.example", "h"))
    await dns.asked(("c0.spf.example", "TXT"))
    check.cancel()  # the client left; pyspf's thread still waits for its answer
    with pytest.raises(asyncio.CancelledError):
        await check
    assert resolver._spf_slots["192.0.2.5"].users == 1
    dns.release()
    for _ in range(500):  # bounded: the thread ends once its answer arrives
        if not resolver._spf_slots:
            break
        await asyncio.sleep(0.01)
    assert resolver._spf_slots == {}


async def test_spf_router_is_inactive_outside_spf_check(resolver: Resolver) -> None:
    await spf_check(resolver, "192.0.2.5", "a@strict.spf.example", "h")
    assert spf.DNSLookup is gdns._spf_router
    assert gdns._SPF_LOOKUP.get() is None


async def test_an_answer_later_than_two_seconds_is_still_read(dns_server: DNSServer) -> None:
    # dnspython's retries would drop it; one try per lookup keeps it.
    dns_server.delay("other.example.", 2.3)
    try:
        resolver = Resolver([dns_server.nameserver], timeout=4.0)
        answer = await resolver.query("www.other.example", "A")
    finally:
        dns_server.reset_faults()
    assert answer.status is Status.RECORDS


async def test_spf_results_are_reused_for_a_minute(resolver: Resolver, dns: DNSServer, clock: FakeClock) -> None:
    first = await spf_check(resolver, "198.51.100.5", "a@strict.spf.example", "helo.example")
    sent = dns.total_queries
    resolver._cache.clear()  # DNS answers gone: only the result cache can answer
    assert await spf_check(resolver, "198.51.100.5", "A@STRICT.SPF.EXAMPLE", "HELO.example") == first
    assert dns.total_queries == sent
    clock.now += 61
    assert await spf_check(resolver, "198.51.100.5", "a@strict.spf.example", "helo.example") == first
    assert dns.total_queries > sent


async def test_spf_results_last_no_longer_than_their_records(resolver: Resolver, dns: DNSServer, clock: FakeClock) -> None:
    dns.add_zone("shortttl.example", (
        "$TTL 20\n@ IN SOA ns.shortttl.example. h.shortttl.example. 1 60 60 60 20\n"
        '@ IN TXT "v=spf1 ip4:198.51.100.0/24 -all"\n'
    ))
    try:
        assert (await spf_check(resolver, "198.51.100.5", "a@shortttl.example", "h.example"))[0] == "pass"
        clock.now += 15
        assert spf_cached(resolver, "198.51.100.5", "a@shortttl.example", "h.example") == ("pass", "sender SPF authorized")
        clock.now += 6  # the TXT record (TTL 20) is gone, and so is the result made of it
        assert spf_cached(resolver, "198.51.100.5", "a@shortttl.example", "h.example") is None
    finally:
        dns.remove_runtime_zones()


async def test_spf_temperror_is_not_reused(resolver: Resolver, dns: DNSServer, clock: FakeClock) -> None:
    dns.servfail("strict.spf.example")
    assert (await spf_check(resolver, "198.51.100.5", "a@strict.spf.example", "h.example"))[0] == "temperror"
    dns.reset_faults()
    clock.now += 10  # past the resolver's short TEMPFAIL cache
    assert (await spf_check(resolver, "198.51.100.5", "a@strict.spf.example", "h.example"))[0] == "fail"


@pytest.mark.parametrize(("found", "names"), [
    (ReverseDNS(("mx.example", "b.example"), ("mx.example",), first="mx.example"), ("mx.example", "mx.example", False)),
    # Only the first PTR name counts, as in Postfix: another confirmed one does not.
    (ReverseDNS(("a.example", "b.example"), ("b.example",), first="a.example"), ("unknown", "a.example", False)),
    (ReverseDNS(("a.example", "b.example"), ("b.example",), unsure=("a.example",), first="a.example"),
     ("unknown", "a.example", True)),
    # A first name that is no host name: no name, whatever follows it.
    (ReverseDNS(("b.example",), ("b.example",), first="bad-.example"), ("unknown", "unknown", False)),
    (ReverseDNS(ptr_temporary=True), ("unknown", "unknown", True)),
    (ReverseDNS(), ("unknown", "unknown", False)),
])
def test_names_as_postfix_takes_them(found: ReverseDNS, names: tuple[str, str, bool]) -> None:
    assert found.as_postfix() == names


@pytest.mark.parametrize("error", [dns_resolver.YXDOMAIN, OSError, RuntimeError])
async def test_an_unexpected_resolver_failure_is_tempfail_not_nxdomain(
    resolver: Resolver, monkeypatch: pytest.MonkeyPatch, error: type[Exception]
) -> None:
    # A broken or hostile server (a YXDOMAIN, a socket error, a dnspython
    # surprise) proves nothing about the name: taken for NXDOMAIN it would
    # turn a sender domain or HELO name into a 5yz "not found".
    async def fails(*args: object, **kwargs: object) -> None:
        raise error()

    monkeypatch.setattr(resolver._dns, "resolve", fails)
    answer = await resolver.query("host.test.example", "A")
    assert answer.status is Status.TEMPFAIL and not answer.negative


# ------------------------------------------------------------- TtlMemo


def test_a_memo_keeps_a_value_for_its_ttl(resolver: Resolver, clock: FakeClock) -> None:
    memo = resolver.memo()
    memo.put("k", "v", 10)
    memo.put("nothing", "v", 0)  # a temporary failure's TTL
    clock.now += 9.9
    assert memo.get("k") == "v" and memo.get("nothing") is None
    clock.now += 0.1
    assert memo.get("k") is None and len(memo) == 0


def test_a_memo_is_bounded_and_cleared_with_the_cache(dns: DNSServer, clock: FakeClock) -> None:
    resolver = Resolver([dns.nameserver], cache_size=2, clock=clock)
    memo = resolver.memo()
    memo.put(1, "a", 60)
    memo.put(2, "b", 60)
    assert memo.get(1) == "a"  # used: 2 is now the oldest
    memo.put(3, "c", 60)
    assert (memo.get(1), memo.get(2), memo.get(3), len(memo)) == ("a", None, "c", 2)
    resolver.cache_clear()
    assert len(memo) == 0
    uncached = Resolver([dns.nameserver], cache_size=0).memo()
    uncached.put(1, "a", 60)
    assert len(uncached) == 0


async def test_fcrdns_and_a_aaaa_say_how_long_their_answers_hold(resolver: Resolver, clock: FakeClock) -> None:
    resolver._cache_put(_query_key(reverse_name("192.0.2.7"), "PTR"), Answer(Status.RECORDS, ("a.example.", "b.example."), 300), 300)
    resolver._cache_put(_query_key("a.example", "A"), Answer(Status.RECORDS, ("192.0.2.7",), 100), 100)
    resolver._cache_put(_query_key("b.example", "A"), Answer(Status.NXDOMAIN, ttl=40), 40)
    resolver._cache_put(_query_key("a.example", "AAAA"), Answer(Status.NODATA, ttl=20), 20)
    clock.now += 5
    found = await resolver.fcrdns("192.0.2.7")
    assert found.confirmed == ("a.example",) and found.ttl == 35
    answer, ttl = await resolver.a_aaaa_ttl("a.example")
    assert answer == await resolver.a_aaaa("a.example") and (answer.ttl, ttl) == (95, 15)
    resolver._cache_put(_query_key(reverse_name("192.0.2.8"), "PTR"), Answer(Status.TEMPFAIL, error="x"), 5)
    assert (await resolver.fcrdns("192.0.2.8")).ttl == 0
