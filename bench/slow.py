"""--checks slow: does a slow DNS list hold up the sessions that do not use it?

Sessions of three kinds go to the same all-checks gateway (bench/checks.py):

* **fast**: the usual load (smtp-source for msgs/s, our asyncio client for
  p50/p99), sender bench@example.org; every DNS answer they need is cached
  after the warm-up.
* **slow** (background): ``--slow-sessions`` sessions of bench.client,
  sender ``bench@rRmN.slow.example.net``, a new domain for every message N
  of every run R.
  At MAIL the dnsbl plugin asks the RHSBL zone dbl.bench.test about
  ``rRmN.slow.example.net``; the DNS server answers names under
  ``slow.example.net.dbl.bench.test`` after ``--slow-delay`` seconds, and as
  the domain is new, no cache or in-flight query shortens that: every slow
  message holds its connection for the whole delay, then is accepted. The
  fast sessions ask the same list only about example.org, answered at once.
* **control** (background): the same as the slow sessions (same number,
  same uncached lookups for a new domain per message, about the same
  msgs/s), sender ``bench@rRmN.control.example.net``, whose lookups are all
  answered at once; instead each session pauses ``--slow-delay`` seconds
  between its messages, client-side, without a connection.

The slow sessions are not free: each of their messages costs the gateway
one message's CPU plus the uncached lookups of a new domain (and the DNS
server in the bench process answers them, on the same cores). The control
sessions cost the same, without waiting inside the gateway. So:

* fast with slow / fast alone   = everything the slow sessions cost;
* fast with slow / fast with control = what *waiting* on a slow list costs
  the others, the work being equal. It is ~1.0 when a slow lookup blocks
  nothing but its own session (not the event loop, a worker, the resolver,
  a lock or a connection limit); blocking would lower the rate and raise
  the fast p50 by up to the delay.

Each repeat runs the fast tools alone, then with the control sessions and
with the slow sessions (in turn first: drift hits both alike). A background load is started (its sessions' starts
spread over one delay), given time until every session is busy, then the
fast tools run, then it is stopped (SIGUSR1: no new message; those in
flight finish) and its rate and latencies recorded.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace

from bench.checks import CONTROL_FROM, SLOW_FROM, SLOW_LIST, SLOW_PARENT
from bench.loadclient import start_client, stop_client
from bench.procs import BenchError
from bench.runner import (
    TOOL_CLIENT,
    TOOL_SOURCE,
    Checks,
    Row,
    _Measurer,
    _Path,
    _progress,
)

ALONE = "fast alone"
BACKGROUND_TOOL = "asyncio client (background)"
#: Upper bound on a background client's messages; it is stopped long before.
_BACKGROUND_MESSAGES = 1_000_000


def control_label(sessions: int) -> str:
    return f"fast + {sessions} control sessions"


def with_label(sessions: int) -> str:
    return f"fast + {sessions} slow sessions"


@dataclass
class SlowResult:
    mode: str
    delay: float
    sessions: int
    #: fast rows: (alone | + control | + slow) x (smtp-source | asyncio client);
    #: ``ratio`` = msgs/s / the alone row's msgs/s (same tool).
    rows: list[Row] = field(default_factory=list)
    #: the background loads (control, slow), one run per repeat
    background: list[Row] = field(default_factory=list)
    #: answered 250 but not delivered, fast and background messages together
    undelivered: int = 0
    notes: list[str] = field(default_factory=list)

    def row(self, load: str, tool: str) -> Row | None:
        return next((r for r in self.rows if r.path == load and r.tool == tool), None)

    def ratio(self, load: str, base: str, tool: str, what: str = "rate") -> float:
        a, b = self.row(load, tool), self.row(base, tool)
        if a is None or b is None:
            return math.nan
        x, y = getattr(a, what), getattr(b, what)
        return x / y if y > 0 else math.nan


@dataclass(frozen=True)
class _Background:
    label: str  # the fast rows' load label while it runs
    row_label: str  # its own row
    mail_from: str
    pace: float  # client-side pause between a session's messages


def measure_slow(m: _Measurer, gw: _Path, checks: Checks, *, warm: bool) -> SlowResult:
    o = m.opts
    up = m.up
    delay = checks.slow_delay
    n = checks.slow_sessions
    tools = [TOOL_SOURCE] + ([TOOL_CLIENT] if o.client else [])
    res = SlowResult(up.mode, delay, n)
    phases = [
        _Background(control_label(n), f"the {n} control sessions", CONTROL_FROM, delay),
        _Background(with_label(n), f"the {n} slow sessions", SLOW_FROM, 0.0),
    ]
    bg_rows = {b.label: Row(up.mode, b.row_label, BACKGROUND_TOOL) for b in phases}
    _progress(
        o,
        f"  {up.mode}: slow DNS: {SLOW_LIST} answers names under "
        f"{SLOW_PARENT}.{SLOW_LIST} after {delay:g} s; {n} slow sessions, "
        f"{n} control sessions",
    )
    if warm and o.warmup > 0:
        _progress(o, f"  {up.mode}: warm-up, {o.warmup} messages")
        m.source(gw, o.warmup)
    ramp = delay  # spread the background sessions' starts over one delay
    settle = ramp + delay + 0.5  # by then every background session is busy
    # Bound for a background client: the fast runs, plus start and drain.
    bound = o.run_timeout * len(tools) + settle + 60.0
    for rep in range(o.repeat):
        for tool in tools:
            m.run_once(replace(gw, label=ALONE), tool)
        # Alternate control/slow between repeats, so drift hits both alike.
        for b in phases if rep % 2 == 0 else phases[::-1]:
            before = up.delivered(0) if up.delivered else 0
            child = start_client(
                m.children,
                gw.host,
                gw.port,
                messages=_BACKGROUND_MESSAGES,
                sessions=n,
                size=o.size,
                # a new tag per run: no domain of an earlier run (cached) again
                mail_from=b.mail_from.replace("{run}", f"r{rep}"),
                rcpt_to=up.rcpt,
                helo=o.helo,
                timeout=bound,
                cwd=o.repo,
                ramp=ramp,
                pace=b.pace,
                msg_timeout=delay + 30.0,
                name="bench-client-background",
            )
            try:
                time.sleep(settle)
                if not child.running():
                    raise BenchError(
                        f"the background bench.client ({b.row_label}) exited early "
                        f"(exit {child.popen.returncode}):\n{child.tail()}"
                    )
                fast = 0
                for tool in tools:
                    m.run_once(replace(gw, label=b.label), tool)
                    fast += o.messages
                bg = stop_client(m.children, child, gw.host, gw.port, drain=delay + 45.0)
            finally:
                if child.running():  # an error above: do not leave it behind
                    m.children.stop(child)
            row = bg_rows[b.label]
            row.rates.append(bg.rate)
            row.p50s_ms.append(bg.p50_ms)
            row.p99s_ms.append(bg.p99_ms)
            if up.delivered is not None:
                want = fast + bg.sent
                got = up.delivered(before + want) - before
                row.undelivered += max(0, want - got)
                res.undelivered += max(0, want - got)
            _progress(
                o,
                f"  {up.mode:7} {row.path:26} {BACKGROUND_TOOL:27} run {len(row.rates)}: "
                f"{bg.rate:8,.1f} msgs/s ({bg.sent} msgs), p50 {bg.p50_ms:.0f} ms, "
                f"p99 {bg.p99_ms:.0f} ms",
            )
    res.rows = list(m.rows.values())
    for r in res.rows:
        base = m.rows.get((ALONE, r.tool))
        if r.path != ALONE and base is not None and base.rate > 0:
            r.ratio = r.rate / base.rate
    res.background = list(bg_rows.values())
    slow_bg = bg_rows[with_label(n)]
    if slow_bg.p50_ms < delay * 1000 * 0.95:
        res.notes.append(
            f"!! the slow sessions' p50 ({slow_bg.p50_ms:.0f} ms) is below the delay "
            f"({delay * 1000:.0f} ms): their lookups were not slow, so this run "
            "shows nothing"
        )
    return res
