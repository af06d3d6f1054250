"""Run Postfix's smtp-source (C load generator) and time it.

Flags used (Postfix 3.7, see smtp-source(1)):
  -s N   N parallel sessions          -m N   N messages in total
  -l N   N bytes of body (after the headers smtp-source writes itself)
  -f/-t  envelope sender / recipient  -M     HELO name (else the host name)
No -d, so each message gets its own connection (connect, HELO, MAIL, RCPT,
DATA, QUIT) -- the same shape as our asyncio client. No -A, so any
unexpected reply makes smtp-source exit non-zero, which fails the run.
Note smtp-source says HELO, not EHLO, and does not pipeline.
With a message file (--checks: a DKIM-signed message), -F FILE replaces -l:
smtp-source sends the file's headers and body as they are (it adds CRLF to
every line and dot-stuffs), instead of its own From/To/Date/Message-Id
headers and numbered X lines. -F and -l cannot be combined.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from bench.procs import BenchError, Children

SMTP_SOURCE = "/usr/sbin/smtp-source"


@dataclass(frozen=True)
class SourceResult:
    elapsed_s: float
    rate: float


def run_smtp_source(
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
    message_file: Path | None = None,
) -> SourceResult:
    payload = ["-F", str(message_file)] if message_file else ["-l", str(size)]
    argv = [
        SMTP_SOURCE,
        "-s",
        str(sessions),
        "-m",
        str(messages),
        *payload,
        "-f",
        mail_from,
        "-t",
        rcpt_to,
        "-M",
        helo,
        f"{host}:{port}",
    ]
    t0 = time.perf_counter()
    child = children.spawn("smtp-source", argv)
    rc = children.wait(child, timeout)
    elapsed = time.perf_counter() - t0
    if rc != 0:
        raise BenchError(
            f"smtp-source to {host}:{port} failed (exit {rc}):\n{child.tail()}"
        )
    return SourceResult(elapsed, messages / elapsed if elapsed > 0 else 0.0)
