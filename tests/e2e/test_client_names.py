"""The client's names, looked up as Postfix's smtpd looks them up and
passed on with XCLIENT, so Postfix's own hostname restrictions and its
Received header see the real client, not an unknown one."""

import socket
from collections.abc import Iterator

import pytest

from tests.fixtures.dnsserver import DNSServer
from tests.fixtures.gateway import recv_reply
from tests.fixtures.postfix import PostfixInstance
from tests.test_helo import add_reverse_zones
from gateway.dns import reverse_name

CONFIRMED = "203.0.113.7"   # PTR fcrdns.mail.test, which resolves back to it
#: PTR "names" that are no host names: Postfix takes such a client as unknown.
ODD_PTR = {"203.0.113.30": "203.0.113.30.", "203.0.113.31": "bad-.mail.test.", "203.0.113.32": "with\\032space.mail.test."}
NO_PTR = "203.0.113.9"      # no PTR record
PTR_FAILS = "203.0.113.13"  # the PTR lookup fails (SERVFAIL)
LIAR = "203.0.113.8"        # PTR liar.mail.test, which is another address


@pytest.fixture(scope="module")
def postfix_checking_names(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostfixInstance]:
    """Postfix refusing clients without a confirmed name (550 where sure,
    450 where a lookup failed), as many sites configure it."""
    with PostfixInstance(tmp_path_factory.mktemp("postfix-names"), extra_main_cf={
        "smtpd_client_restrictions": "reject_unknown_client_hostname",
        "unknown_client_reject_code": "550",
    }) as instance:
        yield instance


@pytest.fixture
def names_gateway(start_gateway, postfix_checking_names: PostfixInstance, dns: DNSServer):
    add_reverse_zones(dns)
    for ip, name in ODD_PTR.items():
        dns.add_zone(reverse_name(ip) + ".", f"@ IN PTR {name}\n")
    dns.servfail(reverse_name(PTR_FAILS))
    dns.servfail("fwdfail.mail.test")  # 203.0.113.14's PTR name
    return start_gateway(f"127.0.0.1:{postfix_checking_names.port}", proxy_protocol=True, peername_lookup=True,
                         dns={"nameservers": [dns.nameserver], "timeout": 1.0})


def rcpt_behind_balancer(port: int, client: str) -> bytes:
    """RCPT's reply for ``client``, named by a PROXY header."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(f"PROXY TCP4 {client} 192.0.2.1 40000 25\r\n".encode())
        assert recv_reply(sock).startswith(b"220 ")
        for line in (b"EHLO client.example.net", b"MAIL FROM:<bob@example.org>"):
            sock.sendall(line + b"\r\n")
            assert recv_reply(sock)[:3] == b"250"
        sock.sendall(b"RCPT TO:<alice@example.com>\r\n")
        return recv_reply(sock)


def test_a_confirmed_name_reaches_postfix(names_gateway, postfix_checking_names: PostfixInstance) -> None:
    assert rcpt_behind_balancer(names_gateway.port, CONFIRMED) == b"250 2.1.5 Ok\r\n"
    assert postfix_checking_names.wait_for_client(CONFIRMED)["name"] == "fcrdns.mail.test"


@pytest.mark.parametrize(("client", "reply"), [
    (NO_PTR, f"550 5.7.25 Client host rejected: cannot find your hostname, [{NO_PTR}]"),
    (LIAR, f"550 5.7.25 Client host rejected: cannot find your hostname, [{LIAR}]"),
    # A lookup that failed is Postfix's temporary failure, retried later.
    (PTR_FAILS, f"450 4.7.25 Client host rejected: cannot find your hostname, [{PTR_FAILS}]"),
])
def test_an_unknown_name_is_postfixs_to_judge(names_gateway, client: str, reply: str) -> None:
    assert rcpt_behind_balancer(names_gateway.port, client) == reply.encode() + b"\r\n"


@pytest.mark.parametrize("client", sorted(ODD_PTR))
def test_a_ptr_name_that_is_no_host_name_is_no_name(names_gateway, client: str) -> None:
    # Passed on, Postfix's XCLIENT refused it and the client got 421 at
    # every MAIL; Postfix itself takes such a client as unknown.
    assert rcpt_behind_balancer(names_gateway.port, client) == (
        f"550 5.7.25 Client host rejected: cannot find your hostname, [{client}]\r\n".encode())


def test_a_front_proxys_tempunavail_name_stays_temporary(start_gateway, postfix_checking_names: PostfixInstance) -> None:
    gateway = start_gateway(f"127.0.0.1:{postfix_checking_names.port}")
    with gateway.client() as smtp:
        assert smtp.docmd("XCLIENT", f"ADDR={NO_PTR} NAME=[TEMPUNAVAIL]")[0] == 220
        smtp.ehlo("client.example.net")
        smtp.mail("bob@example.org")
        assert smtp.rcpt("alice@example.com") == (
            450, f"4.7.25 Client host rejected: cannot find your hostname, [{NO_PTR}]".encode())
        smtp.rset()
        # A new address without a name has none, not the previous client's.
        assert smtp.docmd("XCLIENT", f"ADDR={CONFIRMED}")[0] == 220
        smtp.ehlo("client.example.net")
        smtp.mail("bob@example.org")
        assert smtp.rcpt("alice@example.com")[0] == 550
        smtp.rset()
        assert smtp.docmd("XCLIENT", f"ADDR={CONFIRMED} NAME=fcrdns.mail.test")[0] == 220
        smtp.ehlo("client.example.net")
        smtp.mail("bob@example.org")
        assert smtp.rcpt("alice@example.com") == (250, b"2.1.5 Ok")


def test_a_local_client_is_localhost_without_a_query(start_gateway, postfix_checking_names, dns: DNSServer) -> None:
    gateway = start_gateway(f"127.0.0.1:{postfix_checking_names.port}", peername_lookup=True,
                            dns={"nameservers": [dns.nameserver], "timeout": 1.0})
    asked = dns.total_queries
    with gateway.client() as smtp:
        smtp.mail("bob@example.org")
        assert smtp.rcpt("alice@example.com") == (250, b"2.1.5 Ok")
    assert postfix_checking_names.wait_for_client("127.0.0.1")["name"] == "localhost"
    assert dns.total_queries == asked



def test_a_failed_lookup_of_the_name_itself_is_temporary(names_gateway) -> None:
    # 203.0.113.14's PTR name is fwdfail.mail.test, whose own lookup fails.
    assert rcpt_behind_balancer(names_gateway.port, "203.0.113.14") == (
        b"450 4.7.25 Client host rejected: cannot find your hostname, [203.0.113.14]\r\n")
