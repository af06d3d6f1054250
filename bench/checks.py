"""The world the bench's "all checks" gateway sees: DNS, a DKIM key, a policy.

``python3 -m bench --checks ...`` runs a second smtpgate with every
DNS-based check on (bench/policy-checks.toml) and no trusted network, so
the bench client 127.0.0.1 is checked like any outside server:

* a loopback DNS server (tests/fixtures/dnsserver.py, ``DNSServer``) runs
  in a thread of the bench process and serves bench/zones/;
* a DKIM key (RSA 2048) is made for this run and published at
  ``bench._domainkey.example.org`` as a runtime zone, so no private key
  lives in the repository;
* one message, From: bench@example.org, is signed with it and written to
  the work directory; every tool sends that message on every path
  (smtp-source ``-F``, bench.client ``--message-file``), so the rows stay
  comparable and the gateway's DKIM and DMARC checks pass;
* the policy is written to the work directory with the DNS server's port
  and the recipients' domains filled in;
* with ``--checks slow``, names under ``slow.example.net.dbl.bench.test``
  (the RHSBL lookups of the slow sessions' sender domains) are answered
  after ``--slow-delay`` seconds (``DNSServer.delay``).
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from email.utils import formatdate
from pathlib import Path
from typing import Any

from bench.client import build_body
from bench.procs import BenchError

BENCH_DIR = Path(__file__).resolve().parent
ZONES_DIR = BENCH_DIR / "zones"
POLICY_TEMPLATE = BENCH_DIR / "policy-checks.toml"

#: HELO name and envelope sender in --checks runs (all paths, for fairness).
CHECKS_HELO = "client.example.org"
CHECKS_FROM = "bench@example.org"
DKIM_DOMAIN = "example.org"
DKIM_SELECTOR = "bench"
#: The RHSBL zone whose lookups for the slow senders are delayed.
SLOW_LIST = "dbl.bench.test"
#: Parent of the slow sessions' sender domains (see bench/zones/example.net.zone).
SLOW_PARENT = "slow.example.net"
#: bench.client --from template: one sender domain per message, never cached
#: ({run} is replaced by the harness, so no two runs share a domain either).
SLOW_FROM = "bench@{run}m{n}." + SLOW_PARENT
#: The control sessions: the same uncached work, no slow answer.
CONTROL_FROM = "bench@{run}m{n}.control.example.net"


@dataclass(frozen=True)
class ChecksEnv:
    nameserver: str
    policy: Path
    #: The DKIM-signed message (LF line ends, as smtp-source -F wants), or
    #: None with --no-sign (tools then generate unsigned messages).
    message: Path | None
    #: Seconds the slow names take to answer; 0 = not slowed.
    slow_delay: float
    dns: Any  # tests.fixtures.dnsserver.DNSServer


def _dkim_key() -> tuple[bytes, str]:
    """A fresh RSA 2048 key: (PEM private key, base64 SubjectPublicKeyInfo)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return pem, base64.b64encode(der).decode("ascii")


def _txt(text: str) -> str:
    """A TXT value in zone-file syntax, split into strings of <= 255 octets."""
    return " ".join(f'"{text[i:i + 255]}"' for i in range(0, len(text), 255))


def signed_message(pem: bytes, rcpt: str, size: int) -> bytes:
    """The bench message, DKIM-signed (relaxed/relaxed, rsa-sha256) by
    example.org, with CRLF line ends as on the wire."""
    import dkim

    head = (
        f"From: <{CHECKS_FROM}>\r\n"
        f"To: <{rcpt}>\r\n"
        "Subject: smtpgate bench\r\n"
        f"Date: {formatdate(localtime=False)}\r\n"
        f"Message-ID: <bench.checks@{DKIM_DOMAIN}>\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=us-ascii\r\n"
        "\r\n"
    ).encode()
    message = head + build_body(size)
    signature = dkim.sign(
        message,
        DKIM_SELECTOR.encode(),
        DKIM_DOMAIN.encode(),
        pem,
        canonicalize=(b"relaxed", b"relaxed"),
        include_headers=[b"from", b"to", b"subject", b"date", b"message-id"],
    )
    # dkimpy folds with bare LF in places; make every line end CRLF.
    signature = re.sub(rb"\r?\n", b"\r\n", signature)
    return signature + message


def write_policy(path: Path, nameserver: str, local_domains: list[str]) -> None:
    text = POLICY_TEMPLATE.read_text()
    domains = ", ".join(f'"{d}"' for d in local_domains)
    text, n1 = re.subn(
        r"(?m)^nameservers = .*$", f'nameservers = ["{nameserver}"]', text
    )
    text, n2 = re.subn(
        r"(?m)^local_domains = .*$", f"local_domains = [{domains}]", text
    )
    if n1 != 1 or n2 != 1:
        raise BenchError(
            f"{POLICY_TEMPLATE}: expected one 'nameservers = ' and one "
            "'local_domains = ' line to fill in"
        )
    path.write_text(
        f"# Generated by python3 -m bench from {POLICY_TEMPLATE.name}\n" + text
    )


@contextmanager
def checks_env(
    workdir: Path,
    *,
    rcpts: list[str],
    size: int,
    sign: bool,
    slow_delay: float,
) -> Iterator[ChecksEnv]:
    """Start the DNS server (in a thread), publish the key, write the files;
    the server is stopped on exit."""
    try:
        # Module-level pytest import in the fixture; fine outside pytest too.
        from tests.fixtures.dnsserver import DNSServer
    except ImportError as e:
        raise BenchError(
            f"--checks needs tests/fixtures/dnsserver.py (DNSServer): {e}"
        ) from e
    server = DNSServer(ZONES_DIR)
    try:
        server.start()
    except (OSError, RuntimeError) as e:
        raise BenchError(f"the loopback DNS server did not start: {e}") from e
    try:
        message: Path | None = None
        if sign:
            pem, public = _dkim_key()
            server.add_zone(
                f"_domainkey.{DKIM_DOMAIN}",
                f"$TTL 86400\n{DKIM_SELECTOR} IN TXT "
                + _txt(f"v=DKIM1; k=rsa; p={public}")
                + "\n",
            )
            message = workdir / "message-signed.eml"
            wire = signed_message(pem, rcpts[0], size)
            # smtp-source -F appends CRLF to every line itself.
            message.write_bytes(wire.replace(b"\r\n", b"\n"))
        if slow_delay > 0:
            server.delay(f"{SLOW_PARENT}.{SLOW_LIST}", slow_delay)
        policy = workdir / "policy-checks.toml"
        domains = sorted({r.rpartition("@")[2].lower() for r in rcpts})
        write_policy(policy, server.nameserver, domains)
        yield ChecksEnv(server.nameserver, policy, message, slow_delay, server)
    finally:
        server.stop()
