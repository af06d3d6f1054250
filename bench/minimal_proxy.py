"""The "minimal aiosmtpd + aiosmtplib proxy": a baseline, not a product.

It does the least a Python SMTP proxy can do -- aiosmtpd receives the
message, handle_DATA forwards the envelope with aiosmtplib.send (a fresh
upstream connection per message) and relays the upstream's verdict. No
policy, no XCLIENT. Whatever smtpgate costs beyond this row is the price of
its checks and plumbing; this row itself is the price of Python SMTP.

    python3 -m bench.minimal_proxy --listen 127.0.0.1:P --upstream 127.0.0.1:Q [--workers N]

--workers N > 1 starts N-1 more copies of itself, all bound with
SO_REUSEPORT, so the kernel spreads connections over N processes
(one asyncio process tops out near one core).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import subprocess
import sys
from typing import Any

import aiosmtplib
from aiosmtpd.smtp import SMTP, Envelope, Session

HOSTNAME = "minimal-proxy.bench"


class ForwardingHandler:
    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream_host = upstream_host
        self.upstream_port = upstream_port

    async def handle_DATA(
        self, server: SMTP, session: Session, envelope: Envelope
    ) -> str:
        content: Any = envelope.original_content or envelope.content or b""
        try:
            await aiosmtplib.send(
                content,
                sender=envelope.mail_from,
                recipients=envelope.rcpt_tos,
                hostname=self.upstream_host,
                port=self.upstream_port,
                # Explicit: the default would call socket.getfqdn() per message.
                local_hostname=HOSTNAME,
                start_tls=False,
                timeout=30,
            )
        except aiosmtplib.SMTPResponseException as e:
            # Pass the upstream's own refusal back rather than inventing one.
            return f"{e.code} {e.message}"
        except (aiosmtplib.SMTPException, OSError) as e:
            return f"451 4.4.1 upstream unavailable: {type(e).__name__}"
        return "250 2.0.0 OK forwarded"


def _split(hostport: str) -> tuple[str, int]:
    host, _, port = hostport.rpartition(":")
    return host.strip("[]"), int(port)


async def serve(
    listen: tuple[str, int], upstream: tuple[str, int], reuse_port: bool
) -> None:
    handler = ForwardingHandler(*upstream)
    loop = asyncio.get_running_loop()
    # create_server in our own loop instead of aiosmtpd's Controller: the
    # Controller runs a second loop in a thread, pointless in a process that
    # does nothing else. hostname= avoids a getfqdn() per connection.
    server = await loop.create_server(
        lambda: SMTP(handler, hostname=HOSTNAME, ident="minimal-proxy"),
        host=listen[0],
        port=listen[1],
        reuse_port=reuse_port,
        backlog=1024,
    )
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m bench.minimal_proxy")
    p.add_argument("--listen", required=True, help="host:port")
    p.add_argument("--upstream", required=True, help="host:port")
    p.add_argument("--workers", type=int, default=1)
    a = p.parse_args(argv)
    extra: list[subprocess.Popen[bytes]] = []
    if a.workers > 1:
        # Same process group as us, so the harness's group kill reaches them;
        # we also terminate them ourselves on a clean exit.
        cmd = [
            sys.executable,
            "-m",
            "bench.minimal_proxy",
            "--listen",
            a.listen,
            "--upstream",
            a.upstream,
            "--workers",
            "1",
        ]
        extra = [subprocess.Popen(cmd) for _ in range(a.workers - 1)]
    try:
        asyncio.run(serve(_split(a.listen), _split(a.upstream), reuse_port=True))
    finally:
        for proc in extra:
            proc.terminate()
        for proc in extra:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
