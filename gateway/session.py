"""The state a plugin sees: the session, the envelope, the message."""

from __future__ import annotations

import email.parser
import email.policy
import ipaddress
import itertools
import os
from dataclasses import dataclass, field
from email.message import Message as _EmailMessage
from functools import cached_property
from typing import Any

from .address import Address, Params
from .stash import Stash
from .verdict import Verdict

__all__ = ["Session", "Envelope", "Recipient", "Message", "IPAddress"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_ids = itertools.count(1)
#: The pid keeps ids unique across worker processes sharing one log.
#: Kept here: os.getpid() is a system call, and every message takes two ids.
_pid = os.getpid()


def _forked() -> None:
    global _pid
    _pid = os.getpid()


# A worker is forked after this module is imported.
os.register_at_fork(after_in_child=_forked)


def _next_id() -> str:
    return f"{_pid}.{next(_ids)}"


@dataclass(slots=True)
class Session:
    """One client connection, as the checks see it.

    The client fields start from the TCP peer (or the PROXY protocol header)
    and change when an authorised host sends XCLIENT, so every check judges
    the real client.  Plugins keep what they learned in :attr:`results`,
    keyed by plugin name, for later stages and for other plugins to read.

    :param client_ip: the client's address.
    :param client_port: the client's port (0 when unknown).
    :param client_name: the verified (forward-confirmed) reverse name,
        ``"unknown"`` when there is none (Postfix's convention, also what
        XCLIENT NAME carries).  Looked up at connect, as Postfix does
        (``peername_lookup``), or given by the front proxy's XCLIENT.
    :param reverse_name: the client's PTR name, confirmed or not
        (Postfix's ``client_reverse_name``), ``"unknown"`` when there is none.
    :param name_tempfail: ``client_name`` is unknown because a lookup failed
        temporarily (Postfix then defers rather than rejects).
    :param reverse_tempfail: likewise for ``reverse_name``.
    :param helo: the HELO/EHLO argument, ``None`` before HELO.
    :param esmtp: the client said EHLO.
    :param trusted: the client is in ``trusted_networks``.
    :param peer_ip: the TCP peer, never changed by XCLIENT.
    :param allowlisted: ``plugin:result`` of the connect-stage ACCEPT
        verdict that allow-lists this client (a DNSWL hit, say), ``""`` if
        none; checks with ``skip_allowlisted`` leave such clients alone.
        Set by the gateway, cleared by XCLIENT.
    """

    client_ip: IPAddress
    client_port: int = 0
    client_name: str = "unknown"
    reverse_name: str = "unknown"
    name_tempfail: bool = False
    reverse_tempfail: bool = False
    helo: str | None = None
    esmtp: bool = False
    trusted: bool = False
    peer_ip: IPAddress | None = None
    protocol: str = "SMTP"
    allowlisted: str = ""
    id: str = field(default_factory=_next_id)
    results: dict[str, Any] = field(default_factory=dict)
    #: verdicts that tagged this session (headers, scores) before DATA.
    tags: list[Verdict] = field(default_factory=list)
    #: typed storage for plugins (:mod:`gateway.stash`); cleared by XCLIENT.
    stash: Stash = field(default_factory=Stash, repr=False, compare=False)

    @property
    def client(self) -> str:
        """``name[ip]`` as Postfix logs a client."""
        return f"{self.client_name}[{self.client_ip}]"


@dataclass(frozen=True, slots=True)
class Recipient:
    address: Address
    params: Params = ()


@dataclass(slots=True)
class Envelope:
    """One mail transaction: MAIL FROM, the accepted recipients, and what
    the checks attached to it."""

    sender: Address
    mail_params: Params = ()
    recipients: list[Recipient] = field(default_factory=list)
    #: verdicts that tagged this transaction (headers, scores).
    tags: list[Verdict] = field(default_factory=list)
    id: str = field(default_factory=_next_id)
    #: typed storage for plugins, for this transaction only.
    stash: Stash = field(default_factory=Stash, repr=False, compare=False)

    @property
    def utf8(self) -> bool:
        return any(name == "SMTPUTF8" for name, _ in self.mail_params)

    def param(self, name: str) -> str | None:
        for key, value in self.mail_params:
            if key == name:
                return value
        return None


_header_parser = email.parser.BytesHeaderParser(policy=email.policy.compat32)


@dataclass(frozen=True)
class Message:
    """The message as the client sent it, dot-stuffing undone, CRLF line ends.

    ``headers`` is parsed on first use only: most plugins never look, and
    parsing every message would cost every session.
    """

    raw: bytes
    #: typed storage for plugins, e.g. one DKIM verification shared by two.
    stash: Stash = field(default_factory=Stash, repr=False, compare=False)

    @cached_property
    def headers(self) -> _EmailMessage:
        return _header_parser.parsebytes(self.raw, headersonly=True)

    @property
    def size(self) -> int:
        return len(self.raw)
