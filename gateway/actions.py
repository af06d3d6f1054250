"""From what a plugin found to what the gateway does: the policy decides.

A plugin reports a *finding* (``"fail"``, ``"listed"``, ``"not_fqdn"``) and
the reply it would give; its policy table maps findings to actions::

    [plugins.spf.actions]
    fail = "reject"      # its reply, a 5yz
    temperror = "defer"  # its temporary reply, a 4yz
    softfail = 3.0       # a score, summed per transaction ([scoring])
    neutral = "tag"      # headers only
    pass = "accept"      # an allow-list hit

A finding not in the map only informs (its headers still go on the
message).  Plugins declare defaults in their ``Options``; a new check
therefore never starts rejecting mail unless its defaults say so.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import ClassVar

from .replies import Reply
from .verdict import Action, Verdict

__all__ = ["ActionSpec", "ACTION_NAMES", "ActionOptions", "check_actions", "decide"]

#: What a finding may map to: one of these names, or a score.
ActionSpec = str | float
ACTION_NAMES = ("reject", "defer", "tag", "accept", "continue")


@dataclass(frozen=True)
class ActionOptions:
    """Base for a plugin's ``Options`` with an ``actions`` table.

    The policy's table is merged over the class's ``DEFAULT_ACTIONS``, so a
    policy names only the findings it changes (``softfail = 2.0`` keeps
    ``fail = "reject"``).
    """

    DEFAULT_ACTIONS: ClassVar[Mapping[str, ActionSpec]] = {}

    #: Finding -> action or score; merged over ``DEFAULT_ACTIONS``.
    actions: dict[str, ActionSpec] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "actions", {**self.DEFAULT_ACTIONS, **self.actions})


def check_actions(
    actions: Mapping[str, ActionSpec], findings: tuple[str, ...], temporary: Collection[str] = ()
) -> dict[str, str]:
    """Problems in an ``actions`` table, as ``{key: expected}`` for a
    plugin's ``Options.check()``.

    :param temporary: the findings that report a temporary failure (a DNS
        timeout, a SERVFAIL): they may not map to ``reject``, since a 5yz
        for a temporary problem bounces mail that a retry would deliver.
    """
    bad = {}
    for finding, action in actions.items():
        if finding not in findings:
            bad[f"actions.{finding}"] = f"a finding of this plugin ({', '.join(findings)})"
        elif isinstance(action, str) and action not in ACTION_NAMES:
            bad[f"actions.{finding}"] = f"one of {', '.join(ACTION_NAMES)} or a score"
        elif action == "reject" and finding in temporary:
            bad[f"actions.{finding}"] = "defer, tag, accept, continue or a score (a temporary failure must not bounce mail)"
    return bad


def decide(
    finding: str,
    actions: Mapping[str, ActionSpec],
    *,
    reject: Reply | None = None,
    defer: Reply | None = None,
    headers: tuple[tuple[str, str], ...] = (),
    result: str = "",
) -> Verdict:
    """The verdict the policy gives ``finding``.

    :param reject: the 5yz to send when the policy says ``reject``.
    :param defer: the 4yz to send when the policy says ``defer``; when a
        plugin has none, ``reject``'s text with 451 and a 4.x.x code.
    """
    action = actions.get(finding, "continue")
    result = result or finding
    if isinstance(action, (int, float)) and not isinstance(action, bool):
        return Verdict(Action.CONTINUE, headers=headers, score=float(action), result=result)
    if action == "reject" and reject is not None:
        return Verdict.reject(reject, headers=headers, result=result)
    if action == "defer" and (defer or reject) is not None:
        return Verdict.defer(defer or _temporary(reject), headers=headers, result=result)  # type: ignore[arg-type]
    if action == "tag":
        return Verdict(Action.TAG, headers=headers, result=result)
    if action == "accept":
        return Verdict(Action.ACCEPT, headers=headers, result=result)
    return Verdict(Action.CONTINUE, headers=headers, result=result)


def _temporary(reply: Reply) -> Reply:
    """The 4yz twin of a 5yz: same words, same subject and detail codes."""
    enhanced = "4" + reply.enhanced[1:] if reply.enhanced else ""
    return Reply(451, enhanced, reply.text)
