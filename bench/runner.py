"""Measurement plan: upstreams (smtp-sink, Postfix), paths (direct, via each
proxy) and tools (smtp-source, our asyncio client), repeated K times.

With --checks, one more proxy: smtpgate with every DNS check on (its own
policy, see bench/checks.py), as a row of the table ("all") and/or as the
gateway of the slow-DNS experiment ("slow", bench/slow.py).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from bench.loadclient import run_client
from bench.procs import BenchError, Child, Children, group_cpu_seconds
from bench.proxies import PRESETS, ProxySpec, RunningProxy, start_proxy
from bench.sink import LogCounter, SmtpSink
from bench.source import run_smtp_source
from bench.stats import median

if TYPE_CHECKING:  # bench.slow imports this module
    from bench.slow import SlowResult

TOOL_SOURCE = "smtp-source"
TOOL_CLIENT = "asyncio client"
TOOL_IDLE = "asyncio client, 1 session"
DIRECT = "direct"
#: Row label of the gateway with every check on (--checks).
CHECKS_LABEL = "smtpgate (all checks)"


@dataclass(frozen=True)
class Checks:
    """--checks: a gateway with every DNS check on, and what to do with it."""

    policy: Path
    #: Add its path to the main table ("all").
    table: bool
    #: Run the slow-DNS experiment on it ("slow").
    slow: bool
    slow_sessions: int = 50
    slow_delay: float = 1.8


@dataclass(frozen=True)
class Options:
    messages: int
    sessions: int
    size: int
    workers: int
    repeat: int
    proxies: list[ProxySpec]
    client: bool
    idle_messages: int
    mail_from: str
    sink_rcpt: str
    postfix_rcpt: str
    helo: str
    run_timeout: float
    ready_timeout: float
    warmup: int
    policy: Path
    repo: Path
    quiet: bool = False
    postfix_params: dict[str, str] = field(default_factory=dict)
    sink_xclient: bool = False
    #: Send this message (smtp-source -F, bench.client --message-file)
    #: instead of generated ones of --size bytes; set by --checks (DKIM-signed).
    message_file: Path | None = None
    checks: Checks | None = None


@dataclass
class Row:
    mode: str
    path: str
    tool: str
    rates: list[float] = field(default_factory=list)
    p50s_ms: list[float] = field(default_factory=list)
    p99s_ms: list[float] = field(default_factory=list)
    #: the proxy's CPU (all its processes) per message, ms, per smtp-source run
    cpu_ms: list[float] = field(default_factory=list)
    #: the part of cpu_ms spent in the kernel (system calls, TCP)
    sys_ms: list[float] = field(default_factory=list)
    undelivered: int = 0  # messages answered 250 that never reached smtp-sink
    ratio: float = math.nan  # median rate / median rate of "direct" with the same tool

    @property
    def rate(self) -> float:
        return median(self.rates)

    @property
    def cpu_ms_per_msg(self) -> float:
        return median(self.cpu_ms) if self.cpu_ms else math.nan

    @property
    def sys_ms_per_msg(self) -> float:
        return median(self.sys_ms) if self.sys_ms else math.nan

    @property
    def p50_ms(self) -> float:
        return median(self.p50s_ms)

    @property
    def p99_ms(self) -> float:
        return median(self.p99s_ms)


@dataclass(frozen=True)
class Upstream:
    mode: str
    host: str
    port: int
    rcpt: str
    # Messages received so far, or None where the upstream cannot tell us.
    delivered: Callable[[int], int] | None
    # "" while the upstream runs, else what happened to it (for error messages).
    gone: Callable[[], str] = lambda: ""


@contextmanager
def sink_upstream(children: Children, opts: Options) -> Iterator[Upstream]:
    sink = SmtpSink(children, opts.sessions, xclient=opts.sink_xclient)
    try:
        yield Upstream(
            "sink",
            sink.host,
            sink.port,
            opts.sink_rcpt,
            sink.wait_delivered,
            lambda: ""
            if sink.child.running()
            else f"smtp-sink exited with code {sink.child.popen.returncode} "
            f"(a negative code is the signal that killed it); log tail:\n"
            f"{sink.child.tail(500)}",
        )
    finally:
        children.stop(sink.child)


@contextmanager
def postfix_upstream(workdir: Path, opts: Options) -> Iterator[Upstream]:
    try:
        from tests.fixtures.postfix import PostfixInstance
    except ImportError as e:
        raise BenchError(
            f"postfix mode needs tests/fixtures/postfix.py (PostfixInstance): {e}"
        ) from e
    basedir = workdir / "postfix"
    basedir.mkdir()
    pf = PostfixInstance(basedir, extra_main_cf=opts.postfix_params or None)
    try:
        pf.start()
    except Exception as e:  # PostfixError, OSError...: report, don't trace back
        raise BenchError(f"the private Postfix did not start: {e}") from e
    try:
        # Non-local recipient from 127.0.0.1 (in mynetworks): Postfix relays
        # it to the discard transport, so we measure smtpd + cleanup + qmgr,
        # not Maildir writes. Each discard logs "status=sent", which we count
        # to check that every 250 the proxy gave became a Postfix delivery.
        counter = LogCounter(Path(pf.maillog_path), b" status=sent ")
        yield Upstream(
            "postfix",
            pf.host,
            int(pf.port),
            opts.postfix_rcpt,
            lambda target: counter.wait_for(target, timeout=20.0),
        )
    finally:
        pf.stop()


def _progress(opts: Options, msg: str) -> None:
    if not opts.quiet:
        print(msg, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class _Path:
    label: str
    host: str
    port: int
    #: the proxy's process, to tell "it died" from "it refused" on failure
    child: Child | None = None


class _Measurer:
    """One upstream's measurements; rows are keyed by (path, tool)."""

    def __init__(self, children: Children, up: Upstream, opts: Options) -> None:
        self.children = children
        self.up = up
        self.opts = opts
        self.rows: dict[tuple[str, str], Row] = {}

    def row(self, path: str, tool: str) -> Row:
        return self.rows.setdefault((path, tool), Row(self.up.mode, path, tool))

    def source(self, p: _Path, messages: int) -> float:
        o = self.opts
        return run_smtp_source(
            self.children,
            p.host,
            p.port,
            messages=messages,
            sessions=o.sessions,
            size=o.size,
            mail_from=o.mail_from,
            rcpt_to=self.up.rcpt,
            helo=o.helo,
            timeout=o.run_timeout,
            message_file=o.message_file,
        ).rate

    def run_once(self, p: _Path, tool: str) -> None:
        """One measurement, then check the upstream got every message."""
        try:
            self._run_once(p, tool)
        except BenchError as e:
            # A dead proxy or upstream is the likelier cause of the failure.
            if p.child is not None and not p.child.running():
                raise BenchError(
                    f"{e}\n{p.label} is gone: exit code {p.child.popen.returncode} "
                    f"(negative = killed by that signal); log tail:\n{p.child.tail(500)}"
                ) from e
            gone = self.up.gone()
            if gone:
                raise BenchError(f"{e}\nThe upstream is gone: {gone}") from e
            raise

    def _run_once(self, p: _Path, tool: str) -> None:
        o = self.opts
        messages = o.idle_messages if tool == TOOL_IDLE else o.messages
        before = self.up.delivered(0) if self.up.delivered else 0
        r = self.row(p.label, tool)
        if tool == TOOL_SOURCE:
            # A proxy's CPU per message drifts less than msgs/s on a shared
            # machine, and does not count the load generator or upstream.
            # The kernel's share says how much of it any Python change can touch.
            before_cpu = group_cpu_seconds(p.child.pid) if p.child is not None else None
            r.rates.append(self.source(p, messages))
            if p.child is not None and before_cpu is not None:
                user, system = (
                    (now - then) * 1000 / messages for now, then in zip(group_cpu_seconds(p.child.pid), before_cpu)
                )
                r.cpu_ms.append(user + system)
                r.sys_ms.append(system)
        else:
            res = run_client(
                self.children,
                p.host,
                p.port,
                messages=messages,
                sessions=1 if tool == TOOL_IDLE else o.sessions,
                size=o.size,
                mail_from=o.mail_from,
                rcpt_to=self.up.rcpt,
                helo=o.helo,
                timeout=o.run_timeout,
                cwd=o.repo,
                message_file=o.message_file,
            )
            r.rates.append(res.rate)
            r.p50s_ms.append(res.p50_ms)
            r.p99s_ms.append(res.p99_ms)
        if self.up.delivered is not None:
            got = self.up.delivered(before + messages) - before
            r.undelivered += max(0, messages - got)
        lat = (
            f", p50 {r.p50s_ms[-1]:.1f} ms, p99 {r.p99s_ms[-1]:.1f} ms"
            if r.p50s_ms
            else ""
        )
        _progress(
            o,
            f"  {self.up.mode:7} {p.label:26} {tool:26} run {len(r.rates)}: "
            f"{r.rates[-1]:8,.0f} msgs/s{lat}",
        )

    def run(self, paths: list[_Path]) -> list[Row]:
        o = self.opts
        tools = [TOOL_SOURCE]
        if o.client:
            tools.append(TOOL_CLIENT)
        if o.idle_messages > 0:
            tools.append(TOOL_IDLE)
        # Warm-up (not recorded): the first connections pay for imports,
        # worker start-up, Postfix spawning smtpd processes, and so on.
        if o.warmup > 0:
            _progress(o, f"  {self.up.mode}: warm-up, {o.warmup} messages per path")
            for p in paths:
                self.source(p, o.warmup)
        for _ in range(o.repeat):  # interleaved, so drift hits every path alike
            for p in paths:
                for tool in tools:
                    self.run_once(p, tool)
        out = list(self.rows.values())
        for r in out:
            direct = self.rows.get((DIRECT, r.tool))
            if direct is not None and direct.rate > 0:
                r.ratio = r.rate / direct.rate
        return out


@dataclass
class Measurement:
    """One upstream's results: the main table's rows, and the slow-DNS
    experiment's (bench/slow.py) when --checks asked for it."""

    rows: list[Row]
    slow: SlowResult | None = None


def measure(children: Children, up: Upstream, opts: Options) -> Measurement:
    """All paths (direct, then each proxy) x tools x repeats against one upstream.

    With --checks, the all-checks gateway is one more proxy: a row of the
    table ("all"), and/or the gateway of the slow-DNS experiment ("slow"),
    which runs after the table, on the same (warm) gateway. "slow" alone
    starts only that gateway and measures no table.
    """
    checks = opts.checks
    table = checks is None or checks.table
    specs = list(opts.proxies) if table else []
    checks_spec: ProxySpec | None = None
    if checks is not None:
        checks_spec = ProxySpec(CHECKS_LABEL, PRESETS["gateway"], checks.policy)
        specs.append(checks_spec)
    proxies: list[RunningProxy] = []
    try:
        for spec in specs:
            proxies.append(
                start_proxy(
                    children,
                    spec,
                    upstream_host=up.host,
                    upstream_port=up.port,
                    workers=opts.workers,
                    policy=opts.policy,
                    cwd=opts.repo,
                    ready_timeout=opts.ready_timeout,
                    checks_policy=checks.policy if checks is not None else None,
                )
            )
        paths = [_Path(DIRECT, up.host, up.port)]
        paths += [_Path(p.spec.label, p.host, p.port, p.child) for p in proxies]
        rows = _Measurer(children, up, opts).run(paths) if table else []
        slow = None
        if checks is not None and checks.slow:
            from bench.slow import measure_slow  # it builds on this module

            gw = next(p for p in proxies if p.spec is checks_spec)
            slow = measure_slow(
                _Measurer(children, up, opts),
                _Path(CHECKS_LABEL, gw.host, gw.port, gw.child),
                checks,
                warm=not table,
            )
        return Measurement(rows, slow)
    finally:
        for p in reversed(proxies):
            children.stop(p.child)
