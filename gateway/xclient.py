"""The XCLIENT command's attributes (Postfix's XCLIENT_README): what a
front proxy may tell us about the client it speaks for.

Only the SMTP front calls :func:`session_changes`, and only for a host in
``xclient_hosts``; it applies the changes and judges the client afresh.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any

from . import replies
from .address import client_address, is_hostname
from .replies import Reply

__all__ = ["Refused", "session_changes"]

#: Postfix's limit on one attribute's value.
VALUE_MAX = 255

_XTEXT = re.compile(rb"\+([0-9A-F]{2})")
#: What the command line itself may not carry (smtp.py), and the C1
#: controls: xtext must not smuggle them in, into our logs, a plugin's HELO
#: or the next hop's XCLIENT.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_UNAVAILABLE = ("[UNAVAILABLE]", "[TEMPUNAVAIL]")


class Refused(Exception):
    """An attribute we do not take; :attr:`reply` says which."""

    def __init__(self, reply: Reply):
        super().__init__(str(reply))
        self.reply = reply


def _xtext_decode(value: str) -> str:
    """xtext's ``+XX`` are octets, and the octets are UTF-8, as the rest
    of the command line is: ``b+C3+BCcher.example`` is ``bücher.example``.
    Raises ValueError (UnicodeDecodeError) for octets that are no UTF-8."""
    if "+" not in value:
        return value
    return _XTEXT.sub(lambda m: bytes((int(m[1], 16),)), value.encode()).decode()


def _address(value: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """An address as Postfix's XCLIENT reads one: IPv4 dotted-quad, or IPv6
    behind ``IPV6:`` (any case); ValueError for anything else."""
    if value[:5].upper() != "IPV6:":
        return ipaddress.IPv4Address(value)
    address = ipaddress.IPv6Address(value[5:])
    if address.scope_id is not None:
        raise ValueError(f"scoped address {address}")
    return address


def _port(value: str) -> int:
    """A port as Postfix's XCLIENT reads one (at most five digits), that is
    a port; ValueError for anything else."""
    if not (value.isascii() and value.isdigit() and len(value) <= 5 and int(value) <= 65535):
        raise ValueError
    return int(value)


def session_changes(arg: str) -> dict[str, Any]:
    """The :class:`~gateway.session.Session` fields that ``XCLIENT arg``
    sets, by name; raises :class:`Refused` for the first attribute that is
    malformed or not taken.  Nothing is half applied: a refusal changes
    nothing."""
    changes: dict[str, Any] = {}
    items = arg.split()
    if any(item.upper().startswith("ADDR=") for item in items):
        # A new address has no name unless one comes with it: the names
        # known so far were another client's.
        changes.update(client_name="unknown", reverse_name="unknown", name_tempfail=False, reverse_tempfail=False)
    for item in items:
        name, eq, value = item.partition("=")
        name = name.upper()
        try:
            value = _xtext_decode(value)
            unavailable = value.upper() in _UNAVAILABLE
            if not eq or _CONTROL.search(value):
                raise ValueError
            if name == "ADDR":
                if unavailable:
                    # Every check (relay, DNS lists, SPF) judges the address;
                    # keeping the previous one would let this client pass as
                    # that one, trusted perhaps.
                    raise Refused(replies.XCLIENT_NO_ADDR.format(attribute=item))
                # The syntax is Postfix's (XCLIENT_README), IPv6 only behind
                # IPV6:: a front proxy gets the answers from us that the
                # Postfix it was written for would give it.
                changes["client_ip"] = client_address(_address(value))
            elif len(value.encode()) > VALUE_MAX:
                raise ValueError
            elif name in ("NAME", "REVERSE_NAME"):
                # Only what the next hop's own XCLIENT takes: a value it
                # refused would make it unavailable for this client.  That
                # includes a DNS name's final dot, which Postfix's
                # valid_hostname() calls a misplaced delimiter.
                if not unavailable and (value.endswith(".") or not is_hostname(value)):
                    raise ValueError
                field = "client_name" if name == "NAME" else "reverse_name"
                changes[field] = "unknown" if unavailable else value
                # [TEMPUNAVAIL]: the next hop defers where it would reject.
                changes["name_tempfail" if name == "NAME" else "reverse_tempfail"] = value.upper() == "[TEMPUNAVAIL]"
            elif name == "PORT":
                changes["client_port"] = 0 if unavailable else _port(value)
            elif name == "HELO":
                changes["helo"] = None if unavailable else value
            elif name == "PROTO":
                if value.upper() not in ("SMTP", "ESMTP"):
                    raise ValueError
                changes["protocol"] = value.upper()
            elif name in ("DESTADDR", "DESTPORT"):
                # Not passed on (which of its addresses the next hop was
                # reached at is ours to say), but what Postfix's XCLIENT
                # refuses, [TEMPUNAVAIL] included, no front proxy may say.
                if value.upper() == "[UNAVAILABLE]":
                    pass
                elif name == "DESTADDR":
                    _address(value)
                else:
                    _port(value)
            else:
                # LOGIN too: we take no word for who authenticated.
                raise ValueError
        except ValueError:
            raise Refused(replies.XCLIENT_SYNTAX.format(attribute=item)) from None
    return changes
