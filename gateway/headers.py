"""Small edits of a message's header section, on bytes.

The message is passed on byte for byte, so edits work on the raw header
block rather than on a parsed-and-regenerated email object.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

__all__ = ["prepend", "field_value", "is_field_name", "remove_fields", "claims_authserv_id", "claims_receiver"]


#: RFC 5322 §3.6.8 field name: printable ASCII but the colon.
_FIELD_NAME = re.compile(r"[\x21-\x39\x3b-\x7e]+\Z")
#: A line break that does not fold (is not followed by a blank), or a lone CR.
_UNFOLDED = re.compile(r"\r?\n(?![ \t])|\r(?!\n)")


def is_field_name(name: object) -> bool:
    """Whether ``name`` can be written as a header field's name."""
    return isinstance(name, str) and _FIELD_NAME.match(name) is not None


def field_value(value: str) -> str:
    """``value`` safe as one header field's value: a line break that would
    start a field of its own (say, from a DNS TXT record or a plugin's
    result) becomes a fold, so no text can add a header line."""
    if "\n" not in value and "\r" not in value:
        return value
    flat = value.replace("\r\n\t", "").replace("\r\n ", "")
    if "\n" not in flat and "\r" not in flat:
        return value  # folded already (Authentication-Results): the common case
    return _UNFOLDED.sub("\r\n\t", value.rstrip("\r\n"))


#: RFC 5322 §2.1.1: a line MUST be at most 998 characters (CRLF aside);
#: a longer word than this is cut.
_LINE_MAX = 998
_WORD_MAX = 900


def _octets(text: str) -> int:
    return len(text.encode("utf-8", "surrogateescape"))


def _short_lines(field: str) -> str:
    """``field`` (``Name: value``, maybe folded) with every line within
    :data:`_LINE_MAX` octets: long lines folded at blanks, overlong words
    cut (a UTF-8 value counts in octets, RFC 6532 §3.4)."""
    out = []
    for line in field.split("\r\n"):
        if _octets(line) <= _LINE_MAX:
            out.append(line)
            continue
        lead = "" if not out else line[: len(line) - len(line.lstrip(" \t"))]
        current = ""
        for word in line.lstrip(" \t").split(" ") if out else line.split(" "):
            if _octets(word) > _WORD_MAX:
                word = word.encode("utf-8", "surrogateescape")[:_WORD_MAX].decode("utf-8", "ignore") + "..."
            if current and _octets(current) + 1 + _octets(word) > _LINE_MAX:
                out.append(current)
                current = (lead or " ") + word
            else:
                current = f"{current} {word}" if current else lead + word
        out.append(current)
    return "\r\n".join(out)


def prepend(raw: bytes, headers: Iterable[tuple[str, str]]) -> bytes:
    """``raw`` with ``Name: value`` fields put in front, in order.  Values
    go through :func:`field_value`, and no line is longer than RFC 5322
    allows (a plugin's long result folds, an overlong word is cut); a name
    that is not a field name is a programming error (ValueError), never
    written."""
    lines = []
    for name, value in headers:
        if not is_field_name(name):
            raise ValueError(f"not a header field name: {name!r}")
        field = f"{name}: {field_value(value)}\r\n".encode("utf-8", "surrogateescape")
        if len(field) > _LINE_MAX + 2:
            field = f"{_short_lines(field[:-2].decode('utf-8', 'surrogateescape'))}\r\n".encode("utf-8", "surrogateescape")
        lines.append(field)
    return b"".join(lines) + raw if lines else raw


def _header_end(raw: bytes) -> int:
    if raw.startswith(b"\r\n"):
        return 0
    end = raw.find(b"\r\n\r\n")
    return len(raw) if end < 0 else end + 2


def remove_fields(raw: bytes, names: str | tuple[str, ...], keep: Callable[[bytes], bool]) -> bytes:
    """Drop the header fields called one of ``names`` for which
    ``keep(field)`` is false; ``field`` is the whole field, folding
    included.  Other fields and the body are untouched."""
    end = _header_end(raw)
    head = raw[:end]
    wanted = [n.lower().encode() for n in ((names,) if isinstance(names, str) else names)]
    lowered_head = head.lower()
    if not any(n in lowered_head for n in wanted):
        return raw  # the common case: nothing to look at
    # "Name :" (blanks before the colon, RFC 5322 §4.5 obsolete syntax) is
    # still that field to Postfix and to most readers.
    named = re.compile(rb"(?:" + rb"|".join(re.escape(n) for n in wanted) + rb")[ \t]*:")
    fields = re.split(rb"\r\n(?![ \t])", head)
    kept = [f for f in fields if not (named.match(f.lower()) and not keep(f))]
    return b"\r\n".join(kept) + raw[end:] if len(kept) != len(fields) else raw


def _without_comments(text: str) -> str:
    """``text`` with RFC 5322 comments (nested, with quoted-pairs) replaced
    by a space; quoted strings are kept as they are."""
    out: list[str] = []
    depth = 0
    quoted = False
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "\\" and (depth or quoted):
            if quoted:
                out.append(text[i : i + 2])
            i += 2
            continue
        if quoted:
            out.append(ch)
            quoted = ch != '"'
        elif ch == "(":
            depth += 1
            if depth == 1:
                out.append(" ")
        elif ch == ")" and depth:
            depth -= 1
        elif not depth:
            out.append(ch)
            quoted = ch == '"'
        i += 1
    return "".join(out)


def claims_authserv_id(field: bytes, authserv_id: str) -> bool:
    """Whether an Authentication-Results field names ``authserv_id``
    (RFC 8601 §2.2: the first value after the colon, a token or a quoted
    string, comments allowed anywhere, nested too).  Case and a final dot
    do not matter: a lenient reader downstream must not see ours where we
    did not."""
    value = _without_comments(field.split(b":", 1)[1].decode("utf-8", "replace")).strip(" \t\r\n")
    if value.startswith('"'):
        end = value.find('"', 1)
        ident = re.sub(r"\\(.)", r"\1", value[1:end] if end > 0 else value[1:])
    else:
        ident = re.split(r"[\s;]", value, maxsplit=1)[0]
    return bool(ident) and ident.strip().lower().rstrip(".") == authserv_id.lower().rstrip(".")


#: RFC 7208 §9.1: ``receiver=`` names "the host name of the SPF verifier";
#: its value is a dot-atom or a quoted-string.
_RECEIVER = re.compile(r'(?:^|[;\s])receiver[ \t]*=[ \t]*("(?:[^"\\]|\\.)*"|[^;\s]*)', re.IGNORECASE)
#: The comment after the result, "(HOST: text)" in RFC 7208 §9.1's examples
#: and in what pyspf, Postfix's policy services and we write.
_COMMENT_HOST = re.compile(r"[ \t]*[A-Za-z]+[ \t]*\([ \t]*([^\s:()]+)[ \t]*:")


def _same_host(name: str, hostname: str) -> bool:
    return bool(name) and name.strip().lower().rstrip(".") == hostname.lower().rstrip(".")


def claims_receiver(field: bytes, hostname: str) -> bool:
    """Whether a Received-SPF field says ``hostname`` made the check: its
    ``receiver=`` (outside comments; quoted or not), or the host its first
    comment starts with (``pass (gw.example: domain of ...)``), which is
    what a reader shows.  Case and a final dot do not matter."""
    value = field.split(b":", 1)[1].decode("utf-8", "replace").replace("\r\n", "")
    comment = _COMMENT_HOST.match(value)
    if comment is not None and _same_host(comment[1], hostname):
        return True
    for match in _RECEIVER.finditer(_without_comments(value)):
        name = match[1]
        if name.startswith('"'):
            name = re.sub(r"\\(.)", r"\1", name[1:-1])
        if _same_host(name, hostname):
            return True
    return False
