"""RFC 5321 paths and ESMTP parameters, parsed by hand.

The standard library's address parser (``email._header_value_parser``) is
written for RFC 5322 headers, is lenient where an envelope must be strict, and
showed up at the top of the minimal proxy's profile.  Envelope syntax is
small; this parser accepts exactly RFC 5321 (plus the SMTPUTF8 extension of
RFC 6531 when the client asked for it) and keeps the address as the client
wrote it, so the next hop receives the same bytes.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from dataclasses import dataclass

import idna

__all__ = [
    "Address", "Params", "PathError", "ParamError", "parse_path", "is_domain", "is_hostname", "may_be_ip",
    "to_ascii_domain", "client_address",
]

# atext of RFC 5322 §3.2.3; non-ASCII is allowed only with SMTPUTF8.
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_ATOM_U = r"(?:[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]|[^\x00-\x7f])+"
_QUOTED = r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*"'
_QUOTED_U = r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|[^\x00-\x7f]|\\[\x20-\x7e])*"'
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_LABEL_U = r"(?:[A-Za-z0-9]|[^\x00-\x7f])(?:(?:[A-Za-z0-9-]|[^\x00-\x7f])*(?:[A-Za-z0-9]|[^\x00-\x7f]))?"
_LITERAL = r"\[[\x21-\x5a\x5e-\x7e]+\]"


def _mailbox(atom: str, quoted: str, label: str) -> re.Pattern[str]:
    domain = rf"(?:{label}(?:\.{label})*|{_LITERAL})"
    route = rf"(?:@{domain}(?:,@{domain})*:)"
    return re.compile(
        rf"(?P<route>{route})?"
        rf"(?P<local>{atom}(?:\.{atom})*|{quoted})"
        rf"(?:@(?P<domain>{domain}))?\Z"
    )


_MAILBOX = _mailbox(_ATOM, _QUOTED, _LABEL)
_MAILBOX_UTF8 = _mailbox(_ATOM_U, _QUOTED_U, _LABEL_U)
_DOMAIN = re.compile(rf"(?:{_LABEL}(?:\.{_LABEL})*|{_LITERAL})\Z")
# Postfix's valid_hostname(): letters, digits, hyphens and underscores,
# not all digits (that would be an address), at most 255 octets.
_HOST_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_HOSTNAME = re.compile(rf"(?=.{{1,255}}\Z)(?=.*[A-Za-z_-]){_HOST_LABEL}(?:\.{_HOST_LABEL})*\.?\Z")
_KEYWORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*\Z")


class PathError(ValueError):
    """The argument of MAIL or RCPT is not RFC 5321 syntax."""


class ParamError(PathError):
    """A parameter after the path has no RFC 5321 keyword: ``token`` is
    the parameter as the client wrote it."""

    def __init__(self, token: str) -> None:
        super().__init__(f"bad parameter {token!r}")
        self.token = token


@dataclass(frozen=True, slots=True)
class Address:
    """An envelope address exactly as the client wrote it.

    :param local: the local part, still quoted if it was quoted.
    :param domain: the domain or address literal, ``""`` for ``<>`` and for
        RCPT's bare ``<Postmaster>``.
    :param route: an obsolete source route (``@a,@b:``) if one was given;
        RFC 5321 §3.3 says to ignore it, relay checks must not.
    """

    local: str
    domain: str = ""
    route: str = ""

    @property
    def is_null(self) -> bool:
        return not self.local and not self.domain

    @property
    def mailbox(self) -> str:
        """``local@domain`` without the route, as it appears in logs."""
        return f"{self.local}@{self.domain}" if self.domain else self.local

    @property
    def path(self) -> str:
        """The whole path as the client sent it, without angle brackets."""
        return self.route + self.mailbox

    @property
    def local_unquoted(self) -> str:
        """The local part with quoting and quoted-pairs removed.  Only a
        whole quoted string is unquoted: an unbalanced quote (which
        parse_path refuses) must not cost the character it ends with."""
        local = self.local
        if len(local) >= 2 and local[0] == '"' and local[-1] == '"' and not _ends_escaped(local[:-1]):
            return re.sub(r"\\(.)", r"\1", local[1:-1])
        return local

    def __str__(self) -> str:
        return self.mailbox


def _ends_escaped(text: str) -> bool:
    """Whether ``text`` ends in a backslash that quotes what follows."""
    return (len(text) - len(text.rstrip("\\"))) % 2 == 1


NULL = Address("")

Params = tuple[tuple[str, str | None], ...]


def parse_path(arg: str, keyword: str, *, utf8: bool = False) -> tuple[Address, Params, str]:
    """Split ``FROM:<path> PARAMS`` (or ``TO:``) into address and parameters.

    Returns the address, the parameters as ``(KEYWORD, value)`` pairs with
    the keyword upper-cased, and the parameter text exactly as sent so it can
    be forwarded unchanged.  Raises :class:`PathError` naming what is wrong.
    """
    head = arg[: len(keyword) + 1]
    if head.upper() != keyword + ":":
        raise PathError(f"expected {keyword}:")
    # Postfix accepts "FROM: <a@b>"; clients in the wild send it.
    rest = arg[len(keyword) + 1 :].lstrip(" ")
    if rest.startswith("<"):
        end = _closing_bracket(rest)
        inner, params_text = rest[1:end], rest[end + 1 :]
        if params_text and not params_text.startswith(" "):
            raise PathError("text after the address")
    else:
        # strict_rfc821_envelopes=no in Postfix: an address without brackets.
        inner, _, params_text = rest.partition(" ")
        if not inner:
            raise PathError("no address")
    params_text = params_text.strip(" ")
    if inner == "":
        if keyword == "TO":
            raise PathError("empty recipient")
        address = NULL
    else:
        address = _parse_mailbox(inner, keyword, utf8)
    return address, _parse_params(params_text), params_text


def _closing_bracket(text: str) -> int:
    """Index of the ``>`` that closes the path, skipping quoted strings."""
    end = text.find(">", 1)
    if end > 0 and text.find('"', 1, end) < 0:
        # No quoted string before the first ">": that one closes the path.
        # The common case, found without a loop over every character.
        return end
    quoted = False
    i = 1
    while i < len(text):
        c = text[i]
        if quoted:
            if c == "\\":
                i += 1
            elif c == '"':
                quoted = False
        elif c == '"':
            quoted = True
        elif c == ">":
            return i
        i += 1
    raise PathError("unterminated path")


#: Distinct mailboxes whose parse is kept (see _parse_mailbox).
MAILBOX_CACHE_SIZE = 1024


# A site sees the same senders and recipients over and over, and the
# mailbox pattern costs about 14,000 instructions an address (MAIL and
# RCPT of every message).  The parse depends only on the arguments and an
# Address is immutable, so one is shared; the least recently used is
# dropped past MAILBOX_CACHE_SIZE.  A refused address raises every time
# (lru_cache keeps no exception).
@functools.lru_cache(maxsize=MAILBOX_CACHE_SIZE)
def _parse_mailbox(inner: str, keyword: str, utf8: bool) -> Address:
    pattern = _MAILBOX_UTF8 if utf8 else _MAILBOX
    m = pattern.match(inner)
    if m is None:
        raise PathError("invalid address")
    domain = m["domain"] or ""
    if not domain:
        # Only RCPT TO:<Postmaster> may omit the domain (RFC 5321 §4.5.1).
        if keyword != "TO" or m["local"].lower() != "postmaster" or m["route"]:
            raise PathError("address without a domain")
    if len(m["local"]) > 64 * 4 or len(domain) > 255:
        raise PathError("address too long")
    return Address(m["local"], domain, (m["route"] or ""))


def _parse_params(text: str) -> Params:
    if not text:
        return ()
    out: list[tuple[str, str | None]] = []
    for token in text.split(" "):
        if not token:
            continue
        name, eq, value = token.partition("=")
        # A value is judged by the parameter it belongs to (as Postfix
        # does): an unknown parameter is refused whatever its value.
        if not _KEYWORD.match(name):
            raise ParamError(token)
        out.append((name.upper(), value if eq else None))
    return tuple(out)


def to_ascii_domain(name: str) -> str:
    """``name`` with its U-labels as A-labels, by IDNA2008 with UTS #46
    mapping (non-transitional: ``straße`` stays ``xn--strae-oqa``, where
    Python's IDNA2003 codec turns it into another domain, ``strasse``).
    Raises :class:`UnicodeError` for a name IDNA cannot convert."""
    if name.isascii():
        return name
    try:
        return idna.encode(name, uts46=True, transitional=False).decode("ascii")
    except idna.IDNAError as exc:
        raise UnicodeError(str(exc)) from exc


def is_domain(text: str) -> bool:
    """Whether ``text`` is a domain or address literal by RFC 5321 syntax."""
    return _DOMAIN.match(text) is not None


def may_be_ip(text: str) -> bool:
    """False when ``ipaddress.ip_address(text)`` cannot succeed: an IPv6
    address has a colon, an IPv4 one only ASCII digits and dots.  For host
    names, where its two failed parses, each raising and formatting an
    error, cost more than the check they are part of."""
    return ":" in text or not text.lstrip("0123456789.")


def is_hostname(text: str) -> bool:
    """Whether ``text`` is a host name as Postfix's XCLIENT takes it for
    ``NAME`` (no address literal, not all digits, at most 255 octets),
    but for a final dot: a DNS name may end in one, XCLIENT may not."""
    return _HOSTNAME.match(text) is not None


def client_address(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """A client's address as every check takes it: an IPv4-mapped one is
    the IPv4 client (what a dual-stack socket reports); a scoped one
    (``%eth0``) names no host outside a link, and no DNS list or next hop
    takes it (ValueError)."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.scope_id is not None:
            raise ValueError(f"scoped address {ip}")
        if ip.ipv4_mapped is not None:
            return ip.ipv4_mapped
    return ip
