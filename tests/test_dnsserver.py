"""The loopback DNS server itself: answers, faults, truncation, lifecycle.

Queried with dnspython's low-level ``dns.query`` (no resolver logic in the
way) and with dig, as an administrator would.  dnspython is imported under
aliases because the ``dns`` fixture shadows the package name here.
"""

from __future__ import annotations

import asyncio
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import dns.exception as dns_exception
import dns.flags as dns_flags
import dns.message as dns_message
import dns.query as dns_query
import dns.rcode as dns_rcode
import dns.rdatatype as dns_rdatatype
import pytest

from tests.fixtures.dnsserver import ZONES_DIR, DNSServer, dns, dns_server  # noqa: F401

HOST = "127.0.0.1"


def ask(
    server: DNSServer,
    name: str,
    rdtype: str,
    *,
    tcp: bool = False,
    edns: int = 0,
    payload: int = 1232,
    timeout: float = 2.0,
) -> dns_message.Message:
    query = dns_message.make_query(name, rdtype, use_edns=edns, payload=payload)
    send = dns_query.tcp if tcp else dns_query.udp
    return send(query, HOST, timeout=timeout, port=server.port)


def texts(response: dns_message.Message) -> list[str]:
    return [f"{rrset.name} {dns_rdatatype.to_text(rrset.rdtype)} {rd}" for rrset in response.answer for rd in rrset]


# ------------------------------------------------------------------ answers


def test_a_record_is_authoritative(dns: DNSServer) -> None:
    response = ask(dns, "host.test.example", "A")
    assert response.rcode() == dns_rcode.NOERROR
    assert response.flags & dns_flags.AA
    assert texts(response) == ["host.test.example. A 192.0.2.20"]
    assert response.answer[0].ttl == 300


def test_txt_keeps_its_strings(dns: DNSServer) -> None:
    response = ask(dns, "multi.test.example", "TXT")
    assert response.answer[0][0].strings == (b"one", b"two")


def test_mx(dns: DNSServer) -> None:
    response = ask(dns, "test.example", "MX")
    assert sorted(texts(response)) == ["test.example. MX 10 mx1.test.example.", "test.example. MX 20 mx2.test.example."]


def test_nxdomain_carries_soa_with_negative_ttl(dns: DNSServer) -> None:
    response = ask(dns, "nothing.test.example", "A")
    assert response.rcode() == dns_rcode.NXDOMAIN
    assert response.flags & dns_flags.AA
    assert not response.answer
    [soa] = response.authority
    assert soa.rdtype == dns_rdatatype.SOA and soa.ttl == 60  # min(SOA TTL 300, minimum 60)


@pytest.mark.parametrize(
    "name, rdtype",
    [
        ("v6only.test.example", "A"),
        ("host.test.example", "MX"),
        ("ent.test.example", "A"),
        ("b.ent.test.example", "TXT"),
    ],
    ids=["other-type", "other-type-mx", "empty-non-terminal", "empty-non-terminal-deep"],
)
def test_nodata_is_noerror_with_soa(dns: DNSServer, name: str, rdtype: str) -> None:
    response = ask(dns, name, rdtype)
    assert response.rcode() == dns_rcode.NOERROR
    assert not response.answer
    assert response.authority[0].rdtype == dns_rdatatype.SOA


def test_cname_chain_in_answer(dns: DNSServer) -> None:
    response = ask(dns, "alias2.test.example", "A")
    assert texts(response) == [
        "alias2.test.example. CNAME alias.test.example.",
        "alias.test.example. CNAME host.test.example.",
        "host.test.example. A 192.0.2.20",
    ]


def test_cname_to_missing_name_is_nxdomain(dns: DNSServer) -> None:
    response = ask(dns, "dangling.test.example", "A")
    assert response.rcode() == dns_rcode.NXDOMAIN  # RFC 6604: the rcode of the last name
    assert texts(response) == ["dangling.test.example. CNAME nowhere.test.example."]


def test_cname_into_another_served_zone_is_followed(dns: DNSServer) -> None:
    response = ask(dns, "outside.test.example", "A")
    assert texts(response)[-1] == "www.other.example. A 198.51.100.1"


def test_wildcard_answers_with_query_name(dns: DNSServer) -> None:
    assert texts(ask(dns, "anything.wild.test.example", "A")) == ["anything.wild.test.example. A 192.0.2.50"]
    assert ask(dns, "deeper.anything.wild.test.example", "TXT").answer[0][0].strings == (b"wildcard",)
    nodata = ask(dns, "anything.wild.test.example", "MX")
    assert nodata.rcode() == dns_rcode.NOERROR and not nodata.answer


def test_name_outside_every_zone_is_refused(dns: DNSServer) -> None:
    response = ask(dns, "www.example.com", "A")
    assert response.rcode() == dns_rcode.REFUSED
    assert not response.flags & dns_flags.AA


def test_long_dkim_key_from_zone_file_keeps_string_split(dns: DNSServer) -> None:
    [rd] = ask(dns, "sel._domainkey.test.example", "TXT").answer[0]
    assert len(rd.strings) == 3
    assert all(len(s) <= 255 for s in rd.strings)
    joined = b"".join(rd.strings)
    assert joined.startswith(b"v=DKIM1; k=rsa; p=MIIB") and joined.endswith(b"IDAQAB")
    assert len(joined) > 255


# ------------------------------------------------------------- truncation


def test_big_answer_without_edns_is_truncated(dns: DNSServer) -> None:
    response = ask(dns, "big.test.example", "TXT", edns=-1)
    assert response.flags & dns_flags.TC
    assert not response.answer


def test_big_answer_over_edns_payload_is_truncated(dns: DNSServer) -> None:
    assert ask(dns, "big.test.example", "TXT", payload=1232).flags & dns_flags.TC


def test_big_answer_fits_larger_edns_payload(dns: DNSServer) -> None:
    response = ask(dns, "big.test.example", "TXT", payload=4096)
    assert not response.flags & dns_flags.TC
    assert len(response.answer[0]) == 8


def test_big_answer_over_tcp(dns: DNSServer) -> None:
    response = ask(dns, "big.test.example", "TXT", tcp=True, edns=-1)
    assert not response.flags & dns_flags.TC
    assert len(response.answer[0]) == 8


def test_udp_then_tcp_fallback_as_a_resolver_does(dns: DNSServer) -> None:
    query = dns_message.make_query("big.test.example", "TXT")
    response, used_tcp = dns_query.udp_with_fallback(query, HOST, timeout=2.0, port=dns.port)
    assert used_tcp and len(response.answer[0]) == 8


# ------------------------------------------------------------------- faults


def test_servfail_exact_name_only(dns: DNSServer) -> None:
    dns.servfail("host.test.example")
    assert ask(dns, "host.test.example", "A").rcode() == dns_rcode.SERVFAIL
    assert ask(dns, "x.host.test.example", "A").rcode() == dns_rcode.NXDOMAIN
    dns.servfail("wild.test.example", subtree=True)
    assert ask(dns, "a.wild.test.example", "A").rcode() == dns_rcode.SERVFAIL


def test_refused(dns: DNSServer) -> None:
    dns.refused("txt.test.example")
    assert ask(dns, "txt.test.example", "TXT").rcode() == dns_rcode.REFUSED


@pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])
def test_timeout_covers_the_name_and_below(dns: DNSServer, tcp: bool) -> None:
    dns.timeout("other.example")
    for name in ("other.example", "www.other.example"):
        with pytest.raises(dns_exception.Timeout):
            ask(dns, name, "A", tcp=tcp, timeout=0.2)
    assert ask(dns, "host.test.example", "A").rcode() == dns_rcode.NOERROR


def test_delay_does_not_hold_up_other_queries(dns: DNSServer) -> None:
    dns.delay("test.example", 0.4)
    slow = dns_message.make_query("host.test.example", "A")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setblocking(False)
        started = time.monotonic()
        sock.sendto(slow.to_wire(), (HOST, dns.port))
        fast = ask(dns, "www.other.example", "A")
        fast_elapsed = time.monotonic() - started
        ready, _, _ = select.select([sock], [], [], 2.0)
        slow_elapsed = time.monotonic() - started
    assert fast.rcode() == dns_rcode.NOERROR and fast_elapsed < slow_elapsed
    assert ready and 0.35 <= slow_elapsed < 2.0


@pytest.mark.parametrize("tcp", [False, True])
def test_held_answers_wait_for_release(dns: DNSServer, tcp: bool) -> None:
    dns.hold("test.example")
    with pytest.raises(dns_exception.Timeout):
        ask(dns, "host.test.example", "A", tcp=tcp, timeout=0.3)
    assert ask(dns, "www.other.example", "A", tcp=tcp).rcode() == dns_rcode.NOERROR  # others are not held
    slow = dns_message.make_query("host.test.example", "A")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.sendto(slow.to_wire(), (HOST, dns.port))
        asyncio.run(dns.asked(("host.test.example", "A")))
        dns.release()
        ready, _, _ = select.select([sock], [], [], 5.0)
        assert ready and dns_message.from_wire(sock.recv(4096)).rcode() == dns_rcode.NOERROR
    assert ask(dns, "host.test.example", "A", tcp=tcp).rcode() == dns_rcode.NOERROR  # no longer held


def test_asked_names_what_was_never_asked(dns: DNSServer) -> None:
    with pytest.raises(AssertionError, match=r"never asked: \[\('nowhere.test.example', 'A'\)\]"):
        asyncio.run(dns.asked(("nowhere.test.example", "A"), timeout=0.1))


def test_reset_faults(dns: DNSServer) -> None:
    dns.servfail("host.test.example")
    dns.timeout("other.example")
    dns.delay("test.example", 5)
    dns.reset_faults()
    assert ask(dns, "host.test.example", "A", timeout=1.0).rcode() == dns_rcode.NOERROR
    assert ask(dns, "www.other.example", "A", timeout=1.0).rcode() == dns_rcode.NOERROR


# -------------------------------------------------------- runtime zones, counters


def test_add_zone_without_soa_or_ttl(dns: DNSServer) -> None:
    dns.add_zone("dnsbl.test", '2.0.0.127 IN A 127.0.0.2\n2.0.0.127 IN TXT "listed"\n')
    assert texts(ask(dns, "2.0.0.127.dnsbl.test", "A")) == ["2.0.0.127.dnsbl.test. A 127.0.0.2"]
    negative = ask(dns, "3.0.0.127.dnsbl.test", "A")
    assert negative.rcode() == dns_rcode.NXDOMAIN and negative.authority[0].rdtype == dns_rdatatype.SOA


def test_runtime_zone_nested_in_file_zone_wins_then_goes(dns: DNSServer) -> None:
    dns.add_zone("sub.test.example", "www IN A 192.0.2.200")
    assert texts(ask(dns, "www.sub.test.example", "A")) == ["www.sub.test.example. A 192.0.2.200"]
    dns.remove_runtime_zones()
    assert ask(dns, "www.sub.test.example", "A").rcode() == dns_rcode.NXDOMAIN


def test_runtime_zones_do_not_leak_between_tests_part1(dns: DNSServer) -> None:
    dns.add_zone("leak.test", "x IN A 192.0.2.1")
    assert "leak.test." in dns.origins


def test_runtime_zones_do_not_leak_between_tests_part2(dns: DNSServer) -> None:
    assert "leak.test." not in dns.origins
    assert dns.total_queries == 0


def test_query_counter(dns: DNSServer) -> None:
    for _ in range(3):
        ask(dns, "Host.Test.Example.", "A")
    ask(dns, "host.test.example", "AAAA")
    assert dns.query_count("host.test.example", "A") == 3
    assert dns.query_count("HOST.test.example.") == 4
    assert dns.query_count("host.test.example", "MX") == 0


def test_garbage_is_ignored(dns: DNSServer) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.sendto(b"\x00\x01not dns", (HOST, dns.port))
    assert ask(dns, "host.test.example", "A").rcode() == dns_rcode.NOERROR


# --------------------------------------------------------------------- dig


DIG = shutil.which("dig")


@pytest.mark.skipif(DIG is None, reason="dig not installed")
@pytest.mark.parametrize("transport", ["+notcp", "+tcp"])
def test_dig(dns: DNSServer, transport: str) -> None:
    assert DIG is not None
    out = subprocess.run(
        [DIG, f"@{HOST}", "-p", str(dns.port), "TXT", "multi.test.example", "+short", "+tries=1", "+time=2", transport],
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    ).stdout
    assert out.strip() == '"one" "two"'


# ---------------------------------------------------------------- lifecycle


def test_udp_and_tcp_share_a_port_and_stop_frees_it() -> None:
    with DNSServer(ZONES_DIR) as server:
        port = server.port
        assert ask(server, "host.test.example", "A").rcode() == dns_rcode.NOERROR
        assert ask(server, "host.test.example", "A", tcp=True).rcode() == dns_rcode.NOERROR
    assert server.port == port
    # stopped: the same port can be bound again, and nothing answers there
    with DNSServer(None, port=port) as again:
        assert ask(again, "host.test.example", "A").rcode() == dns_rcode.REFUSED


def test_two_servers_side_by_side() -> None:
    with DNSServer() as one, DNSServer() as two:
        assert one.port != two.port
        one.add_zone("one.test", "@ IN A 192.0.2.1")
        assert ask(one, "one.test", "A").rcode() == dns_rcode.NOERROR
        assert ask(two, "one.test", "A").rcode() == dns_rcode.REFUSED


def test_stop_with_open_tcp_connection_and_pending_delay() -> None:
    server = DNSServer(ZONES_DIR).start()
    server.delay("test.example", 10)
    with pytest.raises(dns_exception.Timeout):
        ask(server, "host.test.example", "A", tcp=True, timeout=0.2)
    started = time.monotonic()
    server.stop()
    assert time.monotonic() - started < 2.5
    server.stop()  # idempotent


def test_standalone_main_runs_until_sigint() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.fixtures.dnsserver", "--port", "0", str(ZONES_DIR)],
        cwd=Path(__file__).resolve().parent.parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 10)
        assert ready, "server did not report its port"
        line = proc.stdout.readline()
        assert line.startswith("serving ") and "(UDP+TCP)" in line
        port = int(line.split()[4].rsplit(":", 1)[1])
        query = dns_message.make_query("host.test.example", "A")
        assert dns_query.udp(query, HOST, timeout=2, port=port).rcode() == dns_rcode.NOERROR
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
