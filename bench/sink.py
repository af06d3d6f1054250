"""smtp-sink as the upstream: Postfix's C test server that accepts and drops mail.

Run with -c so it keeps a running "mesg=N" counter on stdout; the harness
reads it before and after each measurement to check that a proxy really
forwarded every message (a proxy that answered 250 without forwarding would
otherwise look infinitely fast).
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

from bench.procs import Child, Children, free_port, wait_for_banner

SMTP_SINK = "/usr/sbin/smtp-sink"
_MESG = re.compile(rb"mesg=(\d+)")


class SmtpSink:
    def __init__(
        self,
        children: Children,
        sessions: int,
        xclient: bool = False,
        host: str = "127.0.0.1",
    ) -> None:
        self.host = host
        self.port = free_port(host)
        # As root smtp-sink refuses to run without dropping privileges
        # (-u postfix); as a normal user -u would fail instead.
        drop = ["-u", "postfix"] if os.geteuid() == 0 else []
        # smtp-sink accepts XCLIENT with "250 2.0.0 Ok", where Postfix sends
        # a fresh 220 greeting; a proxy written for Postfix may call that a
        # refusal. So by default -C: it does not offer XCLIENT at all.
        no_xclient = [] if xclient else ["-C"]
        argv = [
            SMTP_SINK,
            *drop,
            *no_xclient,
            "-c",  # running counters (sess/quit/mesg) on stdout
            # -m: max simultaneous connections (default 256); excess would
            # wait in the kernel queue and look like proxy latency.
            "-m",
            str(max(256, 4 * sessions)),
            f"{host}:{self.port}",
            "1024",  # listen(2) backlog: absorbs connect bursts of many sessions
        ]
        self.child: Child = children.spawn("smtp-sink", argv)
        wait_for_banner(host, self.port, timeout=10.0, child=self.child)

    def delivered(self) -> int:
        """Messages smtp-sink has received so far (its last "mesg=" counter)."""
        try:
            with self.child.log.open("rb") as f:
                f.seek(0, 2)
                f.seek(max(0, f.tell() - 256))
                found = _MESG.findall(f.read())
        except OSError:
            return -1
        return int(found[-1]) if found else 0

    def wait_delivered(self, target: int, timeout: float = 3.0) -> int:
        """Poll (bounded) until the counter reaches target; return what it reached.

        A store-and-forward proxy may still be flushing when its client is done.
        """
        deadline = time.monotonic() + timeout
        n = self.delivered()
        while n < target and time.monotonic() < deadline:
            time.sleep(0.05)
            n = self.delivered()
        return n


class LogCounter:
    """Counts lines containing `needle` in a growing log file, incrementally.

    Used on Postfix's maillog, which grows by ~5 lines per message: reading
    only the new part keeps the post-run check cheap.
    """

    def __init__(self, path: Path, needle: bytes) -> None:
        self.path = path
        self.needle = needle
        self._offset = 0
        self._count = 0

    def count(self) -> int:
        try:
            with self.path.open("rb") as f:
                f.seek(self._offset)
                chunk = f.read()
        except FileNotFoundError:
            return self._count
        end = chunk.rfind(b"\n") + 1  # only whole lines; the rest next time
        self._count += chunk.count(self.needle, 0, end)
        self._offset += end
        return self._count

    def wait_for(self, target: int, timeout: float) -> int:
        """Poll (bounded): Postfix discards after smtpd's 250, and postlogd
        writes asynchronously, so the count lags the client a little."""
        deadline = time.monotonic() + timeout
        n = self.count()
        while n < target and time.monotonic() < deadline:
            time.sleep(0.1)
            n = self.count()
        return n
