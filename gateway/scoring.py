"""Scores: what the verdicts of a session and a transaction add up to,
judged against the ``[scoring]`` thresholds (like rspamd's actions), and
the header fields that record it.

The SMTP front keeps the verdicts (:func:`keep`) and asks :func:`judge`
at the stage the policy names; monitor mode is the front's business.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from . import replies
from .config import ScoringSettings
from .verdict import CONTINUE, Action, Verdict

__all__ = ["keep", "total", "summary", "judge", "header_fields"]

_BLANKS = re.compile(r"\s")


def keep(verdict: Verdict, into: list[Verdict]) -> None:
    """Verdicts that did not refuse but carry headers or a score stay with
    the session or transaction until the message is sent."""
    if verdict is CONTINUE:
        return  # what a stage without hooks, or whose hooks said nothing, gives
    into.extend(
        v for v in (verdict.parts or (verdict,)) if v.headers or v.score or v.action is Action.TAG
    )


def total(verdicts: Sequence[Verdict]) -> float:
    # Rounded: 0.7 + 0.2 + 0.1 must reach a threshold of 1, as it reads.
    return round(sum(v.score for v in verdicts), 6)


def summary(verdicts: Sequence[Verdict]) -> str:
    """``plugin:result(score)`` for every scored verdict, for logs and headers."""
    return ",".join(
        f"{v.plugin}:{_BLANKS.sub('_', v.result or 'hit')}({v.score:g})" for v in verdicts if v.score
    ) or "none"


def judge(scoring: ScoringSettings, verdicts: Sequence[Verdict]) -> Verdict:
    """The refusal the summed score of ``verdicts`` earns, or CONTINUE."""
    if not scoring.enabled:
        return CONTINUE
    score = total(verdicts)
    if scoring.reject is not None and score >= scoring.reject:
        return Verdict.reject(replies.SCORE_REJECT.format(score=score), plugin="scoring", result=summary(verdicts))
    if scoring.defer is not None and score >= scoring.defer:
        return Verdict.defer(replies.SCORE_DEFER.format(score=score), plugin="scoring", result=summary(verdicts))
    return CONTINUE


def header_fields(scoring: ScoringSettings, verdicts: Sequence[Verdict]) -> list[tuple[str, str]]:
    """The fields the kept ``verdicts`` put on the message: their own,
    ours for a tag that brought none, and X-Spam-Score/X-Spam-Status."""
    fields: list[tuple[str, str]] = []
    for v in verdicts:
        if v.headers:
            fields += v.headers
        elif v.action is Action.TAG:
            # "tag" means a header: a plugin that brings none gets ours.
            fields.append((replies.TAG_FIELD, f"{v.plugin}: {v.result or 'tagged'}"))
    if scoring.headers and any(v.score for v in verdicts):
        score = total(verdicts)
        # Spam from the lowest threshold the policy sets: with only
        # `reject`, a message at or above it (delivered in monitor mode)
        # is not marked "No".
        lowest = min((t for t in (scoring.tag, scoring.defer, scoring.reject) if t is not None), default=None)
        spam = lowest is not None and score >= lowest
        required = f" required={lowest:.1f}" if lowest is not None else ""
        fields.append(("X-Spam-Score", f"{score:.1f}"))
        fields.append(("X-Spam-Status", f"{'Yes' if spam else 'No'}, score={score:.1f}{required} tests={summary(verdicts)}"))
    return fields
