"""What the built-in authentication plugins (spf, dkim, dmarc) share.

* **The header section, split once per message** (:func:`header_fields`), by
  one rule used for every decision about headers here: a field starts on a
  line that does not begin with a space or tab, continuation lines do, the
  section ends at the first empty line.  The author domains (every
  domain of every From field, :func:`author_domains`) and the presence of
  DKIM signatures come from this one split.
* **One Authentication-Results header per message** (RFC 8601).  The
  plugins of a stage run concurrently, so which of them writes it is fixed at
  start-up from the plugins the policy enables (``Context.plugins``):
  :func:`reporter` names ``dmarc`` if it is enabled, else ``dkim``, else
  ``spf``.  The writer puts every result it knows into that one header:
  dmarc reports spf, dkim and dmarc; dkim reports dkim and, if the spf
  plugin ran for this transaction, spf; spf reports spf.
* Forged headers (an ``Authentication-Results`` of the received message
  that claims our hostname, RFC 8601 §5) are removed by the core for every
  message, whichever plugins run.
* Small formatting helpers: :func:`fold`, :func:`comment`,
  :func:`domain_or_none`, :func:`bounded`.
* No line of a header built here is longer than 998 octets (RFC 5322
  §2.1.1): :func:`fold` breaks lines at spaces, and the one thing it cannot
  break, a value (a property of Authentication-Results, a key of
  Received-SPF), is cut by :func:`bounded` when it is longer than
  :data:`MAX_VALUE`, with a comment saying so.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from email import errors
from email.headerregistry import HeaderRegistry
from typing import Any, Generic, TypeVar

import authres

from gateway import Context, Message, StashKey
from gateway.address import to_ascii_domain

__all__ = [
    "AR_HEADER",
    "MAX_VALUE",
    "MEMO_MAX_CHARS",
    "MEMO_SIZE",
    "Author",
    "Authors",
    "Memo",
    "authentication_results",
    "author_domain",
    "author_domains",
    "authors_of",
    "bounded",
    "clause",
    "clause_text",
    "comment",
    "domain_or_none",
    "fold",
    "header_fields",
    "property_",
    "reporter",
]

AR_HEADER = "Authentication-Results"

# ----------------------------------------------------------- who reports

#: Who writes the one Authentication-Results header: the first enabled.
_REPORTER_ORDER = ("dmarc", "dkim", "spf")


def reporter(context: Context) -> str:
    """The method whose plugin writes the Authentication-Results header,
    from the plugins the policy enables (known before any is built)."""
    return next((m for m in _REPORTER_ORDER if m in context.plugins), "")


# ----------------------------------------------------------- header section

_FIELDS: StashKey[tuple[tuple[str, str], ...]] = StashKey()


def header_fields(message: Message | bytes) -> tuple[tuple[str, str], ...]:
    """The header section as ``(name, value)`` pairs, top to bottom.

    ``name`` as written (trailing blanks before the colon dropped, ``""``
    for a line without a colon); ``value`` unfolded (CRLFs removed) and
    decoded as UTF-8 with replacement.  For a :class:`~gateway.Message` the
    split is done once and kept on the message, so every plugin of the stage
    shares it.
    """
    if isinstance(message, Message):
        memo = message.stash.get(_FIELDS, None)
        if memo is None:
            memo = message.stash[_FIELDS] = _split(message.raw)
        return memo
    return _split(message)


def _split(raw: bytes) -> tuple[tuple[str, str], ...]:
    if raw.startswith(b"\r\n"):
        return ()  # an empty line first: no header section at all
    end = raw.find(b"\r\n\r\n")
    head = raw if end < 0 else raw[:end]
    lines: list[list[bytes]] = []
    for line in head.split(b"\r\n"):
        if line[:1] in (b" ", b"\t") and lines:
            lines[-1].append(line)
        else:
            lines.append([line])
    fields = []
    for parts in lines:
        whole = b"".join(parts).decode("utf-8", "replace")
        name, colon, value = whole.partition(":")
        fields.append((name.rstrip(" \t") if colon else "", value if colon else whole))
    return tuple(fields)


# ----------------------------------------------------------- author domain

_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_DOMAIN = re.compile(rf"{_LABEL}(?:\.{_LABEL})+\Z")


def domain_or_none(domain: str) -> str | None:
    """``domain`` as an ASCII DNS name in lower case without a final dot
    (U-labels converted to A-labels), or None if it is not a multi-label
    host name (address literals, one label, bad characters)."""
    domain = domain.strip().rstrip(".").lower()
    if not domain.isascii():
        try:
            domain = to_ascii_domain(domain)
        except UnicodeError:
            return None
    if len(domain) > 253 or not _DOMAIN.match(domain):
        return None
    return domain


@dataclass(frozen=True, slots=True)
class Author:
    """The RFC5322.From domain DMARC judges (RFC 7489 §3.1), or why there
    is none (``problem``)."""

    domain: str = ""
    problem: str = ""


_REGISTRY = HeaderRegistry()


_FROM_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_FROM_LOCAL = rf"{_FROM_ATEXT}(?:\.{_FROM_ATEXT})*"
_FROM_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_FROM_DOMAIN = rf"{_FROM_LABEL}(?:\.{_FROM_LABEL})*"
#: One address, nothing a reader could read two ways: no comments, no
#: commas, no second @, no escapes; an unquoted name of atext, dots and
#: spaces, or a quoted one without @, backslash or quote.
_SIMPLE_FROM = re.compile(
    rf"""[ \t]*(?:(?:"[^"\\@\r\n]*"|[A-Za-z0-9!#$%&'*+/=?^_`{{|}}~. -]*)[ \t]*"""
    rf"<{_FROM_LOCAL}@(?P<domain>{_FROM_DOMAIN})>|{_FROM_LOCAL}@(?P<bare_domain>{_FROM_DOMAIN}))[ \t]*\Z"
)


@dataclass(frozen=True, slots=True)
class Authors:
    """Every RFC5322.From domain of a message (RFC 7489 §6.6.1: each is an
    author domain), distinct, in order of appearance; and the first reason
    a From field gave no usable domain (``problem``), if any."""

    domains: tuple[str, ...] = ()
    problem: str = ""


#: The pieces of what follows an @ in a From field that cannot be read: a
#: domain some reader may show (an atom run takes dots along: a reader
#: shows the whole name).
_AT = re.compile("@")
_BLANKS = re.compile(r"\s+")
_ATOMS = re.compile(r"[^\s<>()\[\],;:\"@\\]+")
_QUOTED = re.compile(r'"((?:[^"\\]|\\.)*)"?', re.DOTALL)
_QUOTED_PAIR = re.compile(r"\\(.)", re.DOTALL)
_IN_COMMENT = re.compile(r"[\\()]")


def _comment_end(value: str, start: int, ends: dict[int, int]) -> int:
    """The index after the comment that opens at ``value[start]``, nested
    comments and quoted-pairs included; ``len(value)`` if it never closes.
    The end of every comment met is kept in ``ends``, so a field full of
    "@(" is read once, not once per @."""
    opened = [start]
    i = start + 1
    while opened:
        special = _IN_COMMENT.search(value, i)
        if special is None:
            break
        i = special.start()
        if value[i] == "\\":
            i += 2
        elif value[i] == ")":
            i += 1
            ends[opened.pop()] = i
        elif i in ends:  # a comment read before, for another @
            i = ends[i]
        else:
            opened.append(i)
            i += 1
    for unclosed in opened:
        ends[unclosed] = len(value)
    return ends[start]


def _skip_cfws(value: str, i: int, ends: dict[int, int]) -> int:
    """The index after the blanks and comments (RFC 5322 CFWS) at ``i``."""
    while True:
        blanks = _BLANKS.match(value, i)
        i = blanks.end() if blanks else i
        if not value.startswith("(", i):
            return i
        i = ends[i] if i in ends else _comment_end(value, i, ends)


def _after_at(value: str, at: int, ends: dict[int, int]) -> list[str]:
    """What a reader may show as the domain after the @ at ``value[at]``.

    RFC 5322 allows comments and blanks around a domain (§3.2.2) and readers
    drop them, so ``ceo@(x) auth.test`` shows ``auth.test``; a quoted string
    there is shown by its content.  An obsolete domain with blanks or
    comments around its dots (§4.4, ``auth (x) .test``) is given whole, and
    by its first part, which a reader that does not join them shows.
    """
    i = _skip_cfws(value, at + 1, ends)
    quoted = _QUOTED.match(value, i)
    if quoted is not None:
        return [_QUOTED_PAIR.sub(r"\1", quoted[1])]
    atoms: list[str] = []
    while (atom := _ATOMS.match(value, i)) is not None:
        atoms.append(atom[0])
        i = _skip_cfws(value, atom.end(), ends)
        if not (atom[0].endswith(".") or value.startswith(".", i)):
            break
    return atoms[:1] + ["".join(atoms)] if len(atoms) > 1 else atoms


def _candidates(value: str) -> tuple[str, ...]:
    """Every domain a reader might take from an unreadable From field: what
    follows each @ in it, wherever that @ is (in a comment or a quoted
    string too)."""
    ends: dict[int, int] = {}  # shared by every @: see _comment_end
    found = (domain_or_none(text) for at in _AT.finditer(value) for text in _after_at(value, at.start(), ends))
    return tuple(dict.fromkeys(d for d in found if d is not None))


#: Characters of From fields per message given to the stdlib's address
#: parser, whose time grows with the square of a field's length (a From
#: of 20,000 addresses, 340 KB: 11 s; an unclosed comment of 1.6 MB: 118 s,
#: in the event loop).  Fields beyond it are read as unreadable ones are,
#: every domain after an @ counting, which takes time in proportion.
MAX_PARSED_FROM = 4096


def _from_field(value: str, budget: int = MAX_PARSED_FROM) -> tuple[tuple[str | None, ...], str]:
    """The domain of each address of one From field (None where an address
    has no usable one), or, with a ``problem``, when the field cannot be
    read without a guess, every domain after an @ in it (the candidates a
    reader might show, so invalid syntax cannot hide a domain).  A field
    longer than ``budget`` that is not one plain address is not parsed:
    its candidates are given, with a problem."""
    simple = _SIMPLE_FROM.match(value)
    if simple is not None:
        # The common, unambiguous shapes ("Name <a@b>", "<a@b>", "a@b"),
        # without the stdlib parser, which cost a few percent of a message.
        return (domain_or_none(simple["domain"] or simple["bare_domain"]),), ""
    if len(value) > budget:
        return _candidates(value), f"From header fields over {MAX_PARSED_FROM} characters"
    try:
        header = _REGISTRY("from", value)
    except Exception:  # noqa: BLE001 - the stdlib parser has raised more than HeaderParseError on junk
        return _candidates(value), "unparseable From header field"
    if any(not isinstance(d, errors.ObsoleteHeaderDefect) for d in header.defects):
        # Invalid syntax is where readers disagree: "a@b.test <c@d.test>" is
        # b.test to Python and may be d.test to a mail reader.  Judge both.
        return _candidates(value), "invalid From header field"
    addresses = header.addresses  # type: ignore[attr-defined]  # an AddressHeader
    return tuple(domain_or_none(a.domain) for a in addresses), ""


def author_domain(fields: Sequence[tuple[str, str]]) -> Author:
    """The domain of the one address in the one From field.

    No From field, several From fields, several addresses or a From
    without a usable domain leave no author domain: that is a ``problem``,
    never a guess at one of the candidates.  (The plugins judge every From
    domain: :func:`author_domains`.)
    """
    values = [value for name, value in fields if name.lower() == "from"]
    if not values:
        return Author(problem="no From header field")
    if len(values) > 1:
        return Author(problem=f"{len(values)} From header fields")
    domains, problem = _from_field(values[0])
    if problem:
        return Author(problem=problem)
    if len(domains) != 1:
        return Author(problem=f"{len(domains)} addresses in From")
    if domains[0] is None:
        return Author(problem="no usable domain in From")
    return Author(domains[0])


def author_domains(fields: Sequence[tuple[str, str]]) -> Authors:
    """Every domain of every address of every From field (RFC 7489 §6.6.1:
    a message with several is checked with each as the author domain).

    A From field that cannot be read without a guess (invalid syntax), a
    group without addresses, an address without a usable domain, or no
    From field at all is a ``problem``; the domains of the other fields
    and addresses are still given, and of an unreadable field every domain
    after an @ in it, so invalid syntax never hides a domain a reader
    might show.
    """
    values = [value for name, value in fields if name.lower() == "from"]
    if not values:
        return Authors(problem="no From header field")
    domains: dict[str, None] = {}  # distinct, in order
    problem = ""
    budget = MAX_PARSED_FROM
    for value in values:
        found, trouble = _from_field(value, budget)
        budget -= len(value)
        if not trouble and not found:
            trouble = "0 addresses in From"
        elif not trouble and None in found:
            trouble = "no usable domain in From"
        problem = problem or trouble
        domains.update((d, None) for d in found if d is not None)
    return Authors(tuple(domains), problem)


_AUTHORS: StashKey[Authors] = StashKey()


def authors_of(message: Message) -> Authors:
    """:func:`author_domains` of ``message``, found once and kept on it
    for the other plugins of the stage (dkim and dmarc both ask)."""
    memo = message.stash.get(_AUTHORS, None)
    if memo is None:
        memo = message.stash[_AUTHORS] = author_domains(header_fields(message))
    return memo


# ----------------------------------------------------------- formatting

_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")


def comment(text: str) -> str:
    """``text`` safe inside an RFC 5322 comment: one line, single spaces,
    parentheses and backslashes replaced, at most 200 characters."""
    text = _CONTROL.sub(" ", text).replace("\\", "/").replace("(", "[").replace(")", "]")
    text = " ".join(text.split())
    return text[:197] + "..." if len(text) > 200 else text


#: The longest value written into a header built here.  A value is one
#: token, which folding cannot break, and with its key and quoting it must
#: fit a line of 998 octets.  It is longer than any domain (253) or mailbox
#: (254) SMTP allows (RFC 5321 §4.5.3.1), so a value cut to it is never
#: taken for one; only a long HELO, MAIL FROM or DKIM tag is cut.
MAX_VALUE = 256


def bounded(value: str) -> tuple[str, str]:
    """``value`` and ``""``; or, for one longer than :data:`MAX_VALUE`, its
    first :data:`MAX_VALUE` characters and the text of a comment to put
    after it, saying that it was cut."""
    if len(value) <= MAX_VALUE:
        return value, ""
    return value[:MAX_VALUE], f"cut from {len(value)} characters"


#: A pvalue authres may write bare: ``[local-part "@"] domain-name`` with a
#: dot-atom local part (RFC 8601 §2.2).
_BARE_ADDRESS = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]*@[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?")


class _Value(authres.core.QuotableValue):  # type: ignore[misc]  # authres is untyped
    """authres writes any value holding an "@" bare, so a HELO name of
    ``x;dkim=pass@auth.test`` made a clause of its own in our header; a
    value that is no address is quoted here."""

    def quote_if_needed(self) -> str:
        # authres's own test follows, with its patterns compiled once: it
        # builds and looks one up for every value it writes.
        if "@" in self:
            if _BARE_ADDRESS.fullmatch(self):
                return str(self)
            return '"%s"' % self.replace("\\", "\\\\").replace('"', '\\"')
        if _TOKEN.match(self):
            return str(self)
        return '"%s"' % _QUOTE_SPECIAL.sub(r"\\\1", self)


_TOKEN = re.compile(r"^%s$" % authres.core.RFC2045_TOKEN_PATTERN)
_QUOTE_SPECIAL = re.compile(r'(["\\])')


def property_(ptype: str, name: str, value: str) -> authres.AuthenticationResultProperty:
    """An A-R property (``header.d=example.com``), quoted where it is no
    token or address; a value too long for a header line is cut
    (:func:`bounded`), with a comment after it."""
    value, cut = bounded(value)
    prop = authres.AuthenticationResultProperty(ptype, name, value, cut or None)
    if value:
        prop.value = _Value(value)
    return prop


def clause(method: str, result: str, note: str = "", properties: Sequence[Any] = ()) -> Any:
    """One result clause (``dkim=pass (note) header.d=example.com``)."""
    return authres.AuthenticationResult(
        method, result=result, result_comment=comment(note) or None, properties=list(properties)
    )


K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

#: Values a :class:`Memo` keeps.
MEMO_SIZE = 1024
#: A key longer than this in all is not kept (its value is made every
#: time): its values come from the client and the DNS (a HELO, an SPF
#: explanation, a DKIM tag), and 1,024 of them must stay small.
MEMO_MAX_CHARS = 1024


class Memo(Generic[K, V]):
    """``make(key)``, kept per distinct key: a busy sender gets the same
    spf, dkim and dmarc results message after message, and formatting them
    (clause texts, replies) cost more per message than deciding.  ``make``
    must depend on nothing but the key; ``chars`` gives the key's size.  At
    most ``size`` values are kept, the oldest dropped first."""

    def __init__(self, make: Callable[[K], V], chars: Callable[[K], int], size: int = MEMO_SIZE) -> None:
        self._make = make
        self._chars = chars
        self.size = size
        self._values: dict[K, V] = {}

    def __call__(self, key: K) -> V:
        try:
            return self._values[key]
        except KeyError:
            pass
        value = self._make(key)
        if self._chars(key) <= MEMO_MAX_CHARS and self.size > 0:
            if len(self._values) >= self.size:
                del self._values[next(iter(self._values))]
            self._values[key] = value
        return value

    def __len__(self) -> int:
        return len(self._values)


def clause_text(make: Callable[[K], Any]) -> Callable[[K], str]:
    """``make`` (an authres result object for a key), as its text."""
    return lambda key: str(make(key))


def authentication_results(authserv_id: str, results: Sequence[Any]) -> tuple[str, str]:
    """The ``(name, value)`` of one Authentication-Results header carrying
    ``results`` (authres result objects, or their texts), folded."""
    header = authres.AuthenticationResultsHeader(authserv_id=authserv_id, results=list(results) or None)
    return AR_HEADER, fold(AR_HEADER, header.header_value())


def fold(name: str, value: str, width: int = 78) -> str:
    """``value`` for a header field ``name``, folded (RFC 5322 §2.2.3) by
    putting CRLF before spaces so lines stay within ``width`` where a space
    allows.  Unfolding gives ``value`` back.  ``value`` must be one line
    with single spaces and no word longer than about 900 characters
    (everything built here is: :func:`comment`, :func:`bounded`)."""
    words = value.split(" ")
    out = [words[0]]
    length = len(name) + 2 + len(words[0])
    for word in words[1:]:
        if length + 1 + len(word) > width and word:
            out.append("\r\n " + word)
            length = 1 + len(word)
        else:
            out.append(" " + word)
            length += 1 + len(word)
    return "".join(out)
