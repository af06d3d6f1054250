"""The base class of plugins, and what the gateway shares with them."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import pluggy

from .config import GatewaySettings, ip_in

if TYPE_CHECKING:
    from .session import IPAddress

__all__ = ["hookimpl", "Plugin", "Context", "NoOptions", "then"]

T = TypeVar("T")
R = TypeVar("R")

#: Marks a method as a hook implementation; unmarked methods are ignored and
#: a marked method whose name is no hook is an error at start-up.
hookimpl = pluggy.HookimplMarker("smtpgate")


@dataclass(frozen=True)
class NoOptions:
    """For plugins that take no options besides ``enabled``."""


@dataclass(frozen=True)
class Context:
    """Gateway-wide facts a plugin may read (never its own options).

    :param gateway: the ``[gateway]`` settings (hostname, local domains,
        trusted networks, ...).
    :param resolver: the shared async DNS resolver (:mod:`gateway.dns`),
        ``None`` where a plugin is built outside a running gateway.
    """

    gateway: GatewaySettings = field(default_factory=GatewaySettings)
    resolver: Any = None
    #: The names of the plugins the policy enables, known before any plugin
    #: is built, so plugins can divide work (one Authentication-Results).
    plugins: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        # Parsed once here rather than per session by every plugin.
        object.__setattr__(self, "_local", self.gateway.local_domain_set)
        object.__setattr__(self, "_trusted", self.gateway.trusted)

    @property
    def hostname(self) -> str:
        return self.gateway.hostname

    def is_local_domain(self, domain: str) -> bool:
        """Exact, case-insensitive match against ``local_domains``."""
        return domain.lower() in self._local  # type: ignore[attr-defined]

    def is_trusted(self, ip: IPAddress) -> bool:
        return ip_in(ip, self._trusted)  # type: ignore[attr-defined]


class Plugin:
    """Base class for plugins (optional: any class with the same
    constructor and ``Options`` works).

    :cvar Options: a frozen dataclass describing the plugin's
        ``[plugins.NAME]`` table, with defaults.  Keys not declared there are
        errors in the policy; ``enabled`` is handled by the gateway.
    :cvar default_enabled: whether the plugin runs when the policy has no
        table for it.  Only safety checks (relay, VRFY/EXPN) should say yes.
    :cvar monitored: whether ``[gateway] monitor = true`` turns the plugin's
        refusals (and its failures) into log lines.  Say no for a check that
        guards access rather than judges mail: trying a policy must never
        make the gateway an open relay.
    """

    Options: ClassVar[type] = NoOptions
    default_enabled: ClassVar[bool] = False
    monitored: ClassVar[bool] = True

    def __init__(self, options: Any, context: Context, name: str = "") -> None:
        self.options = options
        self.context = context
        self.name = name or type(self).__name__.lower()
        self.log = logging.getLogger(f"smtpgate.plugin.{self.name}")

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"


def then(result: T | Awaitable[T], function: Callable[[T], R]) -> R | Coroutine[Any, Any, R]:
    """``function(result)``: at once if ``result`` is at hand, else as a
    coroutine that awaits ``result`` first.

    For a plain ``def`` hook that answers from a cache when it can and must
    wait only otherwise (see :mod:`gateway.hookspecs`): the gateway uses a
    plain answer at once and awaits a coroutine, so a warm cache costs no
    task and no timer::

        @hookimpl
        def mail(self, session, envelope):
            return then(self.lookup(envelope.sender.domain), self.judge)
    """
    if inspect.isawaitable(result):
        pending = result

        async def later() -> R:
            return function(await pending)

        return later()
    return function(result)
