"""What a plugin decides, and how the decisions of one stage become one.

A plugin returns a :class:`Verdict` (or ``None``, which means "continue").
The gateway runs every plugin of a stage concurrently and folds their verdicts
with :func:`combine`: the most severe action wins, ties go to the plugin listed
first in the policy, headers and scores of every verdict are kept.  Scores are
carried even when the action is ``CONTINUE`` so a scoring mode (scores summed
against thresholds, like rspamd's actions) needs no other shape.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .replies import Reply, enhanced_class

__all__ = ["Action", "Verdict", "combine", "CONTINUE"]


class Action(enum.IntEnum):
    """Outcomes, ordered by severity: a larger value overrides a smaller one."""

    CONTINUE = 0
    #: An allow-list hit.  At connect the client is allow-listed for the
    #: session (it skips the checks that honour it); at other stages it is
    #: recorded and otherwise the same as CONTINUE.
    ACCEPT = 1
    #: Add headers (and score); the command goes on to the next hop.  A TAG
    #: verdict without headers gets ``X-Smtpgate-Tag: plugin: result``.
    TAG = 2
    #: Temporary refusal (4yz): the client keeps the mail and retries.
    DEFER = 3
    #: Permanent refusal (5yz): the client bounces the mail.
    REJECT = 4


@dataclass(frozen=True, slots=True)
class Verdict:
    """One plugin's decision at one stage.

    :param action: what to do with the command.
    :param reply: the reply to send for DEFER and REJECT (its code must be
        4yz or 5yz respectively); for ACCEPT at VRFY/EXPN it is the
        answer; ignored otherwise.
    :param plugin: the plugin that decided; the gateway fills it in.
    :param headers: ``(name, value)`` pairs to prepend to the message.
    :param score: added to the transaction's score.
    :param result: a short machine-readable finding for logs and headers,
        e.g. ``"spf=fail"`` or ``"listed zen.example"``.
    :param disconnect: for DEFER and REJECT, close the session after
        sending the reply (a DEFER's with code 421), at any stage.
    """

    action: Action = Action.CONTINUE
    reply: Reply | None = None
    plugin: str = ""
    headers: tuple[tuple[str, str], ...] = ()
    score: float = 0.0
    result: str = ""
    disconnect: bool = False
    #: For a combined verdict: the verdicts it was made of, so headers and
    #: scores stay attributed to the plugin that gave them.
    parts: tuple[Verdict, ...] = ()

    def __post_init__(self) -> None:
        if self.action in (Action.DEFER, Action.REJECT):
            if self.reply is None:
                raise ValueError(f"a {self.action.name} verdict needs a reply")
            wanted = 4 if self.action is Action.DEFER else 5
            if self.reply.code // 100 != wanted:
                raise ValueError(
                    f"a {self.action.name} verdict needs a {wanted}yz reply, "
                    f"got {self.reply.code}"
                )
            # We offer ENHANCEDSTATUSCODES: a client that reads only the
            # enhanced code must not take a refusal for the other kind.
            if enhanced_class(self.reply.enhanced) != wanted:
                raise ValueError(
                    f"a {self.action.name} verdict needs an RFC 3463 code {wanted}.x.y, "
                    f"got {self.reply.enhanced!r}"
                )

    @classmethod
    def reject(cls, reply: Reply, **kw: object) -> Verdict:
        return cls(Action.REJECT, reply, **kw)  # type: ignore[arg-type]

    @classmethod
    def defer(cls, reply: Reply, **kw: object) -> Verdict:
        return cls(Action.DEFER, reply, **kw)  # type: ignore[arg-type]

    @classmethod
    def tag(cls, *headers: tuple[str, str], **kw: object) -> Verdict:
        return cls(Action.TAG, None, headers=tuple(headers), **kw)  # type: ignore[arg-type]

    @property
    def refuses(self) -> bool:
        return self.action >= Action.DEFER

    def by(self, plugin: str) -> Verdict:
        """This verdict as ``plugin``'s, and so are the parts it combined
        (a plugin that folds several findings with :func:`combine`)."""
        if self.parts and any(p.plugin != plugin for p in self.parts):
            return self._with(plugin=plugin, parts=tuple(p.by(plugin) for p in self.parts))
        return self if self.plugin == plugin else self._with(plugin=plugin)

    def _with(self, **changes: Any) -> Verdict:
        """``dataclasses.replace`` for the hot path (every hook's verdict
        passes here): a direct construction costs half as much."""
        fields: dict[str, Any] = {
            "action": self.action, "reply": self.reply, "plugin": self.plugin, "headers": self.headers,
            "score": self.score, "result": self.result, "disconnect": self.disconnect, "parts": self.parts,
        }
        fields.update(changes)
        return Verdict(**fields)


CONTINUE = Verdict()


def combine(verdicts: Sequence[Verdict | None]) -> Verdict:
    """Fold one stage's verdicts, given in policy order, into one.

    The first verdict with the highest action decides the reply and the
    plugin -- except that among equal actions one that closes the
    connection (``disconnect``) wins, the more severe of the two; every
    verdict's headers and score are kept (a refused command never reaches
    the next hop, so they only matter when nothing refuses).
    """
    present = [v for v in verdicts if v is not None]
    if not present:
        return CONTINUE
    if len(present) == 1:
        return present[0]
    winner = present[0]
    for v in present[1:]:
        if v.action > winner.action or (
            v.action == winner.action and v.disconnect and not winner.disconnect
        ):
            winner = v
    headers = tuple(h for v in present for h in v.headers)
    score = sum(v.score for v in present)
    results = " ".join(v.result for v in present if v.result)
    return winner._with(headers=headers, score=score, result=results, parts=tuple(present))

