"""Measurement plan: upstreams (smtp-sink, Postfix), paths (direct, via each
proxy) and tools (smtp-source, our asyncio client), repeated K times.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from bench.loadclient import run_client
from bench.procs import BenchError, Children
from bench.proxies import ProxySpec, RunningProxy, start_proxy
from bench.sink import LogCounter, SmtpSink
from bench.source import run_smtp_source
from bench.stats import median

TOOL_SOURCE = "smtp-source"
TOOL_CLIENT = "asyncio client"
TOOL_IDLE = "asyncio client, 1 session"
DIRECT = "direct"


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


@dataclass
class Row:
    mode: str
    path: str
    tool: str
    rates: list[float] = field(default_factory=list)
    p50s_ms: list[float] = field(default_factory=list)
    p99s_ms: list[float] = field(default_factory=list)
    undelivered: int = 0  # messages answered 250 that never reached smtp-sink
    ratio: float = math.nan  # median rate / median rate of "direct" with the same tool

    @property
    def rate(self) -> float:
        return median(self.rates)

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


@contextmanager
def sink_upstream(children: Children, opts: Options) -> Iterator[Upstream]:
    sink = SmtpSink(children, opts.sessions, xclient=opts.sink_xclient)
    try:
        yield Upstream(
            "sink", sink.host, sink.port, opts.sink_rcpt, sink.wait_delivered
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
        ).rate

    def run_once(self, p: _Path, tool: str) -> None:
        """One measurement, then check the upstream got every message."""
        o = self.opts
        messages = o.idle_messages if tool == TOOL_IDLE else o.messages
        before = self.up.delivered(0) if self.up.delivered else 0
        r = self.row(p.label, tool)
        if tool == TOOL_SOURCE:
            r.rates.append(self.source(p, messages))
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
            f"  {self.up.mode:7} {p.label:16} {tool:26} run {len(r.rates)}: "
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


def measure(children: Children, up: Upstream, opts: Options) -> list[Row]:
    """All paths (direct, then each proxy) x tools x repeats against one upstream."""
    proxies: list[RunningProxy] = []
    try:
        for spec in opts.proxies:
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
                )
            )
        paths = [_Path(DIRECT, up.host, up.port)]
        paths += [_Path(p.spec.label, p.host, p.port) for p in proxies]
        return _Measurer(children, up, opts).run(paths)
    finally:
        for p in reversed(proxies):
            children.stop(p.child)
