"""``smtpgate serve | lint | plugins``."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from . import __version__
from . import log as logsetup
from .config import (
    DNSSettings, GatewaySettings, Policy, PolicyError, Problem, ScoringSettings, ascii_int, load_policy,
)
from .plugin import Context
from .plugins import installed, load_plugins

__all__ = ["main"]

DEFAULT_POLICY = Path("policies/default.toml")


def _default_policy() -> Path:
    """``policies/default.toml`` of the current directory, else the one
    beside the installed package (an editable install or a checkout)."""
    if DEFAULT_POLICY.exists():
        return DEFAULT_POLICY
    beside = Path(__file__).resolve().parent.parent / DEFAULT_POLICY
    return beside if beside.exists() else DEFAULT_POLICY


class _Say:
    """Where the CLI's own messages go: stderr lines, or with
    ``--log-format json`` (and once the gateway runs) the log, so a
    pipeline sees them as records; or nowhere (``silent``)."""

    def __init__(self, json_log: bool = False, *, silent: bool = False) -> None:
        self._log = logging.getLogger("smtpgate") if json_log else None
        self._silent = silent

    def error(self, line: str) -> None:
        self._say(logging.ERROR, line)

    def warning(self, line: str) -> None:
        self._say(logging.WARNING, line)

    def _say(self, level: int, line: str) -> None:
        if self._silent:
            return
        if self._log is None:
            logsetup.flush()  # after the log lines before it, as they were logged
            print(line, file=sys.stderr)
        else:
            self._log.log(level, "%s", line)


def _load(path: str | None, say: _Say | None = None, **overrides: object) -> Policy:
    source = path or _default_policy()
    try:
        policy = load_policy(source)
    except PolicyError as exc:
        if exc.plugins:  # report the plugin tables' problems in the same round
            raise PolicyError(exc.problems + _plugin_problems(str(source), exc.plugins)) from None
        raise
    policy = policy.with_overrides(**overrides)
    registry = load_plugins(policy, Context(policy.gateway))  # validates every plugin table
    for risk in relay_risks(policy, {p.name for p in registry.plugins}) + limit_risks(policy):
        (say or _Say()).warning(f"{policy.source}: warning: {risk}")
    return policy


def _plugin_problems(source: str, tables: Mapping[str, Any]) -> list[Problem]:
    """What is wrong in ``tables``, judged with default core settings."""
    policy = Policy(source, GatewaySettings(hostname="policy.check.invalid"), DNSSettings(), ScoringSettings(), dict(tables))
    try:
        load_plugins(policy, Context(policy.gateway))
    except PolicyError as exc:
        return exc.problems
    return []


#: Postfix's default line_length_limit: its smtpd cuts a longer command.
POSTFIX_LINE_LIMIT = 2048


def limit_risks(policy: Policy) -> list[str]:
    """Valid limits that Postfix as the next hop does not keep by default."""
    settings = policy.gateway
    if settings.max_line_length > POSTFIX_LINE_LIMIT and settings.upstream_endpoint.maildir is None:
        return [
            f"gateway.max_line_length ({settings.max_line_length}) is over {POSTFIX_LINE_LIMIT}, Postfix's "
            "default line_length_limit: a longer command reaches Postfix cut short and loses its last "
            "parameters (raise line_length_limit in its main.cf to match)"
        ]
    return []


def relay_risks(policy: Policy, enabled: set[str]) -> list[str]:
    """Valid settings that let anyone relay unless the next hop refuses,
    or pass for another client than it is."""
    settings = policy.gateway
    risks = []
    if "relay" not in enabled:
        risks.append("plugins.relay is disabled: the next hop must refuse relaying itself")
    risks += [
        f"gateway.trusted_networks[{i}] ({net}) trusts every client to relay"
        for i, net in enumerate(settings.trusted)
        if net.prefixlen == 0
    ]
    # XCLIENT ADDR= and a PROXY header name the client every check judges:
    # claiming an address on a DNS allow list, or one the SPF record of a
    # forged sender allows, is worth as much to a spammer as relaying, so
    # these are risks whether or not trusted_networks lets anyone relay.
    relay = bool(settings.trusted)
    risks += [
        f"gateway.xclient_hosts[{i}] ({net}) lets every client {_claim(' with XCLIENT', relay)}"
        for i, net in enumerate(settings.xclient)
        if net.prefixlen == 0
    ]
    if settings.proxy_protocol and not settings.proxy_hosts:
        risks.append(
            "gateway.proxy_protocol takes a PROXY header from every peer: a client that reaches this port "
            f"directly can {_claim('', relay)} (gateway.proxy_hosts names the balancers)"
        )
    risks += [
        f"gateway.proxy_hosts[{i}] ({net}) lets every client {_claim(' with a PROXY header', relay)}"
        for i, net in enumerate(settings.proxy)
        if net.prefixlen == 0
    ]
    return risks


def _claim(how: str, relay: bool) -> str:
    said = f"claim any address{how}, and pass the checks that judge it (DNS block and allow lists, SPF)"
    return said + ("; an address in trusted_networks, and relay" if relay else "")


def _report(exc: PolicyError, say: _Say | None = None) -> int:
    for problem in exc.problems:
        (say or _Say()).error(str(problem))
    return 2


def _positive(text: str) -> int:
    try:
        value = ascii_int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def cmd_serve(args: argparse.Namespace) -> int:
    # A reload asked for while we start (systemd counts the unit as started
    # at once) waits for the supervisor, which takes SIGHUP from the blocked
    # set; by default it would end the process, silently, as a clean exit.
    # SIGCHLD and SIGIO (a worker died, a worker reported) are blocked here
    # too, before any thread starts: a thread inherits the mask (the log's
    # writer blocks every signal itself), and a signal the supervisor waits
    # for that went to a thread that does not block it would be lost
    # (SIGCHLD) or end the process (SIGIO) whenever the supervisor was not
    # waiting at that moment.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP, signal.SIGCHLD, signal.SIGIO})
    from .server import run  # the server's imports are not needed by lint

    logsetup.configure(args.log_format, args.log_level)
    say = _Say(json_log=args.log_format == "json")
    overrides = {"listen": args.listen, "upstream": args.upstream}
    try:
        policy = _load(args.policy, say, **overrides)
    except PolicyError as exc:
        return _report(exc, say)

    def reload(warn: bool) -> Policy:
        # Running, our words go to the log; the parent's check warns once,
        # the workers reading the file after it need not repeat it.
        return _load(args.policy, _Say(json_log=True, silent=not warn), **overrides)

    workers = args.workers if args.workers is not None else (os.cpu_count() or 1)
    try:
        return run(policy, workers, reload)
    except OSError as exc:
        say.error(f"smtpgate: cannot listen on {policy.gateway.listen}: {exc.strerror}")
        return 1


def cmd_lint(args: argparse.Namespace) -> int:
    status = 0
    for path in args.files:
        try:
            _load(path)
        except PolicyError as exc:
            status = _report(exc)
        else:
            print(f"{path}: ok")
    return status


def cmd_plugins(args: argparse.Namespace) -> int:
    try:
        policy = _load(args.policy)
    except PolicyError as exc:
        return _report(exc)
    registry = load_plugins(policy, Context(policy.gateway))
    enabled = {p.name for p in registry.plugins}
    print(f"policy {policy.source} (order of evaluation):")
    for i, p in enumerate(registry.plugins, 1):
        print(f"  {i}. {p.name}: hooks {', '.join(p.hooks) or '(none)'}; from {p.origin}")
    others = sorted(set(installed()) - enabled)
    if others:
        print("installed, not enabled:")
        for name in others:
            ep = installed()[name]
            print(f"  {name}: from {ep.value}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="smtpgate", description="A pluggable anti-spam policy gateway in front of an SMTP server (see README.md).")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the gateway")
    serve.add_argument("--policy", help="policy file (default: policies/default.toml)")
    serve.add_argument("--listen", help="HOST:PORT to listen on (overrides gateway.listen)")
    serve.add_argument("--upstream", help="HOST:PORT or maildir:DIR (overrides gateway.upstream)")
    serve.add_argument("--workers", type=_positive, help="processes sharing the port (default: one per core)")
    serve.add_argument("--log-format", choices=("text", "json"), default="text")
    serve.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info")
    serve.set_defaults(func=cmd_serve)

    lint = sub.add_parser("lint", help="validate policy files")
    lint.add_argument("files", nargs="+")
    lint.set_defaults(func=cmd_lint)

    plugins = sub.add_parser("plugins", help="list plugins, their hooks and origin")
    plugins.add_argument("--policy", help="policy file (default: policies/default.toml)")
    plugins.set_defaults(func=cmd_plugins)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
