"""Rendering results: a plain-text table for people, JSON for tools."""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, Any

from bench.runner import (
    CHECKS_LABEL,
    DIRECT,
    TOOL_CLIENT,
    TOOL_IDLE,
    TOOL_SOURCE,
    Options,
    Row,
)

if TYPE_CHECKING:
    from bench.slow import SlowResult

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


_COLS = ("mode", "path", "tool", "msgs/s", "x direct", "p50 ms", "p99 ms", "runs msgs/s")


def _render(
    cols: tuple[str, ...], data: list[tuple[str, ...]], groups: list[object]
) -> list[str]:
    """Aligned columns (numbers right-aligned); a blank line between groups."""
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

    lines = [fmt(cols), fmt(tuple("-" * w for w in widths))]
    prev: object = None
    for i, (g, d) in enumerate(zip(groups, data)):
        if i and g != prev:
            lines.append("")
        prev = g
        lines.append(fmt(d))
    return lines


def _cells(r: Row, runs_fmt: str = ".0f", rate_fmt: str = ",.0f") -> tuple[str, ...]:
    runs = " ".join(format(x, runs_fmt) for x in r.rates)
    if r.undelivered:
        runs += f"  !! {r.undelivered} answered 250 but not delivered"
    return (
        r.mode,
        r.path,
        r.tool,
        _num(r.rate, rate_fmt),
        _num(r.ratio, ".3f"),
        _num(r.p50_ms, ".1f"),
        _num(r.p99_ms, ".1f"),
        runs,
    )


def table(
    rows: list[Row], opts: Options, header: str, slow: list[SlowResult] | None = None
) -> str:
    lines = [header]
    if rows:
        lines.append("")
        ordered_rows = ordered(rows)
        lines += _render(
            _COLS, [_cells(r) for r in ordered_rows], [(r.mode, r.tool) for r in ordered_rows]
        )
        lines.extend(_proxy_ratios(rows))
        lines.extend(_checks_ratios(rows))
        lines.extend(_cpu_lines(rows))
    for res in slow or []:
        lines.append("")
        lines.extend(slow_table(res))
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


def _cpu_lines(rows: list[Row]) -> list[str]:
    """Each proxy's own CPU per message: steadier than msgs/s on a shared box."""
    out: list[str] = []
    for r in ordered(rows):
        if r.tool != TOOL_SOURCE or r.path == DIRECT or math.isnan(r.cpu_ms_per_msg):
            continue
        if not out:
            out.append("")
        runs = " ".join(f"{x:.2f}" for x in r.cpu_ms)
        out.append(f"{r.mode}: {r.path} used {r.cpu_ms_per_msg:.2f} ms of CPU per message "
                   f"(all its processes, user + system; system {r.sys_ms_per_msg:.2f}; runs {runs})")
    return out


def _checks_ratios(rows: list[Row]) -> list[str]:
    """With --checks all: what the checks cost next to the plain smtpgate."""
    out: list[str] = []
    for r in ordered(rows):
        if r.path != CHECKS_LABEL or r.tool not in (TOOL_SOURCE, TOOL_IDLE):
            continue
        base = next(
            (b for b in rows if b.mode == r.mode and b.tool == r.tool and b.path == "smtpgate"),
            None,
        )
        if base is None or not (base.rate > 0):
            continue
        if not out:
            out.append("")
        if r.tool == TOOL_SOURCE:
            out.append(
                f"{r.mode}: {CHECKS_LABEL} / smtpgate = {r.rate / base.rate:.2f} "
                f"(smtp-source msgs/s)"
            )
        elif not math.isnan(r.p50_ms) and not math.isnan(base.p50_ms):
            out.append(
                f"{r.mode}: the checks add {r.p50_ms - base.p50_ms:.2f} ms to one "
                f"unloaded message (1-session p50 {base.p50_ms:.2f} -> {r.p50_ms:.2f} ms)"
            )
    return out


def slow_table(res: SlowResult) -> list[str]:
    """The slow-DNS experiment: the fast load alone, next to the control
    sessions, next to the slow sessions."""
    from bench.checks import SLOW_LIST, SLOW_PARENT
    from bench.slow import ALONE, control_label, with_label

    n = res.sessions
    head = f"slow DNS ({res.mode}): {SLOW_LIST} answers names under "
    head += f"{SLOW_PARENT}.{SLOW_LIST} after {res.delay:g} s."
    who = f"Background: {n} slow sessions (sender rRmN.{SLOW_PARENT}, new per message: "
    who += "each waits the delay at MAIL, holding its connection), or "
    who += f"{n} control sessions (the same uncached work, answered at once, "
    who += f"pausing {res.delay:g} s client-side between messages)."
    lines = [
        head,
        who,
        "Fast load: sender example.org, all cached. x alone = msgs/s / fast alone.",
        "",
    ]
    cols = ("mode", "load", "tool", "msgs/s", "x alone", "p50 ms", "p99 ms", "runs msgs/s")
    order = {ALONE: 0, control_label(n): 1, with_label(n): 2}
    fast = sorted(
        res.rows, key=lambda r: (_TOOL_ORDER.get(r.tool, 9), order.get(r.path, 9))
    )
    data = [_cells(r) for r in fast]
    groups: list[object] = [r.tool for r in fast]
    for bg in res.background:
        data.append(_cells(bg, runs_fmt=".1f", rate_fmt=",.1f"))
        groups.append("background")
    lines += _render(cols, data, groups)
    lines.append("")
    slow, control = with_label(n), control_label(n)
    line = f"{res.mode}: with {n} slow sessions in flight the fast load keeps "
    line += f"{res.ratio(slow, ALONE, TOOL_SOURCE):.2f} of its msgs/s alone and "
    line += f"{res.ratio(slow, control, TOOL_SOURCE):.2f} of its msgs/s next to "
    line += "the control sessions (smtp-source)"
    lines.append(line)
    p50 = res.ratio(slow, control, TOOL_CLIENT, "p50_ms")
    if not math.isnan(p50):
        lines.append(
            f"{res.mode}: fast p50 with slow / with control sessions = x{p50:.2f}, "
            f"p99 x{res.ratio(slow, control, TOOL_CLIENT, 'p99_ms'):.2f} (asyncio client)"
        )
    if res.undelivered:
        lines.append(f"!! {res.undelivered} messages answered 250 but not delivered")
    lines.extend(res.notes)
    return lines


def _slow_json(res: SlowResult) -> dict[str, Any]:
    def clean(x: float) -> float | None:
        return None if math.isnan(x) else round(x, 3)

    def row(r: Row) -> dict[str, Any]:
        return {
            "load": r.path,
            "tool": r.tool,
            "msgs_per_s": clean(r.rate),
            "ratio_vs_alone": clean(r.ratio),
            "p50_ms": clean(r.p50_ms),
            "p99_ms": clean(r.p99_ms),
            "runs_msgs_per_s": [round(x, 1) for x in r.rates],
            "undelivered": r.undelivered,
        }

    return {
        "mode": res.mode,
        "delay_s": res.delay,
        "slow_sessions": res.sessions,
        "rows": [row(r) for r in res.rows],
        "background": [row(r) for r in res.background],
        "undelivered": res.undelivered,
        "notes": res.notes,
    }


def as_json(
    rows: list[Row],
    opts: Options,
    meta: dict[str, Any],
    slow: list[SlowResult] | None = None,
) -> str:
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
                **(
                    {
                        "checks": {
                            "table": opts.checks.table,
                            "slow": opts.checks.slow,
                            "slow_sessions": opts.checks.slow_sessions,
                            "slow_delay_s": opts.checks.slow_delay,
                            "helo": opts.helo,
                            "mail_from": opts.mail_from,
                            "message_file": bool(opts.message_file),
                        }
                    }
                    if opts.checks
                    else {}
                ),
                **meta,
            },
            "rows": [
                {
                    "mode": r.mode,
                    "path": r.path,
                    "tool": r.tool,
                    "msgs_per_s": clean(r.rate),
                    "proxy_cpu_ms_per_msg": clean(r.cpu_ms_per_msg),
                    "proxy_system_ms_per_msg": clean(r.sys_ms_per_msg),
                    "ratio_vs_direct": clean(r.ratio),
                    "p50_ms": clean(r.p50_ms),
                    "p99_ms": clean(r.p99_ms),
                    "runs_msgs_per_s": [round(x, 1) for x in r.rates],
                    "undelivered": r.undelivered,
                }
                for r in ordered(rows)
            ],
            **({"slow_dns": [_slow_json(r) for r in slow]} if slow else {}),
        },
        indent=2,
    )
