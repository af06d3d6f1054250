"""Security regression: a quoted local part holding "@" must not change the
domain SPF judges.

``MAIL FROM:<"x@y"@auth.test>`` is a valid RFC 5321 path whose domain is
auth.test.  pyspf splits a sender at its first "@", so left to itself it
judged ``y"@auth.test`` -- a name auth.test never published -- and a
forger got ``none`` (or ``temperror``) instead of auth.test's ``fail``.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.e2e.test_auth import AUTHSERV_ID, MX_IP, SPOOFER_IP, header_values, message, send, start_auth_gateway
from tests.fixtures.dnsserver import DNSServer
from tests.fixtures.gateway import GatewayThread
from tests.fixtures.postfix import PostfixInstance

pytestmark = pytest.mark.e2e

SENDERS = ['"x@y"@auth.test', '"ceo@thirdparty.test"@auth.test']


@pytest.fixture
def gateway(start_gateway: Callable[..., GatewayThread], postfix: PostfixInstance, dns: DNSServer) -> GatewayThread:
    # The TLD answers NXDOMAIN for the names it does not hold, as a real one
    # does: the misread name then gave "none", which the policy lets through.
    dns.add_zone("test", "@ IN SOA ns.test. hostmaster.test. 1 3600 600 86400 60\n@ IN NS ns\nns IN A 192.0.2.53")
    return start_auth_gateway(start_gateway, postfix, dns)


@pytest.mark.parametrize("sender", SENDERS)
def test_quoted_at_in_mail_from_gets_the_domains_fail(
    gateway: GatewayThread, postfix: PostfixInstance, sender: str
) -> None:
    # auth.test: "v=spf1 ip4:192.0.2.10 -all"; the client is not 192.0.2.10.
    replies = send(gateway, SPOOFER_IP, sender, message("ceo@auth.test"), helo="mx.thirdparty.test")
    assert replies == [
        (550, f"5.7.23 <{sender}>: Sender address rejected: SPF fail - not authorized by auth.test for {SPOOFER_IP}".encode())
    ]
    assert postfix.clients() == []  # the transaction never reached Postfix


@pytest.mark.parametrize("sender", SENDERS)
def test_quoted_at_from_an_authorised_host_passes_spf_and_aligns(
    gateway: GatewayThread, postfix: PostfixInstance, sender: str
) -> None:
    # Unsigned: DMARC can pass only through SPF, aligned on auth.test.
    replies = send(gateway, MX_IP, sender, message("Alice <alice@auth.test>"))
    assert [code for code, _ in replies] == [250, 250, 250]
    (delivered,) = postfix.wait_for_messages("alice")
    (results,) = header_values(delivered, "Authentication-Results")
    assert results == (
        f"{AUTHSERV_ID}; spf=pass smtp.mailfrom=auth.test; dkim=none; "
        "dmarc=pass (p=reject sp=quarantine dis=none) header.from=auth.test"
    )
    (received_spf,) = header_values(delivered, "Received-SPF")
    quoted = sender.replace('"', '\\"')
    assert received_spf == (
        f"pass ({AUTHSERV_ID}: domain of {sender} designates {MX_IP} as permitted sender) "
        f'receiver={AUTHSERV_ID}; client-ip={MX_IP}; envelope-from="{quoted}"; helo=mx.auth.test; identity=mailfrom;'
    )
