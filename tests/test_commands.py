"""plugins.commands: VRFY and EXPN never disclose a mailbox."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from gateway import Action, Context, Session
from gateway.config import GatewaySettings, Policy, PolicyError, load_policy
from gateway.pipeline import run_stage
from gateway.plugins import load_plugins
from gateway.replies import Reply
from plugins.commands import EXPN_VERDICT, CommandsPlugin, VrfyMode, vrfy_verdict

SETTINGS = GatewaySettings(
    hostname="gw.example.net",
    local_domains=("example.com",),
    trusted_networks=("198.51.100.0/24",),
)
CONTEXT = Context(SETTINGS)

VRFY_502 = Reply(502, "5.5.1", "VRFY command is disabled")
EXPN_502 = Reply(502, "5.5.1", "EXPN command is disabled")
VRFY_252 = Reply(252, "2.5.2", "Cannot VRFY user, but will accept message and attempt delivery")


def plugin(vrfy: VrfyMode = "disabled") -> CommandsPlugin:
    return CommandsPlugin(CommandsPlugin.Options(vrfy=vrfy), CONTEXT, "commands")


def session(ip: str = "203.0.113.5") -> Session:
    address = ipaddress.ip_address(ip)
    return Session(client_ip=address, trusted=CONTEXT.is_trusted(address))


# --- the pure answers ---------------------------------------------------------


def test_vrfy_disabled_is_postfix_502() -> None:
    verdict = vrfy_verdict("disabled")
    assert (verdict.action, verdict.reply, verdict.result) == (Action.REJECT, VRFY_502, "vrfy=disabled")
    assert verdict.reply is not None
    assert verdict.reply.wire() == b"502 5.5.1 VRFY command is disabled\r\n"


def test_vrfy_cannot_verify_is_252() -> None:
    verdict = vrfy_verdict("cannot-verify")
    assert (verdict.action, verdict.reply, verdict.result) == (Action.ACCEPT, VRFY_252, "vrfy=cannot-verify")
    assert verdict.reply is not None
    assert verdict.reply.wire() == (
        b"252 2.5.2 Cannot VRFY user, but will accept message and attempt delivery\r\n"
    )


def test_expn_is_502() -> None:
    assert (EXPN_VERDICT.action, EXPN_VERDICT.reply, EXPN_VERDICT.result) == (
        Action.REJECT,
        EXPN_502,
        "expn=disabled",
    )


def test_unknown_vrfy_mode_fails_at_construction() -> None:
    with pytest.raises(ValueError, match="vrfy"):
        vrfy_verdict("yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="vrfy"):
        plugin("yes")  # type: ignore[arg-type]


# --- the hooks ----------------------------------------------------------------


def test_default_options_disable_vrfy() -> None:
    p = CommandsPlugin(CommandsPlugin.Options(), CONTEXT, "commands")
    assert p.vrfy().reply == VRFY_502


@pytest.mark.parametrize("mode", ["disabled", "cannot-verify"])
def test_expn_is_refused_in_every_mode(mode: VrfyMode) -> None:
    assert plugin(mode).expn().reply == EXPN_502


@pytest.mark.parametrize("mode,reply", [("disabled", VRFY_502), ("cannot-verify", VRFY_252)])
@pytest.mark.parametrize("ip", ["203.0.113.5", "198.51.100.7"])
@pytest.mark.parametrize("argument", ["root", "<postmaster@example.com>", "nobody@remote.example"])
async def test_answer_reveals_nothing(mode: VrfyMode, reply: Reply, ip: str, argument: str) -> None:
    # Through the real stage runner, with the arguments the core passes: the
    # same answer whoever asks about whatever.
    registry = load_plugins(Policy("policy.toml", SETTINGS, plugins={"commands": {"vrfy": mode}}))
    kwargs = {"session": session(ip), "argument": argument}
    vrfy = await run_stage(registry.calls["vrfy"], kwargs, 1.0, "test")
    expn = await run_stage(registry.calls["expn"], kwargs, 1.0, "test")
    assert (vrfy.reply, vrfy.plugin) == (reply, "commands")
    assert (expn.reply, expn.plugin) == (EXPN_502, "commands")


# --- loading through the policy -----------------------------------------------


def test_commands_run_when_the_policy_forgets_them() -> None:
    registry = load_plugins(Policy("policy.toml", SETTINGS))
    loaded = {p.name: p for p in registry.plugins}
    assert loaded["commands"].hooks == ("vrfy", "expn")
    assert loaded["commands"].instance.options == CommandsPlugin.Options(vrfy="disabled")


@pytest.mark.parametrize(
    "table,key",
    [
        ({"vrfy": "yes"}, "plugins.commands.vrfy"),
        ({"vrfy": True}, "plugins.commands.vrfy"),
        ({"expn": "disabled"}, "plugins.commands.expn"),
    ],
)
def test_bad_commands_option_names_the_key(table: dict[str, object], key: str) -> None:
    with pytest.raises(PolicyError) as info:
        load_plugins(Policy("policy.toml", SETTINGS, plugins={"commands": table}))
    assert [(p.file, p.key) for p in info.value.problems] == [("policy.toml", key)]


def test_bad_vrfy_in_a_policy_file(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(
        '[gateway]\nhostname = "gw.example.net"\nlocal_domains = ["example.com"]\n'
        '\n[plugins.commands]\nvrfy = "yes"\n'
    )
    with pytest.raises(PolicyError) as info:
        load_plugins(load_policy(path))
    assert str(info.value) == (
        f"{path}: plugins.commands.vrfy: expected one of 'disabled', 'cannot-verify', got 'yes'"
    )
