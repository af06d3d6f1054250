"""Rendering results: a plain-text table for people, JSON for tools."""

from __future__ import annotations

import json
import math
from typing import Any

from bench.runner import DIRECT, TOOL_CLIENT, TOOL_IDLE, TOOL_SOURCE, Options, Row

_TOOL_ORDER = {TOOL_SOURCE: 0, TOOL_CLIENT: 1, TOOL_IDLE: 2}


def ordered(rows: list[Row]) -> list[Row]:
    """Group by mode, then tool, keeping path order (direct first)."""
    path_order: dict[str, int] = {}
    for r in rows:
        path_order.setdefault(r.path, len(path_order))
    return sorted(
        rows,
        key=lambda r: (
            r.mode,
            _TOOL_ORDER.get(r.tool, 9),
            r.path != DIRECT,
            path_order[r.path],
        ),
    )


def _num(x: float, fmt: str) -> str:
    return "-" if math.isnan(x) else format(x, fmt)


def table(rows: list[Row], opts: Options, header: str) -> str:
    lines = [header, ""]
    cols = (
        "mode",
        "path",
        "tool",
        "msgs/s",
        "x direct",
        "p50 ms",
        "p99 ms",
        "runs msgs/s",
    )
    data: list[tuple[str, ...]] = []
    for r in ordered(rows):
        runs = " ".join(f"{x:.0f}" for x in r.rates)
        if r.undelivered:
            runs += f"  !! {r.undelivered} answered 250 but not delivered"
        data.append(
            (
                r.mode,
                r.path,
                r.tool,
                _num(r.rate, ",.0f"),
                _num(r.ratio, ".3f"),
                _num(r.p50_ms, ".1f"),
                _num(r.p99_ms, ".1f"),
                runs,
            )
        )
    widths = [
        max(len(c), *(len(d[i]) for d in data)) if data else len(c)
        for i, c in enumerate(cols)
    ]
    right = {3, 4, 5, 6}

    def fmt(cells: tuple[str, ...]) -> str:
        return "  ".join(
            c.rjust(widths[i]) if i in right else c.ljust(widths[i])
            for i, c in enumerate(cells)
        ).rstrip()

    lines.append(fmt(cols))
    lines.append(fmt(tuple("-" * w for w in widths)))
    prev_group: tuple[str, str] | None = None
    for r, d in zip(ordered(rows), data):
        if prev_group is not None and (r.mode, r.tool) != prev_group:
            lines.append("")
        prev_group = (r.mode, r.tool)
        lines.append(fmt(d))
    lines.extend(_proxy_ratios(rows))
    return "\n".join(lines)


def _proxy_ratios(rows: list[Row]) -> list[str]:
    """With several proxies, also compare each against the minimal baseline."""
    out: list[str] = []
    for r in ordered(rows):
        if r.tool != TOOL_SOURCE or r.path in (DIRECT, "minimal proxy"):
            continue
        base = next(
            (
                b
                for b in rows
                if b.mode == r.mode and b.tool == r.tool and b.path == "minimal proxy"
            ),
            None,
        )
        if base is not None and base.rate > 0:
            if not out:
                out.append("")
            out.append(
                f"{r.mode}: {r.path} / minimal proxy = {r.rate / base.rate:.2f} "
                f"(smtp-source msgs/s)"
            )
    return out


def as_json(rows: list[Row], opts: Options, meta: dict[str, Any]) -> str:
    def clean(x: float) -> float | None:
        return None if math.isnan(x) else round(x, 3)

    return json.dumps(
        {
            "config": {
                "messages": opts.messages,
                "sessions": opts.sessions,
                "size": opts.size,
                "workers": opts.workers,
                "repeat": opts.repeat,
                "proxies": [
                    {"label": p.label, "command": p.template} for p in opts.proxies
                ],
                **meta,
            },
            "rows": [
                {
                    "mode": r.mode,
                    "path": r.path,
                    "tool": r.tool,
                    "msgs_per_s": clean(r.rate),
                    "ratio_vs_direct": clean(r.ratio),
                    "p50_ms": clean(r.p50_ms),
                    "p99_ms": clean(r.p99_ms),
                    "runs_msgs_per_s": [round(x, 1) for x in r.rates],
                    "undelivered": r.undelivered,
                }
                for r in ordered(rows)
            ],
        },
        indent=2,
    )
