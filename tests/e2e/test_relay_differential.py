"""Differential test of the relay decision against the real Postfix.

The test Postfix has ``smtpd_relay_restrictions = permit_mynetworks,
reject_unauth_destination`` and ``example.com`` as its one local domain, the
gateway's policy the same.  Each RCPT path is put to Postfix directly, as an
outside client (XCLIENT), and to our relay plugin.  The promise: whenever
Postfix answers ``554 5.7.1 ... Relay access denied``, we refuse too (our
own 554, or 501 5.1.3 when our parser refuses the path).  We may be
stricter: Postfix strips a source route whose last hop is ours, treats
``user@[127.0.0.1]`` as local (its own address), drops a trailing dot, reads
a quoted ``"@a:user"@example.com`` as a local mailbox; we refuse all of
these.  Addresses where we are stricter are printed at the end of
:func:`test_postfix_never_relays_what_we_accept` (``pytest -rP``).

Paths come from the generator of ``tests/test_relay_properties.py``.
"""

from __future__ import annotations

import ipaddress
import socket
from collections import Counter
from collections.abc import Iterator

import pytest
from hypothesis import event, given, note, settings

from gateway import Action, Context, Recipient, Session
from gateway.address import PathError, parse_path
from plugins.relay import RelayPlugin
from tests.fixtures.gateway import OUTSIDE_IP, make_policy
from tests.fixtures.postfix import PostfixInstance
from tests.test_relay_properties import CLASSICS, examples, paths, split_path

pytestmark = pytest.mark.e2e

#: Postfix sleeps smtpd_error_sleep_time (1 s) before every reply once a
#: session has made smtpd_soft_error_limit (10) errors; each RCPT is at most
#: one error, so a new session every 9 keeps every reply immediate.
RCPTS_PER_SESSION = 9
#: Postfix's own words when reject_unauth_destination refuses.
RELAY_DENIED = b"Relay access denied"
#: What the gateway's relay plugin knows: the policy of the gateway fixture.
CONTEXT = Context(make_policy("127.0.0.1:25").gateway)
RELAY = RelayPlugin(RelayPlugin.Options(), CONTEXT, "relay")
OUTSIDE = Session(client_ip=ipaddress.ip_address(OUTSIDE_IP), trusted=False)

#: Paths Postfix judges in a way worth pinning, besides the generated ones.
CORPUS = [
    *CLASSICS,
    "alice@example.com",
    "ALICE@Example.COM",
    "nobody@example.com",
    "postmaster@example.com",
    "user@example.com.remote.example",
    "alice%example.com@example.com",
    "alice@[127.0.0.1].",
    "@[IPv6:::1]:alice@example.com",
    '"@example.com:postmaster"@example.com',
    '"alice\\@"@example.com',
    '"al ice"@example.com',
    '"a:b"@example.com',
    '"alice"@example.com',
    "alice@exämple.com",
    "alice@ｅｘａｍｐｌｅ.com",
    "alice@example。com",
    "alice@xn--exmple-cua.com",
    "\\@remote.example:alice@example.com",
    "alice\\%remote.example@example.com",
]


def read_reply(file) -> bytes:
    """One whole (possibly multi-line) reply, however many are buffered."""
    reply = b""
    while True:
        line = file.readline()
        reply += line
        if not line or line[3:4] == b" ":
            return reply


class Prober:
    """Sessions to an SMTP server as the outside client (``XCLIENT``),
    each path in a transaction of its own: MAIL, RCPT, RSET, pipelined."""

    def __init__(self, port: int, helo: str) -> None:
        self.port = port
        self.helo = helo
        self.sock: socket.socket | None = None
        self.file = None
        self.used = 0

    def _open(self) -> None:
        self.close()
        self.sock = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        self.file = self.sock.makefile("rb")
        assert read_reply(self.file).startswith(b"220 ")
        for line, code in ((f"XCLIENT ADDR={OUTSIDE_IP} NAME=[UNAVAILABLE]", b"220 "), (f"EHLO {self.helo}", b"250 ")):
            self.sock.sendall(line.encode() + b"\r\n")
            reply = read_reply(self.file)
            assert reply.splitlines()[-1].startswith(code), reply
        self.used = 0

    def rcpt(self, path: str) -> bytes:
        """The reply to ``RCPT TO:<path>``."""
        assert "\r" not in path and "\n" not in path
        if self.sock is None or self.used >= RCPTS_PER_SESSION:
            self._open()
        assert self.sock is not None and self.file is not None
        self.used += 1
        self.sock.sendall(
            b"MAIL FROM:<bob@example.org> SMTPUTF8\r\n"
            + f"RCPT TO:<{path}>\r\n".encode()
            + b"RSET\r\n"
        )
        mail, rcpt, rset = (read_reply(self.file) for _ in range(3))
        assert mail.startswith(b"250 ") and rset.startswith(b"250 "), (mail, rset)
        return rcpt

    def close(self) -> None:
        if self.sock is not None:
            try:
                self.sock.sendall(b"QUIT\r\n")
                read_reply(self.file)
            except OSError:
                pass
            self.file.close()
            self.sock.close()
            self.sock = self.file = None


@pytest.fixture
def prober(postfix: PostfixInstance) -> Iterator[Prober]:
    p = Prober(postfix.port, "probe.example.net")
    yield p
    p.close()


def postfix_says(reply: bytes) -> str:
    """``relay-denied``; ``local`` (accepted, or refused only because the
    mailbox is unknown: the relay check passed); or ``refused`` (syntax...)."""
    if RELAY_DENIED in reply:
        assert reply.startswith(b"554 5.7.1 <"), reply
        return "relay-denied"
    if reply.startswith(b"250 ") or (reply.startswith(b"550 5.1.1 ") and b"User unknown" in reply):
        return "local"
    return "refused"


def we_say(path: str) -> str:
    """``accepted``, or why not: the core's 501 or the plugin's finding."""
    try:
        address = parse_path(f"TO:<{path}>", "TO", utf8=True)[0]
    except PathError:
        return "501 5.1.3"
    verdict = RELAY.rcpt(session=OUTSIDE, recipient=Recipient(address))
    return "accepted" if verdict.action is Action.CONTINUE else verdict.result


def test_postfix_never_relays_what_we_accept(prober: Prober) -> None:
    seen: Counter[tuple[str, str]] = Counter()
    stricter: dict[str, tuple[str, str]] = {}

    @given(path=paths)
    @examples(*CORPUS)
    @settings(max_examples=250)
    def check(path: str) -> None:
        reply = prober.rcpt(path)
        theirs, ours = postfix_says(reply), we_say(path)
        note(f"Postfix: {reply!r}; we: {ours}")
        event(f"Postfix {theirs}, we {'accept' if ours == 'accepted' else 'refuse'}")
        seen[theirs, "accepted" if ours == "accepted" else "refused"] += 1
        if theirs == "relay-denied":
            assert ours != "accepted", f"Postfix refuses to relay <{path}>, the plugin lets it through"
        elif theirs == "local" and ours != "accepted":
            stricter[path] = (reply.decode("utf-8", "replace").strip(), ours)

    check()
    # The comparison meant something: both outcomes of each side occurred.
    assert seen["relay-denied", "refused"] >= 50, seen
    assert seen["local", "accepted"] >= 10, seen
    assert seen["local", "refused"] >= 5, seen
    print(f"{sum(seen.values())} paths: {dict(seen)}")
    print("Where we are stricter than Postfix (path -- Postfix -- we):")
    for path, (theirs, ours) in sorted(stricter.items()):
        print(f"  {path}  --  {theirs}  --  {ours}")


def mailbox(path: str) -> str:
    """The path without its source route: what Postfix and we name in a reply."""
    _, local, domain = split_path(path)
    return f"{local}@{domain}" if domain is not None else local


def test_what_postfix_would_relay_the_gateway_refuses_itself(gateway, postfix: PostfixInstance, prober: Prober) -> None:
    """Through the gateway, over the wire: for every corpus path Postfix
    refuses to relay, the client hears the gateway's own refusal, and the
    RCPT never reaches Postfix."""
    denied = [p for p in CORPUS if postfix_says(prober.rcpt(p)) == "relay-denied"]
    assert len(denied) >= 15, denied
    client = Prober(gateway.port, "gw-client.example.net")
    try:
        for path in denied:
            reply = client.rcpt(path)
            assert reply in (
                f"554 5.7.1 <{mailbox(path)}>: Relay access denied\r\n".encode(),
                b"501 5.1.3 Bad recipient address syntax\r\n",
            ), f"<{path}>: the gateway did not refuse it itself, the client heard {reply!r}"
        # A last RCPT the gateway passes on and Postfix refuses: once its
        # rejection is in the log, so is any earlier one.
        assert client.rcpt("nobody@example.com").startswith(b"550 5.1.1 <nobody@example.com>")
    finally:
        client.close()
    postfix.wait_for_log(r"reject: RCPT .*<nobody@example\.com>.*helo=<gw-client\.example\.net>")
    forwarded = [r for r in postfix.rejections() if r["helo"] == "gw-client.example.net"]
    assert [r["to"] for r in forwarded] == ["nobody@example.com"]
