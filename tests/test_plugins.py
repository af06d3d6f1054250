"""Loading plugins: order from the policy, defaults, validation."""

import logging
import dataclasses
from dataclasses import dataclass

import pytest

from gateway import ActionOptions, Plugin, Reply, check_actions, decide, hookimpl
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


class Lookup(Plugin):
    """A third-party check built on the public findings-and-actions API."""

    FINDINGS = ("listed", "tempfail", "clean")

    @dataclass(frozen=True)
    class Options(ActionOptions):
        DEFAULT_ACTIONS = {"listed": "reject"}

        def check(self) -> dict[str, str]:
            return check_actions(self.actions, Lookup.FINDINGS, ("tempfail",))

    @hookimpl
    def mail(self, envelope):
        finding = envelope.sender.domain.split(".")[0]
        return decide(finding, self.options.actions, reject=Reply(550, "5.7.1", "Listed"), result=f"lookup={finding}")


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


@pytest.mark.parametrize("name,value,source,why", [
    ("broken", "no_such_module_anywhere:Plugin", None, "ModuleNotFoundError("),
    # sys.exit() at import (a missing licence, a wrong Python) is SystemExit,
    # no Exception: it ended lint and serve with its bare message, exit 1,
    # even for a policy that never names the plugin.
    ("quits", "tp_quits:Plugin", "import sys\nsys.exit('no licence key')\n", "SystemExit('no licence key')"),
], ids=["missing-module", "sys-exit"])
def test_a_broken_plugin_is_an_error_only_where_the_policy_names_it(
    monkeypatch, tmp_path, caplog, name, value, source, why
) -> None:
    from importlib.metadata import EntryPoint

    import gateway.plugins as plugins_module

    if source is not None:
        (tmp_path / f"{value.split(':')[0]}.py").write_text(source)
        monkeypatch.syspath_prepend(str(tmp_path))
    real = plugins_module.installed()
    broken = EntryPoint(name, value, "smtpgate.plugins")
    monkeypatch.setattr(plugins_module, "installed", lambda: {**real, name: broken})
    with caplog.at_level(logging.WARNING, "smtpgate"):
        registry = load({}, {})
    assert name not in {p.name for p in registry.plugins}
    assert f"plugin {name} ({value}" in caplog.text and why in caplog.text
    with pytest.raises(PolicyError) as info:
        load({name: {}}, {})
    (problem,) = info.value.problems
    assert problem.key == f"plugins.{name}"
    assert problem.expected.startswith(f"an importable plugin ({value}") and why in problem.expected


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


class NeedsKey(Plugin):
    @dataclass(frozen=True)
    class Options:
        api_key: str
        limit: int = 5

        def __post_init__(self) -> None:
            if self.limit < 1:
                raise ValueError("limit must be at least 1")

    @hookimpl
    def mail(self):
        return None


class CannotWork(Plugin):
    def __init__(self, options, context, name=""):
        super().__init__(options, context, name)
        raise RuntimeError("no licence file")

    @hookimpl
    def mail(self):
        return None


def test_an_option_without_default_must_be_given() -> None:
    # Once, the plugin was silently left out and lint said ok.
    with pytest.raises(PolicyError) as info:
        load({"needs": {}}, {"needs": NeedsKey})
    (problem,) = info.value.problems
    assert (problem.key, problem.expected) == ("plugins.needs.api_key", "a value (this key has no default)")
    assert [p.name for p in load({"needs": {"api_key": "k"}}, {"needs": NeedsKey}).plugins][0] == "needs"


def test_options_refused_by_their_own_post_init_are_a_problem() -> None:
    with pytest.raises(PolicyError) as info:
        load({"needs": {"api_key": "k", "limit": 0}}, {"needs": NeedsKey})
    (problem,) = info.value.problems
    assert problem.key == "plugins.needs" and "limit must be at least 1" in problem.expected


def test_a_disabled_plugin_need_not_be_given_its_required_options() -> None:
    registry = load({"needs": {"enabled": False}}, {"needs": NeedsKey})
    assert "needs" not in {p.name for p in registry.plugins}


class RaisingProperty(A):
    """pluggy reads every attribute of a plugin as it registers it."""

    @property
    def connected(self) -> bool:
        raise RuntimeError("not connected yet")


@pytest.mark.parametrize("cls,expected,logged", [
    (CannotWork, "a plugin that starts (RuntimeError('no licence file'))", "RuntimeError: no licence file"),
    # Once, the RuntimeError's traceback from inside pluggy, and exit 1.
    (RaisingProperty, "a plugin pluggy can register (RuntimeError('not connected yet'))",
     "RuntimeError: not connected yet"),
], ids=["constructor", "registration"])
def test_a_plugin_that_raises_as_it_is_set_up_is_a_named_problem(caplog, cls, expected, logged) -> None:
    with caplog.at_level(logging.ERROR, "smtpgate"), pytest.raises(PolicyError) as info:
        load({"cannot": {}}, {"cannot": cls})
    (problem,) = info.value.problems
    assert problem.key == "plugins.cannot"
    assert problem.expected == expected
    assert "plugin cannot" in caplog.text and logged in caplog.text


def test_a_plugin_of_ours_maps_findings_to_actions_through_the_policy() -> None:
    from gateway import Action, Envelope
    from gateway.address import parse_path

    def verdict(actions, domain):
        registry = load({"lookup": {"actions": actions}}, {"lookup": Lookup})
        (plugin,) = [p for p in registry.plugins if p.name == "lookup"]
        return plugin.instance.mail(Envelope(parse_path(f"FROM:<a@{domain}>", "FROM")[0]))

    assert verdict({}, "listed.example").reply == Reply(550, "5.7.1", "Listed")  # the default
    assert verdict({"listed": 2.5}, "listed.example").score == 2.5
    deferred = verdict({"tempfail": "defer"}, "tempfail.example")
    assert deferred.action is Action.DEFER and deferred.reply == Reply(451, "4.7.1", "Listed")
    assert verdict({}, "clean.example").action is Action.CONTINUE
    with pytest.raises(PolicyError) as info:
        load({"lookup": {"actions": {"tempfail": "reject", "spam": "tag"}}}, {"lookup": Lookup})
    assert {(p.key, p.expected) for p in info.value.problems} == {
        ("plugins.lookup.actions.tempfail", "defer, tag, accept, continue or a score (a temporary failure must not bounce mail)"),
        ("plugins.lookup.actions.spam", "a finding of this plugin (listed, tempfail, clean)"),
    }


class ListTyped(Plugin):
    @dataclass(frozen=True)
    class Options:
        names: list[str] = dataclasses.field(default_factory=list)  # the loader gives tuples, not lists
        limit: int = 3

    @hookimpl
    def rcpt(self):
        return None


@pytest.mark.parametrize("table", [{}, {"names": ["a"]}], ids=["unset", "set"])
def test_an_option_type_the_loader_cannot_check_is_named_even_unset(table) -> None:
    with pytest.raises(PolicyError) as info:
        load({"listy": table}, {"listy": ListTyped})
    (problem,) = info.value.problems
    assert problem.key == "plugins.listy.names"
    assert problem.expected == "an option type the loader takes, not list[str] (a bug in the plugin)"


class PlainOptions(Plugin):
    class Options:  # not a dataclass: the author forgot @dataclass
        level: int = 1

    @hookimpl
    def rcpt(self):
        return None


class UnresolvedOptions(Plugin):
    @dataclass(frozen=True)
    class Options:
        # A name imported only under TYPE_CHECKING: the annotation cannot
        # be resolved when the loader reads it.
        level: "Decimal | None" = None  # noqa: F821

    @hookimpl
    def rcpt(self):
        return None


@pytest.mark.parametrize("cls,why", [
    (PlainOptions, "a dataclass"),
    (UnresolvedOptions, "NameError"),
], ids=["not-a-dataclass", "unresolved-annotation"])
@pytest.mark.parametrize("table", [{}, {"enabled": False}], ids=["enabled", "disabled"])
def test_options_the_loader_cannot_read_are_a_named_problem(cls, why, table) -> None:
    # Once, a traceback from dataclasses or typing, and exit 1 from lint.
    with pytest.raises(PolicyError) as info:
        load({"odd": table}, {"odd": cls})
    (problem,) = info.value.problems
    assert problem.key == "plugins.odd"
    assert problem.expected.startswith("an Options dataclass the loader can read (")
    assert why in problem.expected and problem.expected.endswith("(a bug in the plugin)")
