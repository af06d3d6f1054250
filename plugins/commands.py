"""VRFY and EXPN: answer without disclosing any mailbox.

The gateway never passes VRFY or EXPN to the next hop; this plugin decides
the answer.  It is enabled by default, like the core's own fallback replies,
so the answers are the same whether or not a policy lists it.

Options (``[plugins.commands]``):

``vrfy`` (default ``"disabled"``)
    ``"disabled"``: ``502 5.5.1 VRFY command is disabled`` (Postfix's
    ``disable_vrfy_command = yes``).  ``"cannot-verify"``: ``252 2.5.2
    Cannot VRFY user, but will accept message and attempt delivery``, the
    answer RFC 5321 §3.5.3 suggests for a server that will not say; it
    tells nothing either, but keeps clients that insist on VRFY happy.

EXPN always gets ``502 5.5.1 EXPN command is disabled``: expanding a list
only helps address harvesters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from gateway import Action, Context, Plugin, Verdict, hookimpl, replies

__all__ = ["EXPN_VERDICT", "CommandsPlugin", "VrfyMode", "vrfy_verdict"]

VrfyMode = Literal["disabled", "cannot-verify"]

_VRFY: dict[str, Verdict] = {
    "disabled": Verdict.reject(replies.VRFY_DISABLED, result="vrfy=disabled"),
    "cannot-verify": Verdict(Action.ACCEPT, replies.CANNOT_VRFY, result="vrfy=cannot-verify"),
}

EXPN_VERDICT = Verdict.reject(replies.EXPN_DISABLED, result="expn=disabled")


def vrfy_verdict(mode: VrfyMode) -> Verdict:
    """The answer to every VRFY under ``mode``; raises ``ValueError`` for
    a mode that does not exist."""
    try:
        return _VRFY[mode]
    except KeyError:
        raise ValueError(f"vrfy: expected one of {', '.join(map(repr, _VRFY))}, got {mode!r}") from None


class CommandsPlugin(Plugin):
    """Answers VRFY and EXPN without looking anything up."""

    @dataclass(frozen=True)
    class Options:
        vrfy: VrfyMode = "disabled"

    default_enabled = True
    # Its answers disclose nothing in any mode; a trial changes none of them.
    monitored = False

    def __init__(self, options: Any, context: Context, name: str = "") -> None:
        super().__init__(options, context, name)
        # Looked up once, so options built by hand with a bad mode fail at
        # start-up rather than as a 451 on every VRFY.
        self._vrfy = vrfy_verdict(options.vrfy)

    # The answer depends on neither the client nor the argument, so the
    # hooks take no arguments (pluggy passes only those named).
    @hookimpl
    def vrfy(self) -> Verdict:
        return self._vrfy

    @hookimpl
    def expn(self) -> Verdict:
        return EXPN_VERDICT
