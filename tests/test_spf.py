"""plugins.spf against the loopback DNS server (tests/zones/auth.test.zone).

Plugins are built from a policy table exactly as the gateway builds them,
so option validation and the per-finding actions are what a policy gets.
"""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import Action, Address, Context, Envelope, Message, Reply, Session, Verdict
from gateway.config import PolicyError, policy_from_dict
from gateway.dns import Resolver
from gateway.plugins import load_plugins
from plugins import _authresults as ar
from plugins import spf
from plugins.spf import SpfOutcome, SpfResult, received_spf
from tests.fixtures.dnsserver import DNSServer
from tests.fixtures.hooks import settle

HOSTNAME = "gw.auth.example"
TRUSTED = "198.51.100.0/24"
GOOD_IP = "192.0.2.10"  # mx.auth.test, the one host auth.test sends from
BAD_IP = "203.0.113.66"
MESSAGE = b"From: Alice <alice@auth.test>\r\nTo: bob@example.com\r\nSubject: hi\r\n\r\nHello.\r\n"


# ------------------------------------------------------------------ helpers


def build(resolver: Resolver | None, plugins: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The plugins of a policy with these tables, built as the gateway builds them."""
    policy = policy_from_dict(
        {"gateway": {"hostname": HOSTNAME, "trusted_networks": [TRUSTED]}, "plugins": plugins}, "<test>"
    )
    registry = load_plugins(policy, Context(policy.gateway, resolver))
    return {p.name: p.instance for p in registry.plugins}


def session(ip: str = GOOD_IP, helo: str = "mx.auth.test") -> Session:
    address = ipaddress.ip_address(ip)
    return Session(client_ip=address, helo=helo, trusted=address in ipaddress.ip_network(TRUSTED))


def envelope(sender: str) -> Envelope:
    local, _, domain = sender.rpartition("@") if sender else ("", "", "")
    return Envelope(Address(local, domain))


def headers_named(verdict: Verdict | None, name: str) -> list[str]:
    return [value for key, value in (verdict.headers if verdict else ()) if key == name]


def unfold(value: str) -> str:
    return value.replace("\r\n", "")


@pytest.fixture
def resolver(dns: DNSServer) -> Resolver:
    return Resolver([dns.nameserver], timeout=5.0)


@pytest.fixture
def plugin(resolver: Resolver) -> spf.SpfPlugin:
    return build(resolver, {"spf": {}})["spf"]  # type: ignore[no-any-return]


# ------------------------------------------------------------------ results


@pytest.mark.parametrize(
    "sender, ip, result",
    [
        ("alice@auth.test", GOOD_IP, "pass"),
        ("alice@AUTH.TEST", GOOD_IP, "pass"),
        ("alice@auth.test", BAD_IP, "fail"),
        ("x@soft.auth.test", BAD_IP, "softfail"),
        ("x@neutral.auth.test", BAD_IP, "neutral"),
        ("x@nospf.auth.test", BAD_IP, "none"),
        ("x@nothing.auth.test", BAD_IP, "none"),  # NXDOMAIN
        ("x@include.auth.test", GOOD_IP, "pass"),
        ("x@include.auth.test", BAD_IP, "fail"),
        ("x@redirect.auth.test", GOOD_IP, "pass"),
        ("x@redirect.auth.test", BAD_IP, "softfail"),
        ("alice@macro.auth.test", GOOD_IP, "pass"),  # exists:alice.10.2.0.192._spf.macro.auth.test
        ("bob@macro.auth.test", GOOD_IP, "fail"),
        ("alice@macro.auth.test", BAD_IP, "fail"),
        ('"x@y"@auth.test', BAD_IP, "fail"),  # the domain follows the last "@" (RFC 7208 §4.3)
        ('"ceo@thirdparty.test"@auth.test', BAD_IP, "fail"),
        ('"x@y"@auth.test', GOOD_IP, "pass"),
        ("x@badsyntax.auth.test", GOOD_IP, "permerror"),
        ("x@twospf.auth.test", GOOD_IP, "permerror"),
    ],
)
async def test_results(plugin: spf.SpfPlugin, sender: str, ip: str, result: str) -> None:
    s, e = session(ip), envelope(sender)
    verdict = await settle(plugin.mail(s, e))
    outcome = s.results["spf"]
    assert outcome.identity.result == result
    assert outcome.identity.identity == "mailfrom"
    assert verdict is not None and verdict.result == f"spf={result}"
    assert verdict.action is (Action.REJECT if result == "fail" else Action.CONTINUE)


async def test_temperror_defers_with_rfc7372_code(plugin: spf.SpfPlugin, dns: DNSServer) -> None:
    dns.servfail("broken.auth.test")
    verdict = await settle(plugin.mail(session(), envelope("x@tempinc.auth.test")))
    assert verdict is not None and verdict.action is Action.DEFER
    assert verdict.reply == Reply(
        451, "4.7.24",
        "<x@tempinc.auth.test>: Sender address rejected: SPF temperror - DNS error for tempinc.auth.test, try again later",
    )


async def test_fail_reply(plugin: spf.SpfPlugin) -> None:
    verdict = await settle(plugin.mail(session(BAD_IP), envelope("alice@auth.test")))
    assert verdict is not None and verdict.action is Action.REJECT
    assert str(verdict.reply) == (
        "550 5.7.23 <alice@auth.test>: Sender address rejected: SPF fail - not authorized by auth.test for 203.0.113.66"
    )


@pytest.mark.parametrize("sender", ["Alice@Auth.Test", "alice@AUTH.test"])
async def test_fail_reply_quotes_the_address_as_sent(plugin: spf.SpfPlugin, sender: str) -> None:
    # As Postfix quotes it in "<address>: Sender address rejected" and in its
    # log (from=<...>), and as the sender plugin does; the domain checked
    # follows, as SPF read it.
    verdict = await settle(plugin.mail(session(BAD_IP), envelope(sender)))
    assert verdict is not None and verdict.action is Action.REJECT
    assert str(verdict.reply) == (
        f"550 5.7.23 <{sender}>: Sender address rejected: SPF fail - not authorized by auth.test for 203.0.113.66"
    )
    assert verdict.result == "spf=fail"


async def test_quoted_at_in_the_local_part_gets_the_fail_reply(plugin: spf.SpfPlugin) -> None:
    verdict = await settle(plugin.mail(session(BAD_IP), envelope('"ceo@thirdparty.test"@auth.test')))
    assert verdict is not None and verdict.action is Action.REJECT
    assert str(verdict.reply) == (
        '550 5.7.23 <"ceo@thirdparty.test"@auth.test>: Sender address rejected: '
        "SPF fail - not authorized by auth.test for 203.0.113.66"
    )


async def test_local_part_macro_is_the_whole_local_part(plugin: spf.SpfPlugin, dns: DNSServer) -> None:
    # macro.auth.test: "exists:%{l}.%{ir}._spf.%{d} -all"; %{l} is the local
    # part as sent, quotes and "@" included, and %{d} is macro.auth.test.
    dns.add_zone("_spf.macro.auth.test", '\\"bob@x\\".10.2.0.192 IN A 127.0.0.2')
    s = session(GOOD_IP)
    verdict = await settle(plugin.mail(s, envelope('"bob@x"@macro.auth.test')))
    assert verdict is not None and verdict.result == "spf=pass"
    assert dns.query_count('"bob@x".10.2.0.192._spf.macro.auth.test', "A") == 1
    rejected = await settle(plugin.mail(session(GOOD_IP), envelope('"eve@x"@macro.auth.test')))
    assert rejected is not None and rejected.result == "spf=fail"


async def test_fail_reply_carries_the_domains_explanation(plugin: spf.SpfPlugin, dns: DNSServer) -> None:
    dns.add_zone("exp.test", '@ IN TXT "v=spf1 -all exp=why.exp.test"\nwhy IN TXT "%{i} may not send for %{d}\\007"')
    verdict = await settle(plugin.mail(session(BAD_IP), envelope("x@exp.test")))
    assert verdict is not None and verdict.reply is not None
    assert verdict.reply.text.split("\n") == [
        "<x@exp.test>: Sender address rejected: SPF fail - not authorized by exp.test for 203.0.113.66",
        "203.0.113.66 may not send for exp.test",  # control character dropped
    ]


async def test_address_literal_and_single_label_domains_are_none_without_dns(
    plugin: spf.SpfPlugin, dns: DNSServer
) -> None:
    for sender in ("x@[192.0.2.1]", "x@localhost"):
        s = session(BAD_IP)
        verdict = await settle(plugin.mail(s, envelope(sender)))
        assert verdict is not None and verdict.result == "spf=none"
    assert dns.total_queries == 0


async def test_unicode_domain_is_checked_as_its_a_label(plugin: spf.SpfPlugin, dns: DNSServer) -> None:
    dns.add_zone("xn--bcher-kva.test", '@ IN TXT "v=spf1 -all"')
    s = session(BAD_IP)
    verdict = await settle(plugin.mail(s, envelope("x@bücher.test")))
    assert verdict is not None and verdict.action is Action.REJECT
    assert s.results["spf"].identity.domain == "xn--bcher-kva.test"


async def test_ipv4_mapped_client_is_checked_as_ipv4(plugin: spf.SpfPlugin) -> None:
    s = session(f"::ffff:{GOOD_IP}")
    assert (await settle(plugin.mail(s, envelope("alice@auth.test")))).result == "spf=pass"  # type: ignore[union-attr]


# ------------------------------------------------------------------ HELO identity


async def test_null_sender_is_judged_by_helo_identity(plugin: spf.SpfPlugin) -> None:
    s = session(GOOD_IP, helo="mx.auth.test")
    await settle(plugin.mail(s, envelope("")))
    assert s.results["spf"].identity.identity == "helo"
    assert s.results["spf"].identity.result == "pass"
    verdict = await settle(plugin.mail(session(BAD_IP, helo="mx.auth.test"), envelope("")))
    assert verdict is not None and str(verdict.reply) == (
        "550 5.7.23 <mx.auth.test>: Helo command rejected: SPF fail - not authorized by mx.auth.test for 203.0.113.66"
    )


async def test_check_helo_fail_decides(resolver: Resolver) -> None:
    plugin = build(resolver, {"spf": {"check_helo": True}})["spf"]
    s = session(GOOD_IP, helo="deny.auth.test")
    verdict = await settle(plugin.mail(s, envelope("alice@auth.test")))
    assert verdict.action is Action.REJECT and verdict.result == "spf=fail helo"
    assert verdict.reply.text.startswith("<deny.auth.test>: Helo command rejected: SPF fail")
    outcome: SpfOutcome = s.results["spf"]
    assert (outcome.helo.result, outcome.identity.result) == ("fail", "pass")  # type: ignore[union-attr]
    # Without the option the HELO name is not looked at.
    plain = build(resolver, {"spf": {}})["spf"]
    assert (await settle(plain.mail(session(GOOD_IP, helo="deny.auth.test"), envelope("alice@auth.test")))).result == "spf=pass"


async def test_check_helo_other_results_leave_mail_from_deciding(resolver: Resolver) -> None:
    plugin = build(resolver, {"spf": {"check_helo": True}})["spf"]
    s = session(BAD_IP, helo="[203.0.113.66]")
    verdict = await settle(plugin.mail(s, envelope("x@soft.auth.test")))
    assert verdict.result == "spf=softfail"
    assert s.results["spf"].helo.result == "none"  # an address literal is no SPF identity


# ------------------------------------------------------------------ policy


async def test_actions_replace_defaults_one_by_one(resolver: Resolver, dns: DNSServer) -> None:
    plugin = build(resolver, {"spf": {"actions": {"permerror": "reject", "softfail": 2.5}}})["spf"]
    verdict = await settle(plugin.mail(session(), envelope("x@badsyntax.auth.test")))
    assert verdict.action is Action.REJECT
    assert verdict.reply.code == 550 and verdict.reply.enhanced == "5.7.24"
    assert "Invalid IP4 address" in verdict.reply.text
    soft = await settle(plugin.mail(session(BAD_IP), envelope("x@soft.auth.test")))
    assert (soft.action, soft.score) == (Action.CONTINUE, 2.5)
    # fail and temperror keep their defaults
    assert (await settle(plugin.mail(session(BAD_IP), envelope("alice@auth.test")))).action is Action.REJECT
    dns.servfail("broken.auth.test")
    assert (await settle(plugin.mail(session(), envelope("x@tempinc.auth.test")))).action is Action.DEFER


async def test_a_deferred_permerror_is_called_a_permerror(resolver: Resolver, dns: DNSServer) -> None:
    plugin = build(resolver, {"spf": {"actions": {"permerror": "defer"}}})["spf"]
    verdict = await settle(plugin.mail(session(), envelope("x@badsyntax.auth.test")))
    assert verdict.action is Action.DEFER
    assert (verdict.reply.code, verdict.reply.enhanced) == (451, "4.7.24")
    assert verdict.reply.text.startswith("<x@badsyntax.auth.test>: Sender address rejected: SPF permerror - ")


async def test_fail_can_be_turned_into_a_tag(resolver: Resolver) -> None:
    plugin = build(resolver, {"spf": {"actions": {"fail": "tag"}}})["spf"]
    verdict = await settle(plugin.mail(session(BAD_IP), envelope("alice@auth.test")))
    assert verdict.action is Action.TAG and verdict.result == "spf=fail"


async def test_softfail_deferred_by_policy_gets_a_temporary_twin(resolver: Resolver) -> None:
    plugin = build(resolver, {"spf": {"actions": {"softfail": "defer"}}})["spf"]
    verdict = await settle(plugin.mail(session(BAD_IP), envelope("x@soft.auth.test")))
    assert str(verdict.reply) == "451 4.7.1 <x@soft.auth.test>: Sender address rejected: SPF softfail for soft.auth.test"


@pytest.mark.parametrize(
    "table, key",
    [
        ({"actions": {"hardfail": "reject"}}, "plugins.spf.actions.hardfail"),
        ({"actions": {"fail": "bounce"}}, "plugins.spf.actions.fail"),
        ({"check_helo": "yes"}, "plugins.spf.check_helo"),
        ({"helo": True}, "plugins.spf.helo"),
    ],
)
def test_bad_options_are_policy_errors(table: dict[str, Any], key: str) -> None:
    with pytest.raises(PolicyError) as info:
        build(None, {"spf": table})
    assert [p.key for p in info.value.problems] == [key]


async def test_trusted_clients_are_not_checked(plugin: spf.SpfPlugin, dns: DNSServer) -> None:
    s, e = session("198.51.100.7"), envelope("alice@auth.test")
    assert await settle(plugin.mail(s, e)) is None
    assert plugin.data(s, e, Message(MESSAGE)) is None
    assert "spf" not in s.results and dns.total_queries == 0


async def test_lookups_are_cached_by_the_shared_resolver(plugin: spf.SpfPlugin, dns: DNSServer) -> None:
    for _ in range(3):
        await settle(plugin.mail(session(BAD_IP), envelope("x@include.auth.test")))
    assert dns.query_count("include.auth.test", "TXT") == 1
    assert dns.query_count("auth.test", "TXT") == 1


# ------------------------------------------------------------------ headers


async def test_received_spf_once_per_message_at_data(plugin: spf.SpfPlugin) -> None:
    s, e = session(), envelope("alice@auth.test")
    await settle(plugin.mail(s, e))
    verdict = plugin.data(s, e, Message(MESSAGE))
    (header,) = headers_named(verdict, "Received-SPF")
    assert unfold(header) == (
        "pass (gw.auth.example: domain of alice@auth.test designates 192.0.2.10 as permitted sender) "
        "receiver=gw.auth.example; client-ip=192.0.2.10; envelope-from=\"alice@auth.test\"; "
        "helo=mx.auth.test; identity=mailfrom;"
    )
    assert all(len(line) <= 78 for line in f"Received-SPF: {header}".split("\r\n"))
    # spf alone writes the Authentication-Results header too
    (results,) = headers_named(verdict, "Authentication-Results")
    assert unfold(results) == "gw.auth.example; spf=pass smtp.mailfrom=alice@auth.test"


async def test_no_header_for_another_transaction(plugin: spf.SpfPlugin) -> None:
    s, first = session(), envelope("alice@auth.test")
    await settle(plugin.mail(s, first))
    assert plugin.data(s, envelope("alice@auth.test"), Message(MESSAGE)) is None


async def test_received_spf_per_identity_with_check_helo(resolver: Resolver) -> None:
    plugin = build(resolver, {"spf": {"check_helo": True, "actions": {"fail": "continue"}}})["spf"]
    s, e = session(BAD_IP, helo="mx.auth.test"), envelope("alice@auth.test")
    await settle(plugin.mail(s, e))
    verdict = plugin.data(s, e, Message(MESSAGE))
    helo, mailfrom = (unfold(h) for h in headers_named(verdict, "Received-SPF"))
    assert helo.startswith("fail (gw.auth.example: domain of postmaster@mx.auth.test does not designate")
    assert "identity=helo;" in helo and 'envelope-from="alice@auth.test";' in helo
    assert mailfrom.startswith("fail ") and "identity=mailfrom;" in mailfrom
    (results,) = headers_named(verdict, "Authentication-Results")
    assert unfold(results) == (
        "gw.auth.example; spf=fail smtp.helo=mx.auth.test; spf=fail smtp.mailfrom=alice@auth.test"
    )


async def test_received_spf_can_be_turned_off(resolver: Resolver) -> None:
    plugin = build(resolver, {"spf": {"received_spf": False}})["spf"]
    s, e = session(), envelope("alice@auth.test")
    await settle(plugin.mail(s, e))
    assert headers_named(plugin.data(s, e, Message(MESSAGE)), "Received-SPF") == []


async def test_only_the_reporter_writes_authentication_results(resolver: Resolver) -> None:
    plugins = build(resolver, {"spf": {}, "dkim": {}})
    s, e = session(), envelope("alice@auth.test")
    await settle(plugins["spf"].mail(s, e))
    verdict = plugins["spf"].data(s, e, Message(MESSAGE))
    assert headers_named(verdict, "Received-SPF") and not headers_named(verdict, "Authentication-Results")


def test_received_spf_quotes_what_is_not_a_dot_atom() -> None:
    result = SpfResult("mailfrom", "permerror", "auth.test", '"a b"@auth.test', BAD_IP, "odd;helo", 'bad "record"')
    name, value = received_spf(result, HOSTNAME, '"a b"@auth.test')
    assert name == "Received-SPF"
    assert unfold(value) == (
        'permerror (gw.auth.example: permanent error in processing domain of "a b"@auth.test) '
        'receiver=gw.auth.example; client-ip=203.0.113.66; envelope-from="\\"a b\\"@auth.test"; '
        'helo="odd;helo"; identity=mailfrom; problem="bad \\"record\\"";'
    )


def test_null_sender_envelope_from_is_empty() -> None:
    result = SpfResult("helo", "none", "[192.0.2.1]", "postmaster@[192.0.2.1]", BAD_IP, "[192.0.2.1]")
    assert 'envelope-from="";' in received_spf(result, HOSTNAME)[1]
    assert 'helo="[192.0.2.1]";' in received_spf(result, HOSTNAME)[1]  # not a dot-atom: quoted


def test_smtp_mailfrom_is_the_domain_when_the_local_part_is_quoted() -> None:
    result = SpfResult("mailfrom", "pass", "auth.test", '"x; dkim=pass"@auth.test', GOOD_IP, "mx.auth.test")
    (clause,) = spf.ar_results(SpfOutcome("1", result))
    assert str(clause) == "spf=pass smtp.mailfrom=auth.test"


#: A HELO name no MTA would send, but a client may (with the helo plugin off).
LONG_HELO = ".".join(["h" * 60] * 25) + ".thirdparty.test"


def header_lines(headers: tuple[tuple[str, str], ...]) -> list[str]:
    return [line for name, value in headers for line in f"{name}: {value}".split("\r\n")]


@pytest.mark.parametrize(
    "helo, sender, received, results",
    [
        # <>: the HELO identity, in Received-SPF and smtp.helo.
        (LONG_HELO, "", f"helo={LONG_HELO[:256]} (cut from 1540 characters);",
         f"spf=none smtp.helo={LONG_HELO[:256]} (cut from 1540 characters)"),
        # A local part longer than SMTP allows, in envelope-from and smtp.mailfrom.
        ("mx.auth.test", "x" * 1500 + "@auth.test", f"envelope-from={'x' * 256} (cut from 1510 characters);",
         f"spf=pass smtp.mailfrom={'x' * 256} (cut from 1510 characters)"),
    ],
    ids=["helo", "mail-from"],
)
async def test_an_overlong_value_is_cut_to_keep_header_lines_short(
    plugin: spf.SpfPlugin, helo: str, sender: str, received: str, results: str
) -> None:
    s, e = session(GOOD_IP, helo=helo), envelope(sender)
    await settle(plugin.mail(s, e))
    verdict = plugin.data(s, e, Message(MESSAGE))
    assert max(len(line) for line in header_lines(verdict.headers)) <= 998  # RFC 5322 §2.1.1
    (header,) = headers_named(verdict, "Received-SPF")
    assert f" {received} " in unfold(header)
    assert unfold(headers_named(verdict, "Authentication-Results")[0]) == f"{HOSTNAME}; {results}"


#: Up to about 3,000 characters without a blank (as an SMTP argument is),
#: of any printable ASCII: runs of a random piece.
_TOKENS = st.builds(
    lambda piece, times: piece * times,
    st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7e), min_size=1, max_size=12),
    st.integers(1, 250),
)


@settings(max_examples=200, deadline=None)
@given(helo=_TOKENS, local=_TOKENS, explanation=st.text(max_size=600))
def test_no_line_of_our_headers_is_longer_than_998(helo: str, local: str, explanation: str) -> None:
    for checked in (
        SpfResult("helo", "none", "auth.test", f"postmaster@{helo}", BAD_IP, helo),
        SpfResult("mailfrom", "permerror", "auth.test", f"{local}@auth.test", BAD_IP, helo, explanation),
    ):
        headers = (
            received_spf(checked, HOSTNAME, f"{local}@auth.test"),
            ar.authentication_results(HOSTNAME, spf.ar_results(SpfOutcome("1", checked))),
        )
        assert max(len(line) for line in header_lines(headers)) <= 998


@pytest.mark.parametrize("name", [n for n in spf.__all__ if isinstance(getattr(spf, n), Reply)])
def test_reply_constants_are_well_formed(name: str) -> None:
    reply: Reply = getattr(spf, name)
    assert reply.enhanced[0] == str(reply.code)[0] and reply.code >= 400
