"""Instructions per message, counted by callgrind: a speed figure that a busy
or throttled machine does not blur.

    python3 -m bench.instructions                       # smtpgate and the minimal proxy, 300 messages
    python3 -m bench.instructions --gateway-cmd gateway --messages 500
    python3 -m bench.instructions --checks              # smtpgate, then smtpgate with every check on

Each proxy runs with one worker under ``valgrind --tool=callgrind`` in front
of smtp-sink.  Instrumentation is switched on only after a warm-up (imports,
first connections), for exactly ``--messages`` messages sent by smtp-source,
then the counters are dumped.  The figure is user-space instructions (Ir)
per message: the same code and input give the same count to within a few
tenths of a percent, where msgs/s on this kind of machine varies by 20 %.
It does not count kernel time (system calls) or waiting, so it
complements ``python3 -m bench``, it does not replace it.  The first proxy
listed is the baseline of the ratio column.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from bench.checks import CHECKS_FROM, CHECKS_HELO, checks_env
from bench.procs import BenchError, Children
from bench.proxies import PRESETS, ProxySpec, parse_proxy, start_proxy
from bench.sink import SmtpSink
from bench.source import run_smtp_source

REPO = Path(__file__).resolve().parent.parent
VALGRIND = shutil.which("valgrind") or "valgrind"
CALLGRIND_CONTROL = shutil.which("callgrind_control") or "callgrind_control"
_TOTALS = re.compile(rb"^(?:summary|totals):\s+(\d+)", re.MULTILINE)


def _control(*args: str) -> None:
    subprocess.run([CALLGRIND_CONTROL, *args], check=True, capture_output=True, timeout=60)


@dataclass(frozen=True)
class Load:
    messages: int
    sessions: int
    size: int
    mail_from: str = "sender@example.com"
    helo: str = "[127.0.0.1]"
    message_file: Path | None = None


def _one_process(spec: ProxySpec) -> ProxySpec:
    """smtpgate's worker runs in a child of a parent that only watches it;
    callgrind_control reaches the process it started, so run the worker
    alone there (bench/worker.py)."""
    if spec.template == PRESETS["gateway"]:
        return ProxySpec(spec.label, PRESETS["worker"], spec.policy)
    return spec


def measure(children: Children, spec: ProxySpec, workdir: Path, load: Load) -> int:
    """Instructions the proxy executed for ``load.messages`` messages."""
    spec = _one_process(spec)
    sink = SmtpSink(children, load.sessions)
    out = workdir / f"callgrind.{re.sub(r'[^A-Za-z0-9]+', '-', spec.label)}"
    traced = ProxySpec(
        spec.label,
        f"{VALGRIND} --tool=callgrind --instr-atstart=no --callgrind-out-file={out}.%p {spec.template}",
        spec.policy,
    )
    proxy = start_proxy(
        children, traced, upstream_host=sink.host, upstream_port=sink.port, workers=1,
        policy=REPO / "bench" / "policy.toml", cwd=REPO, ready_timeout=120.0,
    )
    send = dict(sessions=load.sessions, size=load.size, mail_from=load.mail_from, rcpt_to="rcpt@example.com",
                helo=load.helo, timeout=600.0, message_file=load.message_file)
    try:
        run_smtp_source(children, proxy.host, proxy.port, messages=50, **send)  # warm-up
        pid = str(proxy.child.pid)
        _control("-i", "on", pid)
        run_smtp_source(children, proxy.host, proxy.port, messages=load.messages, **send)
        _control("-d", pid)
        _control("-i", "off", pid)
    finally:
        children.stop(proxy.child)
        children.stop(sink.child)
    dumps = sorted(workdir.glob(f"{out.name}.*.*"))  # callgrind.LABEL.PID.N: the -d dump
    if not dumps:
        raise BenchError(f"callgrind wrote no dump for {spec.label}; log tail:\n{proxy.child.tail()}")
    found = _TOTALS.search(dumps[-1].read_bytes())
    if found is None:
        raise BenchError(f"no instruction total in {dumps[-1]}")
    return int(found[1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m bench.instructions", description=__doc__.splitlines()[0])
    parser.add_argument("--gateway-cmd", action="append", dest="proxies", metavar="CMD",
                        help="as for python3 -m bench (default: minimal, then gateway)")
    parser.add_argument("--messages", type=int, default=300)
    parser.add_argument("--sessions", type=int, default=10)
    parser.add_argument("--size", type=int, default=5120)
    parser.add_argument("--checks", action="store_true",
                        help="smtpgate, then smtpgate with every DNS check on (bench/policy-checks.toml, "
                             "a loopback DNS server, a DKIM-signed message), both sent that message")
    args = parser.parse_args(argv)
    if shutil.which(VALGRIND) is None:
        print("valgrind is not installed (Debian package valgrind)", file=sys.stderr)
        return 2
    rows = []
    with tempfile.TemporaryDirectory(prefix="smtpgate-instructions-") as tmp, Children(Path(tmp)) as children:
        workdir = Path(tmp)
        if args.checks:
            with checks_env(workdir, rcpts=["rcpt@example.com"], size=args.size, sign=True, slow_delay=0) as env:
                load = Load(args.messages, args.sessions, args.size, CHECKS_FROM, CHECKS_HELO, env.message)
                specs = [parse_proxy("gateway"), ProxySpec("smtpgate (all checks)", PRESETS["gateway"], env.policy)]
                rows = [(spec.label, measure(children, spec, workdir, load) / args.messages) for spec in specs]
        else:
            load = Load(args.messages, args.sessions, args.size)
            specs = [parse_proxy(p) for p in (args.proxies or ["minimal", "gateway"])]
            rows = [(spec.label, measure(children, spec, workdir, load) / args.messages) for spec in specs]
    for label, per_message in rows:
        print(f"  {label}: {per_message:,.0f} instructions per message", file=sys.stderr)
    print(f"callgrind, user-space instructions per message ({args.messages} messages x {args.size} B, "
          f"{args.sessions} sessions, one worker, to smtp-sink)")
    base = rows[0][1]
    for label, per_message in rows:
        print(f"{label:<24} {per_message:>12,.0f}  x {per_message / base:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
