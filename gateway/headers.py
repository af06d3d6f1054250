"""Small edits of a message's header section, on bytes.

The message is passed on byte for byte, so edits work on the raw header
block rather than on a parsed-and-regenerated email object.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

__all__ = ["prepend", "remove_fields", "claims_authserv_id"]


def prepend(raw: bytes, headers: Iterable[tuple[str, str]]) -> bytes:
    """``raw`` with ``Name: value`` fields put in front, in order."""
    block = b"".join(f"{k}: {v}\r\n".encode("utf-8", "surrogateescape") for k, v in headers)
    return block + raw if block else raw


def _header_end(raw: bytes) -> int:
    if raw.startswith(b"\r\n"):
        return 0
    end = raw.find(b"\r\n\r\n")
    return len(raw) if end < 0 else end + 2


def remove_fields(raw: bytes, name: str, keep: Callable[[bytes], bool]) -> bytes:
    """Drop the header fields called ``name`` for which ``keep(field)`` is
    false; ``field`` is the whole field, folding included.  Other fields and
    the body are untouched."""
    end = _header_end(raw)
    head = raw[:end]
    lowered = name.lower().encode() + b":"
    if lowered not in head.lower():
        return raw  # the common case: nothing to look at
    fields = re.split(rb"\r\n(?![ \t])", head)
    kept = [f for f in fields if not (f.lower().startswith(lowered) and not keep(f))]
    return b"\r\n".join(kept) + raw[end:] if len(kept) != len(fields) else raw


def claims_authserv_id(field: bytes, authserv_id: str) -> bool:
    """Whether an Authentication-Results field names ``authserv_id``
    (RFC 8601 §2.5: the first token after the colon, before ``;``)."""
    value = field.split(b":", 1)[1]
    value = re.sub(rb"\([^)]*\)", b" ", value)  # comments may come first
    first = value.split(b";", 1)[0].split()
    return bool(first) and first[0].decode("ascii", "replace").lower().rstrip(".") == authserv_id.lower().rstrip(".")
