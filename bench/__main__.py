"""python3 -m bench -- throughput and latency of smtpgate against baselines.

See bench/README.md for what each row means.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType

from bench.procs import BenchError, Children
from bench.proxies import parse_proxy
from bench.report import as_json, table
from bench.runner import (
    Checks,
    Options,
    Row,
    measure,
    postfix_upstream,
    sink_upstream,
)
from bench.slow import SlowResult

REPO = Path(__file__).resolve().parent.parent
CHECKS_NOTE = (
    '"smtpgate (all checks)": no trusted network; helo (resolve, fcrdns), '
    "sender, dnsbl (2 client lists + 1 RHSBL), spf (+HELO), dkim, dmarc, "
    "DNS cached after the warm-up"
)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python3 -m bench",
        description="SMTP throughput/latency: direct vs through a proxy (loopback only).",
    )
    p.add_argument(
        "--mode",
        choices=("sink", "postfix", "all"),
        default="sink",
        help="upstream: smtp-sink, a private Postfix (discard), or both",
    )
    p.add_argument("--messages", type=int, default=5000, help="messages per run")
    p.add_argument("--sessions", type=int, default=50, help="concurrent sessions")
    p.add_argument("--size", type=int, default=5120, help="body bytes per message")
    p.add_argument(
        "--workers",
        type=int,
        default=2,
        help="proxy worker processes ({workers} in --gateway-cmd)",
    )
    p.add_argument(
        "--repeat", type=int, default=3, help="runs per row; the median is shown"
    )
    p.add_argument(
        "--gateway-cmd",
        action="append",
        metavar="CMD",
        help="proxy to measure: 'gateway' (default), 'minimal', 'none' (direct "
        "rows only), or a command "
        "template, optionally 'LABEL=template'; placeholders {listen} "
        "{upstream} {listen_host} {listen_port} {upstream_host} "
        "{upstream_port} {workers} {policy} {python}. Repeatable: each "
        "proxy gets its own rows.",
    )
    p.add_argument("--policy", type=Path, default=REPO / "bench" / "policy.toml")
    p.add_argument(
        "--no-client",
        action="store_true",
        help="smtp-source only (skip the asyncio client's latency runs)",
    )
    p.add_argument(
        "--idle-messages",
        type=int,
        default=200,
        help="messages for the 1-session (unloaded latency) run; 0 = skip",
    )
    p.add_argument(
        "--warmup", type=int, default=200, help="unrecorded messages per path"
    )
    p.add_argument(
        "--from",
        dest="mail_from",
        default=None,
        help="envelope sender (default sender@example.com; bench@example.org with --checks)",
    )
    p.add_argument("--sink-rcpt", default="alice@example.com")
    p.add_argument(
        "--postfix-rcpt",
        default="bench@discard.example.net",
        help="non-local, so the private Postfix relays it to discard",
    )
    p.add_argument(
        "--postfix-param",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra main.cf setting for the private Postfix, e.g. in_flow_delay=0",
    )
    p.add_argument(
        "--sink-xclient",
        action="store_true",
        help="let smtp-sink offer XCLIENT (it answers 250, not Postfix's 220)",
    )
    p.add_argument(
        "--helo",
        default=None,
        help="HELO/EHLO name (default [127.0.0.1]; client.example.org with --checks)",
    )
    p.add_argument(
        "--checks",
        choices=("all", "slow", "all+slow"),
        default=None,
        help="a second smtpgate with every DNS check on, against a loopback DNS "
        "server serving bench/zones: 'all' adds its rows to the table, 'slow' "
        "runs only the slow-DNS experiment on it, 'all+slow' both",
    )
    p.add_argument(
        "--slow-sessions",
        type=int,
        default=50,
        help="--checks slow: concurrent sessions waiting on the slow list",
    )
    p.add_argument(
        "--slow-delay",
        type=float,
        default=2.0,
        help="--checks slow: seconds the slow names take to answer (the "
        "gateway's resolver gives up on one try after 2 s, see README)",
    )
    p.add_argument(
        "--no-sign",
        action="store_true",
        help="--checks: send generated unsigned messages (dkim=none) instead "
        "of the DKIM-signed one",
    )
    p.add_argument(
        "--run-timeout",
        type=float,
        default=120.0,
        help="upper bound for one load-generator run, seconds",
    )
    p.add_argument(
        "--ready-timeout",
        type=float,
        default=20.0,
        help="how long a proxy may take to answer 220, seconds",
    )
    p.add_argument(
        "--json", action="store_true", help="print JSON instead of the table"
    )
    p.add_argument(
        "--keep-logs", action="store_true", help="keep the work dir with logs"
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    a = p.parse_args(argv)
    for kv in a.postfix_param:
        if "=" not in kv:
            p.error(f"--postfix-param wants NAME=VALUE, got {kv!r}")
    for name in ("messages", "sessions", "size", "workers", "repeat", "slow_sessions"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if not 0 < a.slow_delay <= 30:
        p.error("--slow-delay must be in (0, 30] seconds")
    if a.checks:
        from bench.checks import CHECKS_FROM, CHECKS_HELO

        # The all-checks gateway trusts nobody: the client must look real
        # (bench/zones/example.org.zone). All paths use the same, for fairness.
        a.mail_from = a.mail_from or CHECKS_FROM
        a.helo = a.helo or CHECKS_HELO
    a.mail_from = a.mail_from or "sender@example.com"
    a.helo = a.helo or "[127.0.0.1]"
    return a


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _on_stop_signal(signum: int, frame: FrameType | None) -> None:
    # Turn the first stop signal into an exception so every `finally`
    # (process-group kills, Postfix stop) runs; ignore further ones so a
    # second Ctrl-C cannot cut that (bounded) cleanup short.
    for sig in _STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    a = _parse(argv)
    # Installed explicitly: a shell starting us in the background leaves
    # SIGINT ignored, and Python then has no KeyboardInterrupt handler.
    for sig in _STOP_SIGNALS:
        signal.signal(sig, _on_stop_signal)
    opts = Options(
        messages=a.messages,
        sessions=a.sessions,
        size=a.size,
        workers=a.workers,
        repeat=a.repeat,
        # "none": direct rows only (upstream baselines).
        proxies=[parse_proxy(c) for c in (a.gateway_cmd or ["gateway"]) if c != "none"],
        client=not a.no_client,
        idle_messages=a.idle_messages,
        mail_from=a.mail_from,
        sink_rcpt=a.sink_rcpt,
        postfix_rcpt=a.postfix_rcpt,
        helo=a.helo,
        run_timeout=a.run_timeout,
        ready_timeout=a.ready_timeout,
        warmup=a.warmup,
        policy=a.policy.resolve(),
        repo=REPO,
        quiet=a.quiet,
        sink_xclient=a.sink_xclient,
        postfix_params={
            k.strip(): v.strip()
            for k, _, v in (kv.partition("=") for kv in a.postfix_param)
        },
    )
    workdir = Path(tempfile.mkdtemp(prefix="smtpgate-bench-"))
    os.chmod(workdir, 0o755)  # Postfix daemons (not root) must traverse it
    modes = ("sink", "postfix") if a.mode == "all" else (a.mode,)
    rows: list[Row] = []
    slow: list[SlowResult] = []
    keep = a.keep_logs
    # Other work on the box skews every row; the header shows it.
    load_before = os.getloadavg()[0]
    t0 = time.monotonic()
    try:
        with Children(workdir) as children, contextlib.ExitStack() as stack:
            if a.checks:
                from bench.checks import checks_env

                rcpts = [a.sink_rcpt if m == "sink" else a.postfix_rcpt for m in modes]
                env = stack.enter_context(
                    checks_env(
                        workdir,
                        rcpts=rcpts,
                        size=a.size,
                        sign=not a.no_sign,
                        slow_delay=a.slow_delay if "slow" in a.checks else 0.0,
                    )
                )
                opts = dataclasses.replace(
                    opts,
                    message_file=env.message,
                    checks=Checks(
                        policy=env.policy,
                        table="all" in a.checks,
                        slow="slow" in a.checks,
                        slow_sessions=a.slow_sessions,
                        slow_delay=a.slow_delay,
                    ),
                )
                if not a.quiet:
                    print(
                        f"bench: DNS on {env.nameserver} (bench/zones), policy "
                        f"{env.policy}",
                        file=sys.stderr,
                    )
            for mode in modes:
                if mode == "sink":
                    with sink_upstream(children, opts) as up:
                        res = measure(children, up, opts)
                else:
                    with postfix_upstream(workdir, opts) as up:
                        res = measure(children, up, opts)
                rows += res.rows
                if res.slow is not None:
                    slow.append(res.slow)
    except BenchError as e:
        keep = True  # the children's logs explain the failure
        print(f"bench: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        return 130
    finally:
        if keep:
            print(f"bench: logs kept in {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    meta = {
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "wall_s": round(time.monotonic() - t0, 1),
        "loadavg_1m_before": round(load_before, 2),
    }
    if a.json:
        print(as_json(rows, opts, meta, slow))
    else:
        body = f"{opts.size} B body"
        if opts.message_file is not None:
            body = f"one DKIM-signed {opts.size} B body"
        header = (
            f"smtpgate bench: {opts.messages} msgs x {opts.sessions} sessions x "
            f"{body}, one connection per message; proxy workers "
            f"{opts.workers}; median of {opts.repeat} run(s)\nPython {meta['python']}, "
            f"{meta['cpus']} CPUs; load avg before {meta['loadavg_1m_before']}; "
            f"took {meta['wall_s']} s"
        )
        if opts.checks is not None:
            header += (
                f"\n--checks {a.checks}: HELO {opts.helo}, MAIL FROM {opts.mail_from} "
                f"on every path; {CHECKS_NOTE}"
            )
        print(table(rows, opts, header, slow))
    bad = sum(r.undelivered for r in rows) + sum(r.undelivered for r in slow)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
