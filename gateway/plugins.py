"""Finding, configuring and ordering plugins: the plugin manager factory.

Built-in plugins and third-party ones are found the same way, through the
entry-point group ``smtpgate.plugins``.  The policy decides which run (a
``[plugins.NAME]`` table enables a plugin unless it says ``enabled = false``;
plugins with ``default_enabled`` run unless disabled) and in which order:
the order of the tables in the file, which is also the order in which ties
between verdicts are broken.  Nothing here runs at import time.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import Any

import pluggy

from . import hookspecs
from .config import Policy, PolicyError, Problem, parse_table
from .plugin import Context

__all__ = ["GROUP", "Registry", "LoadedPlugin", "HookCall", "load_plugins", "installed"]

GROUP = "smtpgate.plugins"
log = logging.getLogger("smtpgate.plugins")
STAGES = tuple(hookspecs.__all__)


@dataclass(frozen=True)
class HookCall:
    """One plugin's implementation of one stage, ready to call."""

    plugin: str
    function: Callable[..., Any]
    argnames: tuple[str, ...]
    is_async: bool


@dataclass(frozen=True)
class LoadedPlugin:
    name: str
    instance: Any
    origin: str
    hooks: tuple[str, ...]


@dataclass(frozen=True)
class Registry:
    """The enabled plugins of one policy, and per stage the calls to make,
    in policy order, computed once at start-up rather than per session."""

    manager: pluggy.PluginManager
    plugins: tuple[LoadedPlugin, ...]
    calls: Mapping[str, tuple[HookCall, ...]]
    #: The context the plugins were built with (``plugins`` filled in).
    context: Context
    #: Plugins whose refusals monitor mode leaves in force (``monitored = False``).
    enforced: frozenset[str] = frozenset()


def installed() -> dict[str, EntryPoint]:
    """Every plugin installed in this environment, by name."""
    return {ep.name: ep for ep in entry_points(group=GROUP)}


def _identity(value: type) -> type:
    return value


def _origin(ep: EntryPoint) -> str:
    dist = ep.dist
    where = f"{dist.name} {dist.version}" if dist is not None else "unknown distribution"
    return f"{ep.value} ({where})"


def load_plugins(
    policy: Policy,
    context: Context | None = None,
    *,
    extra: Mapping[str, type] | None = None,
) -> Registry:
    """Build the plugin manager for ``policy``.

    :param extra: plugin classes by name, used in addition to (and before)
        the installed entry points; for tests and embedding.
    Raises :class:`PolicyError` naming the file and key for an unknown
    plugin, a bad option, or a hook implementation that matches no hook.
    """
    context = context or Context(policy.gateway)
    problems: list[Problem] = []
    classes: dict[str, type | None] = {}

    def load(name: str, *, required: bool = True) -> type | None:
        # Imported on demand.  A broken plugin the policy does not name, or
        # names only to disable it, is no reason to stop.  SystemExit too:
        # a module that calls sys.exit() as it is imported is broken, not
        # a request to end the gateway.
        if name not in classes:
            try:
                classes[name] = available[name][0]()
            except (Exception, SystemExit) as exc:
                classes[name] = None
                if name in policy.plugins and required:
                    problems.append(Problem(policy.source, f"plugins.{name}",
                                            f"an importable plugin ({available[name][1]}: {exc!r})"))
                else:
                    log.warning("plugin %s (%s) does not import: %r", name, available[name][1], exc)
        return classes[name]

    available: dict[str, tuple[Callable[[], type], str]] = {
        name: (ep.load, _origin(ep)) for name, ep in installed().items()
    }
    for name, given in (extra or {}).items():
        available[name] = (functools.partial(_identity, given), f"{given.__module__}.{given.__qualname__}")

    order = [name for name in policy.plugins]
    tables = dict(policy.plugins)
    for name in available:
        if name not in tables and getattr(load(name), "default_enabled", False):
            order.append(name)
            tables[name] = {}

    enabled = [n for n in order if tables[n].get("enabled", True) is True and n in available]
    context = dataclasses.replace(context, plugins=frozenset(enabled))
    pm = pluggy.PluginManager("smtpgate")
    pm.add_hookspecs(hookspecs)
    loaded: list[LoadedPlugin] = []
    for name in order:
        table = tables[name]
        switch = table.get("enabled", True)
        if not isinstance(switch, bool):
            problems.append(Problem(policy.source, f"plugins.{name}.enabled", "expected true or false"))
            continue
        if name not in available:
            known = ", ".join(sorted(available)) or "none"
            problems.append(
                Problem(policy.source, f"plugins.{name}", f"an installed plugin (installed: {known})")
            )
            continue
        if not switch:
            # Still checked, so a typo made while preparing a table does not
            # wait for the day it is enabled.
            off = load(name, required=False)
            options = getattr(off, "Options", None)
            if options is not None:
                problems += parse_table(
                    options, table, f"plugins.{name}", policy.source, extra=frozenset({"enabled"}), complete=False
                )[1]
            continue
        origin = available[name][1]
        loaded_cls = load(name)
        if loaded_cls is None:
            continue
        cls = loaded_cls
        options_cls = getattr(cls, "Options", None)
        if options_cls is None:
            problems.append(Problem(policy.source, f"plugins.{name}", f"{origin} has no Options class"))
            continue
        options, found = parse_table(
            options_cls, table, f"plugins.{name}", policy.source, extra=frozenset({"enabled"})
        )
        problems += found
        if options is None:
            continue
        try:
            instance = cls(options, context, name)
        except Exception as exc:
            # The manual tells a plugin that cannot work to raise here: that
            # is a problem of this policy, named like any other, so lint and
            # serve exit 2 and a reload is refused, rather than a bare traceback.
            log.error("plugin %s (%s) failed to start", name, origin, exc_info=True)
            problems.append(Problem(policy.source, f"plugins.{name}", f"a plugin that starts ({exc!r})"))
            continue
        try:
            pm.register(instance, name=name)
        except pluggy.PluginValidationError as exc:
            problems.append(Problem(policy.source, f"plugins.{name}", f"valid hook implementations: {exc}"))
            continue
        except Exception as exc:  # pluggy reads every attribute: a property may raise
            log.error("plugin %s (%s) cannot be registered", name, origin, exc_info=True)
            problems.append(Problem(policy.source, f"plugins.{name}", f"a plugin pluggy can register ({exc!r})"))
            continue
        loaded.append(LoadedPlugin(name, instance, origin, ()))
    if not problems:
        try:
            pm.check_pending()
        except pluggy.PluginValidationError as exc:
            problems.append(Problem(policy.source, "plugins", f"hooks that exist: {exc}"))
    if problems:
        raise PolicyError(problems)

    calls: dict[str, tuple[HookCall, ...]] = {}
    position = {p.name: i for i, p in enumerate(loaded)}
    for stage in STAGES:
        impls = getattr(pm.hook, stage).get_hookimpls()
        calls[stage] = tuple(
            sorted(
                (
                    HookCall(
                        impl.plugin_name,
                        impl.function,
                        tuple(impl.argnames),
                        inspect.iscoroutinefunction(impl.function),
                    )
                    for impl in impls
                ),
                key=lambda c: position[c.plugin],
            )
        )
    plugins = tuple(
        LoadedPlugin(p.name, p.instance, p.origin, tuple(s for s in STAGES if any(c.plugin == p.name for c in calls[s])))
        for p in loaded
    )
    enforced = frozenset(p.name for p in loaded if not getattr(p.instance, "monitored", True))
    return Registry(pm, plugins, calls, context, enforced)
