"""Loading plugins: order from the policy, defaults, validation."""

import logging

import pytest

from gateway import Plugin, hookimpl
from gateway.config import PolicyError, policy_from_dict
from gateway.plugin import Context
from gateway.plugins import load_plugins


class A(Plugin):
    @hookimpl
    def rcpt(self):
        return None


class B(Plugin):
    @hookimpl
    async def rcpt(self):
        return None


class Typo(Plugin):
    @hookimpl
    def rcpt_to(self):  # no such hook
        return None


def load(plugins, extra):
    policy = policy_from_dict({"gateway": {"hostname": "gw.example"}, "plugins": plugins}, "p.toml")
    return load_plugins(policy, Context(policy.gateway), extra=extra)


def test_policy_order_decides_call_order_then_default_enabled_plugins() -> None:
    registry = load({"b": {}, "a": {}}, {"a": A, "b": B})
    names = [p.name for p in registry.plugins]
    assert names[:2] == ["b", "a"]
    assert {"relay", "commands"} <= set(names[2:])  # default_enabled built-ins follow
    assert [c.plugin for c in registry.calls["rcpt"]][:2] == ["b", "a"]
    assert registry.calls["rcpt"][0].is_async and not registry.calls["rcpt"][1].is_async
    assert registry.context.plugins == frozenset(names)


def test_disabled_plugins_are_not_loaded() -> None:
    registry = load({"a": {"enabled": False}, "relay": {"enabled": False}}, {"a": A})
    assert {"a", "relay"}.isdisjoint(p.name for p in registry.plugins)
    assert "a" not in registry.context.plugins


def test_misspelt_hook_is_an_error_at_start_up() -> None:
    with pytest.raises(PolicyError) as info:
        load({"typo": {}}, {"typo": Typo})
    (problem,) = info.value.problems
    assert problem.key == "plugins" and "rcpt_to" in problem.expected


def test_option_errors_name_the_plugin_key() -> None:
    with pytest.raises(PolicyError) as info:
        load({"a": {"colour": "red"}, "commands": {"vrfy": 1}}, {"a": A})
    keys = [p.key for p in info.value.problems]
    assert keys == ["plugins.a.colour", "plugins.commands.vrfy"]
    assert str(info.value.problems[0]).startswith("p.toml: plugins.a.colour: unknown key")


def test_a_broken_plugin_is_an_error_only_where_the_policy_names_it(monkeypatch, caplog) -> None:
    from importlib.metadata import EntryPoint

    import gateway.plugins as plugins_module

    real = plugins_module.installed()
    broken = EntryPoint("broken", "no_such_module_anywhere:Plugin", "smtpgate.plugins")
    monkeypatch.setattr(plugins_module, "installed", lambda: {**real, "broken": broken})
    with caplog.at_level(logging.WARNING, "smtpgate"):
        registry = load({}, {})
    assert "broken" not in {p.name for p in registry.plugins}
    assert "plugin broken (no_such_module_anywhere:Plugin" in caplog.text
    with pytest.raises(PolicyError) as info:
        load({"broken": {}}, {})
    (problem,) = info.value.problems
    assert problem.key == "plugins.broken"
    assert problem.expected.startswith("an importable plugin (no_such_module_anywhere:Plugin")


@pytest.mark.parametrize("plugin,finding", [
    ("helo", "tempfail"), ("helo", "fcrdns_tempfail"), ("sender", "tempfail"), ("dnsbl", "tempfail"),
    ("spf", "temperror"), ("dkim", "temperror"), ("dkim", "required_temperror"), ("dmarc", "temperror"),
])
def test_a_temporary_failure_may_not_be_mapped_to_reject(plugin: str, finding: str) -> None:
    policy = policy_from_dict(
        {"gateway": {"hostname": "gw.example"}, "plugins": {plugin: {"actions": {finding: "reject"}}}}, "p.toml"
    )
    with pytest.raises(PolicyError) as info:
        load_plugins(policy, Context(policy.gateway))
    assert [p.key for p in info.value.problems] == [f"plugins.{plugin}.actions.{finding}"]
    assert "defer" in str(info.value)
