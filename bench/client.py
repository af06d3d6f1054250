"""Asyncio SMTP load client that records the wall time of every message.

smtp-source gives only a total; this client gives the latency distribution.
It behaves like smtp-source without -d: ONE connection per message
(connect, 220, EHLO, MAIL, RCPT, DATA, body, QUIT), C concurrent sessions
pulling message numbers from a shared counter. Raw asyncio (a Protocol
callback state machine) rather than smtplib/aiosmtplib, because library
overhead would land in the measurement and make the client the bottleneck
sooner. Measured ceiling on the 2-core box: ~3,000 msg/s against smtp-sink,
about half of it kernel time (one TCP connect/close per message); so it is
fine for a ~1,000 msg/s proxy, but it does take ~1/3 core from it.

The test is closed-loop (a session starts its next message when the last
one finished), so under load p50 is roughly sessions / rate (Little's law);
run with -s 1 for the unloaded per-message service time.

It runs as its own process (``python3 -m bench.client ...``), printing one
JSON object on stdout, so it never shares a core's event loop with the
server under test.

For the --checks runs: ``--message-file`` sends one fixed message (e.g. a
DKIM-signed one) instead of a generated body; ``--from`` may contain ``{n}``
(the message number), e.g. a sender domain per message that no cache has
seen; ``--ramp`` spreads the sessions' starts; ``--pace`` makes each session
pause between its messages (client-side, without a connection); and SIGUSR1
makes it start no
new message, finish the ones in flight and report (a background load that
the harness stops when its foreground measurement is done).
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import signal
import sys
import time
from dataclasses import asdict, dataclass, field

from bench.stats import percentile

MAX_REPLY_LINES = 100  # bound for a multi-line reply (EHLO lists ~10)


class SmtpReplyError(Exception):
    pass


@dataclass
class ClientResult:
    sent: int = 0
    errors: int = 0
    elapsed_s: float = 0.0
    rate: float = 0.0
    p50_ms: float = 0.0
    p90_ms: float = 0.0
    p99_ms: float = 0.0
    max_ms: float = 0.0
    timed_out: bool = False
    stopped: bool = False  # SIGUSR1: drained before the message count was reached
    error_samples: list[str] = field(default_factory=list)


def load_message(path: str) -> bytes:
    """A message file (headers, blank line, body) as DATA content: CRLF line
    ends and dot-stuffing, like smtp-source -F; without the final "."."""
    with open(path, "rb") as f:
        lines = f.read().splitlines()
    return b"".join((b"." + ln if ln.startswith(b".") else ln) + b"\r\n" for ln in lines)


def build_body(size: int) -> bytes:
    """size bytes of payload in 80-byte CRLF lines, shaped like smtp-source -l.

    Lines never start with '.', so no dot-stuffing is needed.
    """
    line = b"X" * 78 + b"\r\n"
    full, rest = divmod(size, len(line))
    body = line * full
    if rest:
        # A short last line, still CRLF-terminated (so at most 1 byte over).
        body += b"X" * max(0, rest - 2) + b"\r\n"
    return body


class _SmtpSession(asyncio.Protocol):
    """One message over one connection, as a callback state machine.

    A Protocol instead of StreamReader/StreamWriter coroutines: it costs
    roughly half the CPU per message, and every cycle the client burns is
    taken from the server under test on a 2-core machine.
    """

    def __init__(
        self, steps: list[tuple[bytes | None, bytes]], done: asyncio.Future[None]
    ) -> None:
        # steps[i] = (what to send once the previous reply arrived, expected code)
        self._steps = steps
        self._i = 0
        self._buf = b""
        self._done = done
        self._transport: asyncio.Transport | None = None
        self._lines = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        self._buf += data
        while not self._done.done():
            nl = self._buf.find(b"\n")
            if nl < 0:
                return
            line, self._buf = self._buf[: nl + 1], self._buf[nl + 1 :]
            self._lines += 1
            if self._lines > MAX_REPLY_LINES * len(self._steps):
                self._fail("too many reply lines")
                return
            if len(line) >= 4 and line[3:4] == b"-":
                continue  # continuation line of a multi-line reply
            want = self._steps[self._i][1]
            if not line.startswith(want):
                self._fail(f"expected {want.decode()}, got {line.strip()[:120]!r}")
                return
            self._i += 1
            if self._i == len(self._steps):
                self._done.set_result(None)
                assert self._transport is not None
                self._transport.close()
                return
            cmd = self._steps[self._i][0]
            if cmd is not None and self._transport is not None:
                self._transport.write(cmd)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._done.done():
            self._fail(f"connection closed at step {self._i}: {exc}")

    def _fail(self, why: str) -> None:
        if not self._done.done():
            self._done.set_exception(SmtpReplyError(why))
        if self._transport is not None:
            self._transport.abort()


async def send_one(
    host: str, port: int, steps: list[tuple[bytes | None, bytes]]
) -> None:
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    transport, _ = await loop.create_connection(
        lambda: _SmtpSession(steps, done), host, port
    )
    try:
        await done
    finally:
        transport.close()


async def run(
    host: str,
    port: int,
    messages: int,
    sessions: int,
    size: int,
    mail_from: str,
    rcpt_to: str,
    helo: str,
    msg_timeout: float,
    total_timeout: float,
    message_file: str | None = None,
    ramp: float = 0.0,
    pace: float = 0.0,
) -> ClientResult:
    body = build_body(size)
    fixed = load_message(message_file) + b".\r\n" if message_file else None
    per_message_sender = "{n}" in mail_from
    mail_cmd = f"MAIL FROM:<{mail_from}>\r\n".encode()
    rcpt_cmd = f"RCPT TO:<{rcpt_to}>\r\n".encode()
    ehlo_cmd = f"EHLO {helo}\r\n".encode()
    header_tpl = (
        f"From: <{mail_from}>\r\nTo: <{rcpt_to}>\r\nSubject: bench\r\n"
        "Message-Id: <bench.{n}@client.invalid>\r\n\r\n"
    )
    latencies: list[float] = []
    res = ClientResult()
    next_n = 0
    # SIGUSR1: no new messages; those in flight finish and are counted.
    draining = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGUSR1, draining.set)

    async def pause(seconds: float) -> None:
        """Sleep, cut short by SIGUSR1."""
        try:
            async with asyncio.timeout(seconds):
                await draining.wait()
        except TimeoutError:
            pass

    async def worker(i: int) -> None:
        nonlocal next_n
        if ramp > 0 and i:
            await pause(ramp * i / max(1, sessions))  # spread the sessions' starts
        first = True
        while next_n < messages and not draining.is_set():  # bounded by the count
            if pace > 0 and not first:
                await pause(pace)  # think time between this session's messages
                if draining.is_set():
                    break
            first = False
            n = next_n
            next_n += 1
            if fixed is not None:
                msg = fixed
            else:
                msg = header_tpl.format(n=n).encode() + body + b".\r\n"
            mail = (
                f"MAIL FROM:<{mail_from.format(n=n)}>\r\n".encode()
                if per_message_sender
                else mail_cmd
            )
            steps: list[tuple[bytes | None, bytes]] = [
                (None, b"220"),
                (ehlo_cmd, b"250"),
                (mail, b"250"),
                (rcpt_cmd, b"250"),
                (b"DATA\r\n", b"354"),
                (msg, b"250"),
                (b"QUIT\r\n", b"221"),
            ]
            t0 = time.perf_counter()
            try:
                async with asyncio.timeout(msg_timeout):
                    await send_one(host, port, steps)
            except (OSError, SmtpReplyError, TimeoutError) as e:
                res.errors += 1
                if len(res.error_samples) < 5:
                    res.error_samples.append(f"msg {n}: {type(e).__name__}: {e}")
                continue
            latencies.append(time.perf_counter() - t0)

    t_start = time.perf_counter()
    tasks = [asyncio.create_task(worker(i)) for i in range(max(1, sessions))]
    try:
        async with asyncio.timeout(total_timeout):
            await asyncio.gather(*tasks)
    except TimeoutError:
        res.timed_out = True
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    res.elapsed_s = time.perf_counter() - t_start
    res.stopped = draining.is_set() and next_n < messages
    loop.remove_signal_handler(signal.SIGUSR1)

    latencies.sort()
    res.sent = len(latencies)
    res.rate = res.sent / res.elapsed_s if res.elapsed_s > 0 else 0.0
    res.p50_ms = percentile(latencies, 50) * 1000
    res.p90_ms = percentile(latencies, 90) * 1000
    res.p99_ms = percentile(latencies, 99) * 1000
    res.max_ms = (latencies[-1] * 1000) if latencies else float("nan")
    return res


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python3 -m bench.client",
        description="One-connection-per-message SMTP load client; prints JSON.",
    )
    p.add_argument("target", help="host:port (loopback only)")
    p.add_argument("-m", "--messages", type=int, default=1000)
    p.add_argument("-s", "--sessions", type=int, default=50)
    p.add_argument("-l", "--size", type=int, default=5120, help="body bytes")
    p.add_argument(
        "-f",
        "--mail-from",
        default="sender@example.com",
        help="envelope sender (and From: of generated messages); {n} = message number",
    )
    p.add_argument("-t", "--rcpt-to", default="alice@example.com")
    p.add_argument("--helo", default="[127.0.0.1]")
    p.add_argument(
        "--message-file",
        help="send this message (headers and body; LF or CRLF) instead of a generated one",
    )
    p.add_argument(
        "--ramp",
        type=float,
        default=0.0,
        help="spread the sessions' first connections over this many seconds",
    )
    p.add_argument(
        "--pace",
        type=float,
        default=0.0,
        help="each session pauses this many seconds between its messages",
    )
    p.add_argument("--msg-timeout", type=float, default=30.0)
    p.add_argument("--timeout", type=float, default=300.0, help="whole run")
    a = p.parse_args(argv)
    host, _, port = a.target.rpartition(":")
    host = host.strip("[]")
    if not _is_loopback(host):
        p.error("refusing a non-loopback target")  # bench traffic stays local
    res = asyncio.run(
        run(
            host,
            int(port),
            a.messages,
            a.sessions,
            a.size,
            a.mail_from,
            a.rcpt_to,
            a.helo,
            a.msg_timeout,
            a.timeout,
            a.message_file,
            a.ramp,
            a.pace,
        )
    )
    json.dump(asdict(res), sys.stdout)
    sys.stdout.write("\n")
    return 0 if res.errors == 0 and not res.timed_out else 1


if __name__ == "__main__":
    sys.exit(main())
