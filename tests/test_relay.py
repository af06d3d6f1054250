"""plugins.relay: no open relay, whatever the recipient address looks like.

Addresses come from ``gateway.address.parse_path`` so the tests judge what
the core really hands the plugin; the few tricks the parser already refuses
are also checked with hand-built addresses, so the plugin does not depend on
the parser for its safety.
"""

from __future__ import annotations

import ipaddress

import pytest

from gateway import Action, Address, Context, Envelope, Recipient, Session, Verdict
from gateway.address import PathError, parse_path
from gateway.config import GatewaySettings, Policy, PolicyError
from gateway.pipeline import run_stage
from gateway.plugins import load_plugins
from gateway.replies import Reply
from plugins.relay import Finding, RelayPlugin, classify, relay_decision

SETTINGS = GatewaySettings(
    hostname="gw.example.net",
    local_domains=("example.com",),
    trusted_networks=("198.51.100.0/24",),
)
CONTEXT = Context(SETTINGS)
OUTSIDE = "203.0.113.5"
INSIDE = "198.51.100.7"


def rcpt(path: str) -> Address:
    return parse_path(f"TO:{path}", "TO")[0]


def session(ip: str) -> Session:
    address = ipaddress.ip_address(ip)
    # As the core does at connect and after XCLIENT.
    return Session(client_ip=address, trusted=CONTEXT.is_trusted(address))


def decide(path: str, *, trusted: bool = False, allow_subdomains: bool = False) -> Verdict:
    return relay_decision(
        rcpt(path), CONTEXT.is_local_domain, trusted, allow_subdomains=allow_subdomains
    )


def denied(mailbox: str) -> Reply:
    return Reply(554, "5.7.1", f"<{mailbox}>: Relay access denied")


# (path as sent, what the plugin finds, the mailbox named in the reply)
TRICKS = [
    ("<user%remote.example@example.com>", Finding.PERCENT_HACK, "user%remote.example@example.com"),
    ("<user%remote.example@EXAMPLE.COM>", Finding.PERCENT_HACK, "user%remote.example@EXAMPLE.COM"),
    ("<user%remote.example%relay.example@example.com>", Finding.PERCENT_HACK, "user%remote.example%relay.example@example.com"),
    ("<@example.com:user@remote.example>", Finding.SOURCE_ROUTE, "user@remote.example"),
    ("<@remote.example:user@example.com>", Finding.SOURCE_ROUTE, "user@example.com"),
    ("<@example.com,@example.com:user@example.com>", Finding.SOURCE_ROUTE, "user@example.com"),
    ("<remote.example!user@example.com>", Finding.BANG_PATH, "remote.example!user@example.com"),
    ('<"user@remote.example"@example.com>', Finding.AT_IN_LOCAL_PART, '"user@remote.example"@example.com'),
    ('<"user\\@remote.example"@example.com>', Finding.AT_IN_LOCAL_PART, '"user\\@remote.example"@example.com'),
    ('<"@remote.example:user"@example.com>', Finding.AT_IN_LOCAL_PART, '"@remote.example:user"@example.com'),
    ('<"user%remote.example"@example.com>', Finding.PERCENT_HACK, '"user%remote.example"@example.com'),
    ('<"remote.example!user"@example.com>', Finding.BANG_PATH, '"remote.example!user"@example.com'),
    ("<user@[192.0.2.1]>", Finding.ADDRESS_LITERAL, "user@[192.0.2.1]"),
    ("<user@[IPv6:2001:db8::1]>", Finding.ADDRESS_LITERAL, "user@[IPv6:2001:db8::1]"),
    ("<user@sub.example.com>", Finding.SUBDOMAIN, "user@sub.example.com"),
    ("<user@a.b.example.com>", Finding.SUBDOMAIN, "user@a.b.example.com"),
    ("<user@remote.example>", Finding.REMOTE, "user@remote.example"),
    ("<user@example.com.remote.example>", Finding.REMOTE, "user@example.com.remote.example"),
    ("<user@notexample.com>", Finding.REMOTE, "user@notexample.com"),
    ("<user@com>", Finding.REMOTE, "user@com"),
    ("<Postmaster@remote.example>", Finding.REMOTE, "Postmaster@remote.example"),
    ("user@remote.example", Finding.REMOTE, "user@remote.example"),
]

LOCAL = [
    "<user@example.com>",
    "<USER@EXAMPLE.COM>",
    "<User@Example.Com>",
    "user@example.com",
    "<user@example.com> NOTIFY=NEVER",
    '<"user"@example.com>',
    '<"first last"@example.com>',
    "<first.last+tag@example.com>",
    "<Postmaster@example.com>",
]

POSTMASTER = ["<Postmaster>", "<postmaster>", "<POSTMASTER>"]


# --- untrusted clients ----------------------------------------------------------


@pytest.mark.parametrize("path,finding,mailbox", TRICKS)
def test_trick_is_denied_to_untrusted_client(path: str, finding: Finding, mailbox: str) -> None:
    verdict = decide(path)
    assert verdict.action is Action.REJECT
    assert verdict.reply == denied(mailbox)
    assert verdict.result == f"relay=denied {finding}"


def test_denial_is_postfix_wording_on_the_wire() -> None:
    verdict = decide("<user%remote.example@example.com>")
    assert verdict.reply is not None
    assert verdict.reply.wire() == b"554 5.7.1 <user%remote.example@example.com>: Relay access denied\r\n"


@pytest.mark.parametrize("path", LOCAL)
def test_local_recipient_is_accepted_from_anyone(path: str) -> None:
    for trusted in (False, True):
        verdict = decide(path, trusted=trusted)
        assert (verdict.action, verdict.reply, verdict.result) == (Action.CONTINUE, None, "relay=local")


@pytest.mark.parametrize("path", POSTMASTER)
def test_bare_postmaster_is_always_accepted(path: str) -> None:
    address = rcpt(path)
    assert address.domain == ""
    for trusted in (False, True):
        verdict = relay_decision(address, CONTEXT.is_local_domain, trusted)
        assert (verdict.action, verdict.reply, verdict.result) == (Action.CONTINUE, None, "relay=postmaster")


@pytest.mark.parametrize(
    "path", ["<user@remote.example@example.com>", "<user@example.com.>", '<"postmaster">', "<user>"]
)
def test_parser_refuses_before_the_plugin(path: str) -> None:
    # The core answers these 501 5.1.3 itself; the plugin never sees them.
    with pytest.raises(PathError):
        rcpt(path)


@pytest.mark.parametrize(
    "address,finding",
    [
        # What the parser refuses today, in case it is ever loosened.
        (Address("user@remote.example", "example.com"), Finding.AT_IN_LOCAL_PART),
        (Address("user", "example.com."), Finding.TRAILING_DOT),
        (Address("user", "EXAMPLE.COM."), Finding.TRAILING_DOT),
        (Address("user", ".example.com"), Finding.REMOTE),
        (Address("user", "a..example.com"), Finding.REMOTE),
        (Address("user", ""), Finding.NO_DOMAIN),
        (Address('"postmaster"', ""), Finding.NO_DOMAIN),
        (Address("postmaster", "", "@remote.example:"), Finding.SOURCE_ROUTE),
        (Address("user", "[example.com]"), Finding.ADDRESS_LITERAL),
    ],
)
def test_hand_built_addresses_are_denied(address: Address, finding: Finding) -> None:
    verdict = relay_decision(address, CONTEXT.is_local_domain, False)
    assert verdict.reply == denied(address.mailbox)
    assert verdict.result == f"relay=denied {finding}"


def test_unicode_domain_is_not_local_without_conversion() -> None:
    # local_domains are ASCII; a U-label is never compared through a lossy
    # conversion (IDNA 2003 maps ß to ss), so it is simply not ours.
    address = parse_path("TO:<user@exämple.com>", "TO", utf8=True)[0]
    assert classify(address, CONTEXT.is_local_domain) is Finding.REMOTE


# --- trusted clients ----------------------------------------------------------


@pytest.mark.parametrize("path,finding,mailbox", TRICKS)
def test_trusted_client_may_relay_anywhere(path: str, finding: Finding, mailbox: str) -> None:
    verdict = decide(path, trusted=True)
    assert (verdict.action, verdict.reply) == (Action.CONTINUE, None)
    assert verdict.result == f"relay=trusted {finding}"


# --- allow_subdomains ---------------------------------------------------------


@pytest.mark.parametrize("path", ["<user@sub.example.com>", "<user@a.b.EXAMPLE.com>"])
def test_allow_subdomains_makes_subdomains_local(path: str) -> None:
    verdict = decide(path, allow_subdomains=True)
    assert (verdict.action, verdict.result) == (Action.CONTINUE, "relay=local")


@pytest.mark.parametrize(
    "path,finding",
    [
        ("<user@example.com.remote.example>", Finding.REMOTE),
        ("<user@notexample.com>", Finding.REMOTE),
        ("<user%remote.example@sub.example.com>", Finding.PERCENT_HACK),
        ("<@sub.example.com:user@remote.example>", Finding.SOURCE_ROUTE),
        ("<user@[192.0.2.1]>", Finding.ADDRESS_LITERAL),
    ],
)
def test_allow_subdomains_keeps_every_other_check(path: str, finding: Finding) -> None:
    verdict = decide(path, allow_subdomains=True)
    assert verdict.action is Action.REJECT
    assert verdict.result == f"relay=denied {finding}"


# --- the hook -----------------------------------------------------------------


def plugin(**options: bool) -> RelayPlugin:
    return RelayPlugin(RelayPlugin.Options(**options), CONTEXT, "relay")


def call_rcpt(p: RelayPlugin, s: Session, path: str) -> Verdict:
    # The implementation takes only what it uses, as pluggy allows.
    return p.rcpt(session=s, recipient=Recipient(rcpt(path)))


def test_hook_denies_remote_recipient_from_outside() -> None:
    verdict = call_rcpt(plugin(), session(OUTSIDE), "<user@remote.example>")
    assert verdict.action is Action.REJECT
    assert verdict.reply == denied("user@remote.example")
    assert verdict.result == "relay=denied remote"


def test_hook_accepts_local_recipient_from_outside() -> None:
    verdict = call_rcpt(plugin(), session(OUTSIDE), "<User@Example.COM>")
    assert (verdict.action, verdict.result) == (Action.CONTINUE, "relay=local")


def test_hook_lets_trusted_network_relay() -> None:
    s = session(INSIDE)
    assert s.trusted
    verdict = call_rcpt(plugin(), s, "<user@remote.example>")
    assert (verdict.action, verdict.result) == (Action.CONTINUE, "relay=trusted remote")


def test_hook_follows_session_trusted_not_the_address() -> None:
    # After XCLIENT the core recomputes session.trusted; the plugin must use
    # that flag rather than second-guess it.
    s = session(INSIDE)
    s.trusted = False
    assert call_rcpt(plugin(), s, "<user@remote.example>").action is Action.REJECT
    s = session(OUTSIDE)
    s.trusted = True
    assert call_rcpt(plugin(), s, "<user@remote.example>").action is Action.CONTINUE


def test_hook_honours_allow_subdomains() -> None:
    assert call_rcpt(plugin(), session(OUTSIDE), "<user@sub.example.com>").action is Action.REJECT
    verdict = call_rcpt(plugin(allow_subdomains=True), session(OUTSIDE), "<user@sub.example.com>")
    assert verdict.action is Action.CONTINUE


# --- loading through the policy -----------------------------------------------


def test_relay_runs_when_the_policy_forgets_it() -> None:
    registry = load_plugins(Policy("policy.toml", SETTINGS))
    assert "relay" in [p.name for p in registry.plugins]
    assert [c.plugin for c in registry.calls["rcpt"]] == ["relay"]


def test_relay_can_be_disabled_explicitly() -> None:
    registry = load_plugins(Policy("policy.toml", SETTINGS, plugins={"relay": {"enabled": False}}))
    assert "relay" not in [p.name for p in registry.plugins]


def test_bad_relay_option_names_the_key() -> None:
    policy = Policy("policy.toml", SETTINGS, plugins={"relay": {"allow_subdomains": "yes"}})
    with pytest.raises(PolicyError) as info:
        load_plugins(policy)
    assert [(p.file, p.key) for p in info.value.problems] == [("policy.toml", "plugins.relay.allow_subdomains")]


async def test_pipeline_refuses_relay_through_the_real_stage() -> None:
    registry = load_plugins(Policy("policy.toml", SETTINGS))
    kwargs = {
        "session": session(OUTSIDE),
        "envelope": Envelope(sender=rcpt("<sender@remote.example>")),
        "recipient": Recipient(rcpt("<@example.com:user@remote.example>")),
    }
    verdict = await run_stage(registry.calls["rcpt"], kwargs, 1.0, "test")
    assert verdict.action is Action.REJECT
    assert verdict.plugin == "relay"
    assert str(verdict.reply) == "554 5.7.1 <user@remote.example>: Relay access denied"
    assert verdict.result == "relay=denied source-route"
