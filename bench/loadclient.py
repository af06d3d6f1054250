"""Run bench.client (our asyncio load client) in its own process.

A separate process so the client's event loop never competes with the
harness or shares an interpreter with the proxy under test.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from bench.procs import BenchError, Children


@dataclass(frozen=True)
class ClientRun:
    rate: float
    elapsed_s: float
    p50_ms: float
    p99_ms: float
    max_ms: float


def run_client(
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
) -> ClientRun:
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
    ]
    child = children.spawn("bench-client", argv, cwd=cwd)
    # The client bounds itself with --timeout; the extra slack covers start-up.
    rc = children.wait(child, timeout + 15.0)
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
        res["rate"], res["elapsed_s"], res["p50_ms"], res["p99_ms"], res["max_ms"]
    )
