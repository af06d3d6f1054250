"""Run bench.client (our asyncio load client) in its own process.

A separate process so the client's event loop never competes with the
harness or shares an interpreter with the proxy under test.

``run_client`` runs it to the end; ``start_client`` + ``stop_client`` run it
as a background load that is told (SIGUSR1) to finish when the foreground
measurement is done.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

from bench.procs import BenchError, Child, Children


@dataclass(frozen=True)
class ClientRun:
    rate: float
    elapsed_s: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    sent: int = 0


def start_client(
    children: Children,
    host: str,
    port: int,
    *,
    messages: int,
    sessions: int,
    size: int,
    mail_from: str,
    rcpt_to: str,
    helo: str,
    timeout: float,
    cwd: Path,
    message_file: Path | None = None,
    ramp: float = 0.0,
    pace: float = 0.0,
    msg_timeout: float = 30.0,
    name: str = "bench-client",
) -> Child:
    argv = [
        sys.executable,
        "-m",
        "bench.client",
        f"{host}:{port}",
        "-m",
        str(messages),
        "-s",
        str(sessions),
        "-l",
        str(size),
        "-f",
        mail_from,
        "-t",
        rcpt_to,
        "--helo",
        helo,
        "--timeout",
        str(timeout),
        "--msg-timeout",
        str(msg_timeout),
    ]
    if message_file is not None:
        argv += ["--message-file", str(message_file)]
    if ramp > 0:
        argv += ["--ramp", str(ramp)]
    if pace > 0:
        argv += ["--pace", str(pace)]
    env = dict(os.environ)
    # So "-m bench.client" resolves from the repo whatever the caller's cwd.
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(cwd), env.get("PYTHONPATH", "")])
    )
    return children.spawn(name, argv, cwd=cwd, env=env)


def collect(
    children: Children, child: Child, host: str, port: int, wait: float
) -> ClientRun:
    """Wait (bounded) for the client to exit and parse its JSON line."""
    rc = children.wait(child, wait)
    out = child.tail(8000)
    lines = [ln for ln in out.splitlines() if ln.startswith("{")]
    if not lines:
        raise BenchError(
            f"bench.client to {host}:{port} printed no result (exit {rc}):\n{out}"
        )
    res = json.loads(lines[-1])
    if rc != 0:
        raise BenchError(
            f"bench.client to {host}:{port}: {res['errors']} errors, "
            f"timed_out={res['timed_out']}, e.g. {res['error_samples']}"
        )
    return ClientRun(
        res["rate"],
        res["elapsed_s"],
        res["p50_ms"],
        res["p99_ms"],
        res["max_ms"],
        res["sent"],
    )


def run_client(
    children: Children,
    host: str,
    port: int,
    *,
    timeout: float,
    **kw: object,
) -> ClientRun:
    child = start_client(children, host, port, timeout=timeout, **kw)  # type: ignore[arg-type]
    # The client bounds itself with --timeout; the extra slack covers start-up.
    return collect(children, child, host, port, timeout + 15.0)


def stop_client(
    children: Children, child: Child, host: str, port: int, drain: float
) -> ClientRun:
    """Tell a background client to start no new message (SIGUSR1), let the
    ones in flight finish (at most ``drain`` seconds), and parse its result."""
    if not child.running():
        rc = child.popen.returncode
        raise BenchError(
            f"the background bench.client exited early (exit {rc}):\n{child.tail()}"
        )
    try:
        os.kill(child.pid, signal.SIGUSR1)
    except ProcessLookupError:
        pass
    return collect(children, child, host, port, drain)
