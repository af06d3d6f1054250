"""DKIM (RFC 6376): verify every signature of the message at end of DATA.

Each ``DKIM-Signature`` field (up to :data:`MAX_SIGNATURES`, topmost first)
is verified with dkimpy, its key fetched through the gateway's shared
resolver (:func:`gateway.dns.dkim_dnsfunc`, so keys are cached by their
TTL; a ``d=`` in U-labels is asked and compared in A-labels, RFC 8616) and
parsed once per distinct key record (:func:`_parse_key`).  The
verification of one message runs once, whoever asks first, and the
``dkim`` and ``dmarc`` plugins share its results (:func:`dkim_results`):
at once when every key was cached, else through one future both await.

Per signature the result is an RFC 8601 ``dkim=`` result: ``pass``,
``fail`` (the signature or body hash does not verify), ``neutral`` (the
signature field is unusable: syntax, missing tags, expired),
``permerror`` (no key, a revoked or malformed key, a key too small or
too costly to use, a key whose ``h=`` does not allow the signature's
hash or whose ``t=s`` forbids its ``i=``, or ``h=`` without From, RFC
6376 §6.1.1),
``temperror`` (the key lookup failed); one that did not pass under a key
flagged ``t=y`` is ``neutral`` and counts as no signature (RFC 6376
§3.6.1).  The message's finding is ``pass``
(a signature passed), ``fail``, ``temperror``, ``permerror`` or ``none``
(no signature) -- and ``required`` / ``required_temperror`` when a
From domain (of any address of any From field) is in ``required_domains``
and no passing signature of that domain was found.

Clients in ``trusted_networks`` are not checked.
"""

from __future__ import annotations

import asyncio
import binascii
import functools
import logging
import operator
import re
import types
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import authres
import dkim
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from dkim.util import DuplicateTag, InvalidTagSpec

from gateway import (
    Context,
    Envelope,
    Message,
    Plugin,
    Reply,
    Session,
    StashKey,
    Verdict,
    hookimpl,
    then,
)
from gateway.actions import ActionOptions, ActionSpec, check_actions, decide
from gateway.address import is_domain, to_ascii_domain
from gateway.dns import DkimDnsFunc, Resolver, dkim_dnsfunc, dkim_key_record

from . import _authresults as ar
from . import spf

__all__ = [
    "DEFAULT_ACTIONS",
    "DKIM_NOT_AUTHOR",
    "DKIM_NO_PASS",
    "DKIM_REJECTED",
    "DKIM_REQUIRED_TEMP",
    "FINDINGS",
    "FROM_NOT_SIGNED",
    "MAX_EXPONENT_BITS",
    "MAX_KEY_BITS",
    "MAX_SIGNATURES",
    "MIN_KEY_BITS",
    "DkimPlugin",
    "DkimResult",
    "ar_results",
    "ar_texts",
    "dkim_decision",
    "dkim_results",
    "required_domain",
    "verify_message",
]

FINDINGS = ("pass", "fail", "none", "temperror", "permerror", "required", "required_temperror")
DEFAULT_ACTIONS: Mapping[str, ActionSpec] = {"required": "reject", "required_temperror": "defer"}
#: Signatures verified per message; more are ignored (each costs a DNS
#: question and an RSA operation, and a sender needs one or two).
MAX_SIGNATURES = 8
#: Smaller RSA keys are ``permerror`` (RFC 8301 §3.2: at least 1024 bits).
MIN_KEY_BITS = 1024
#: Larger RSA keys are ``permerror`` too.  RFC 8301 §3.1 asks verifiers for
#: up to 4096 bits; the key's owner chooses its size, and the cost of a
#: verification grows with it.
MAX_KEY_BITS = 8192
#: A larger public exponent is ``permerror``: OpenSSL takes none over 64
#: bits for keys over 3072 bits, and one it refuses would be left to
#: dkimpy's pow() in Python, which with an exponent as long as the key
#: (a 20000-bit key: 20 s) holds the event loop of every session.
MAX_EXPONENT_BITS = 64
#: The reason of a signature whose ``h=`` leaves out From (RFC 6376 §6.1.1:
#: "PERMFAIL (From field not signed)").
FROM_NOT_SIGNED = "From field not signed"
#: Messages larger than this (bytes) are parsed and hashed in a worker thread.
BIG_MESSAGE = 512 * 1024

# Replies (RFC 7372 §3.1 codes and sample texts).
DKIM_NO_PASS = Reply(550, "5.7.20", "No passing DKIM signature found for {domain}")
DKIM_NOT_AUTHOR = Reply(550, "5.7.22", "No valid author-matched DKIM signature found for {domain}")
DKIM_REQUIRED_TEMP = Reply(451, "4.7.20", "No passing DKIM signature found for {domain}: DNS error, try again later")
#: For a policy that refuses on a finding DKIM has no code for (``pass``).
DKIM_REJECTED = Reply(550, "5.7.1", "Message rejected: DKIM {finding}")

T = TypeVar("T")
#: A parsed public key, as dkimpy's ``evaluate_pk`` returns it.
Key = tuple[Any, int, bytes, bool]

_DKIMPY_RSA_VERIFY = dkim.RSASSA_PKCS1_v1_5_verify
_HASHES = {"sha256": hashes.SHA256, "sha1": hashes.SHA1}


@functools.lru_cache(maxsize=1024)
def _openssl_key(modulus: int, exponent: int) -> rsa.RSAPublicKey:
    return rsa.RSAPublicNumbers(exponent, modulus).public_key()


def _rsa_verify(digest: Any, signature: bytes, public_key: Mapping[str, int]) -> bool:
    """dkimpy's RSASSA-PKCS1-v1_5 verification, done by OpenSSL.

    dkimpy does the RSA arithmetic in Python (``pow`` on 2048-bit integers
    and byte-by-byte conversions): about a third of a DKIM verification, and
    the largest single cost per message with every check on.  The result is
    the same: a signature verifies exactly when dkimpy's own check passes
    (tests/test_dkim.py compares both).  Anything OpenSSL will not take (an
    odd key, a digest too large for the key) goes to dkimpy's own code, so
    its errors and results stay what they were.
    """
    algorithm = _HASHES.get(digest.name.lower())
    modulus, exponent = public_key["modulus"], public_key["publicExponent"]
    size = (modulus.bit_length() + 7) // 8
    if algorithm is None or len(signature) > size:
        return _DKIMPY_RSA_VERIFY(digest, signature, public_key)  # type: ignore[no-any-return]
    try:
        key = _openssl_key(modulus, exponent)
        key.verify(signature.rjust(size, b"\0"), digest.digest(), padding.PKCS1v15(), Prehashed(algorithm()))
    except InvalidSignature:
        return False
    except (ValueError, TypeError, UnsupportedAlgorithm):
        return _DKIMPY_RSA_VERIFY(digest, signature, public_key)  # type: ignore[no-any-return]
    return True


dkim.RSASSA_PKCS1_v1_5_verify = _rsa_verify

# dkimpy's message parsing and relaxed canonicalisation run regular
# expressions over the whole message with every verification: it splits
# the body into lines only to join them again, and rewrites every single
# space as a space.  The functions below give byte-for-byte the same
# results (tests/test_dkim.py compares them with dkimpy's on crafted and
# random input) and skip the work when the input shows it is not needed.
# They would be worth offering to dkimpy itself.

_DKIMPY_RE_BTAG = dkim.RE_BTAG
#: dkimpy's pattern for the b= value of the signature field, whose folding
#: whitespace (``FWS``, nested optional groups before every base64 character)
#: makes the matcher backtrack at each one: about 44 us a signature, against
#: 5 us for this equivalent.  FWS matches exactly the runs of whitespace, so
#: "FWS before each character" is "a run of whitespace and base64 that ends
#: in base64".  The pattern starts at the "b" and looks behind it for the
#: ";" or blank: a first byte to look for, so the matcher is started at
#: each "b" of the field rather than at each byte (45,000 instructions a
#: signature before, 30,000 after).  The removed text is the same: the
#: byte before a match is never the last of the match before it.
_BTAG_PATTERN = re.compile(rb"(b(?<=[;\s]b)\s*=)(?:[\sa-zA-Z0-9+/=]*[a-zA-Z0-9+/=])?(?:\r?\n\Z)?")


class _BTag:
    """dkimpy's ``RE_BTAG``, which it only ever uses as ``sub(b"\\1",
    value)``.  A template is expanded for each match by a Python function
    the stdlib makes afresh for each call (another 15,000 instructions a
    signature); ``itemgetter(1)`` gives the same group in C."""

    pattern = _BTAG_PATTERN.pattern

    @staticmethod
    def sub(repl: Any, string: bytes, count: int = 0) -> bytes:
        return _BTAG_PATTERN.sub(_FIRST_GROUP if repl == b"\\1" else repl, string, count)


_FIRST_GROUP = operator.itemgetter(1)
_RE_BTAG = _BTag()
_DKIMPY_RFC822_PARSE = dkim.rfc822_parse
_DKIMPY_SELECT_HEADERS = dkim.select_headers
_DKIMPY_STRIP_TRAILING = dkim.canonicalization.strip_trailing_whitespace
_DKIMPY_COMPRESS = dkim.canonicalization.compress_whitespace
_DKIMPY_UNFOLD = dkim.canonicalization.unfold_header_value
_DKIMPY_PARSE_TAG_VALUE = dkim.parse_tag_value
_FIELD_NAME = re.compile(rb"([\x21-\x7e]+?):")
_TRAILING_WSP = re.compile(rb"[\t ]+\r\n")
#: Runs of WSP other than a lone space: the only ones compressing changes.
_WSP_RUN = re.compile(rb"\t[\t ]*| [\t ]+")


def _rfc822_parse(message: bytes, crlf: bool = False) -> tuple[list[list[bytes]], bytes]:
    """dkimpy's ``rfc822_parse`` without splitting the body into lines.

    When every line ends in CRLF (what the SMTP front passes on), the body
    dkimpy would rebuild is the bytes after the first empty line, and the
    header part parses exactly as before; anything else goes to dkimpy.
    ``crlf``: the caller knows that every line does (a :class:`Message`),
    which spares two scans of the message.
    """
    end = message.find(b"\r\n\r\n")
    if end < 0 or message.startswith(b"\r\n") or not crlf and message.count(b"\n") != message.count(b"\r\n"):
        return _DKIMPY_RFC822_PARSE(message)  # type: ignore[no-any-return]
    # dkimpy's loop over the header lines; its re.split(b"\r?\n") tries a
    # match at every byte, where every line here ends in CRLF.
    headers: list[list[bytes]] = []
    for line in message[:end].split(b"\r\n"):
        if line[:1] in (b"\t", b" "):
            headers[-1][1] += line + b"\r\n"
        elif (name := _FIELD_NAME.match(line)) is not None:
            headers.append([name[1], line[name.end() :] + b"\r\n"])
        elif not line.startswith(b"From "):
            raise dkim.MessageFormatError(f"Unexpected characters in RFC822 header: {line!r}")
    return headers, message[end + 4 :]


def _unfold_header_value(content: bytes) -> bytes:
    # dkimpy's re.sub(b"\r?\n", b"", ...) has no fixed first byte, so it
    # tries a match at every byte of every field; this removes the same.
    if content.find(b"\n") < 0:  # not `in`: see _compress_whitespace
        return content
    return content.replace(b"\r\n", b"").replace(b"\n", b"")


def _parse_tag_value(tag_list: bytes) -> dict[bytes, bytes]:
    """dkimpy's ``parse_tag_value`` (RFC 6376 §3.2), whose check of each
    tag name, a module-level ``re.match`` of ``^[a-zA-Z]`` and word
    characters, asks only for a first byte that is an ASCII letter: a dozen
    pattern look-ups per signature."""
    tags: dict[bytes, bytes] = {}
    tag_specs = tag_list.strip().split(b";")
    if not tag_specs[-1]:  # trailing semicolons are valid
        tag_specs.pop()
    for tag_spec in tag_specs:
        key, equals, value = tag_spec.partition(b"=")
        key = key.strip()
        if not equals or not key[:1].isalpha():
            raise InvalidTagSpec(tag_spec)
        if key in tags:
            raise DuplicateTag(key)
        tags[key] = value.strip()
    return tags


def _select_headers(headers: Sequence[tuple[bytes, bytes]], include_headers: Sequence[bytes]) -> list[tuple[bytes, bytes]]:
    """dkimpy's ``select_headers`` without its scan of the header section
    for every name in ``h=``: a signature naming 30,000 absent fields over
    30,000 fields cost dkimpy 95 s, before the signature was even checked.
    Each name takes its fields from the bottom up, one per mention, as
    dkimpy's does (RFC 6376 §5.4.2)."""
    below: dict[bytes, list[int]] = {}
    for index, (name, _) in enumerate(headers):
        below.setdefault(name.lower(), []).append(index)
    selected = []
    for name in include_headers:
        assert name == name.lower()
        indexes = below.get(name)
        if indexes:
            selected.append(headers[indexes.pop()])
    return selected


def _strip_trailing_whitespace(content: bytes) -> bytes:
    if content.find(b" \r\n") < 0 and content.find(b"\t\r\n") < 0:
        return content
    return _TRAILING_WSP.sub(b"\r\n", content)


def _compress_whitespace(content: bytes) -> bytes:
    # bytes.find(), not `in`: Python 3.11's bytes.__contains__ first tries
    # its operand as an integer, and formats and clears a TypeError for
    # every bytes operand -- dearer than the search, run for every header
    # field of every message.
    if content.find(b"\t") < 0 and content.find(b"  ") < 0:
        return content
    return _WSP_RUN.sub(b" ", content)


#: The pattern of dkimpy's whitespace removal (see _sub).
_WHITESPACE = rb"\s+"


def _sub(pattern: Any, repl: Any, string: Any, count: int = 0, flags: int = 0) -> Any:
    """``re.sub`` as dkimpy's module calls it, but for one use.

    dkimpy takes the whitespace out of the b= and bh= values with
    ``re.sub(br"\\s+", b"", value)``, each twice per signature.  The
    pattern has no first byte to look for, so the matcher is started at
    every byte: about 68,000 instructions for the b= value of a 2048-bit
    key, against 5,000 for ``bytes.split``, which splits at the same six
    ASCII whitespace bytes that ``\\s`` matches in a bytes pattern
    (tests/test_dkim.py compares them).
    """
    if type(pattern) is bytes and pattern == _WHITESPACE and repl == b"" and type(string) is bytes and not (count or flags):
        return b"".join(string.split())
    return re.sub(pattern, repl, string, count, flags)


#: The ``re`` module as dkimpy's module sees it: the same functions, but
#: ``sub`` (the stdlib's own ``re`` is left alone for everyone else).
_DKIMPY_RE = types.ModuleType(re.__name__, re.__doc__)
_DKIMPY_RE.__dict__.update({k: v for k, v in vars(re).items() if not k.startswith("__")})
_DKIMPY_RE.sub = _sub  # type: ignore[attr-defined]
dkim.re = _DKIMPY_RE
dkim.rfc822_parse = _rfc822_parse
dkim.select_headers = _select_headers
dkim.parse_tag_value = _parse_tag_value
dkim.RE_BTAG = _RE_BTAG
dkim.canonicalization.strip_trailing_whitespace = _strip_trailing_whitespace
dkim.canonicalization.compress_whitespace = _compress_whitespace
dkim.canonicalization.unfold_header_value = _unfold_header_value

_log = logging.getLogger("smtpgate.plugin.dkim.dkimpy")
_log.addHandler(logging.NullHandler())
_log.propagate = False  # dkimpy logs every verification at debug/error level


@dataclass(frozen=True, slots=True)
class DkimResult:
    """One signature's result, with the tags Authentication-Results reports
    (``header.d``, ``header.s``, ``header.i``, ``header.a``, ``header.b``)."""

    result: str
    domain: str = ""
    selector: str = ""
    identity: str = ""
    algorithm: str = ""
    b: str = ""
    reason: str = ""
    #: The signature did not pass under a key flagged ``t=y``: reported, but
    #: counted as no signature at all (:func:`_in_testing`).
    testing: bool = False


# ------------------------------------------------------------------ verifying


@functools.lru_cache(maxsize=1024)
def _parse_key(record: bytes) -> Key:
    """A key record parsed once (dkimpy's ``evaluate_pk``): the resolver
    caches the record, this caches the parsed key.  An RSA key larger than
    :data:`MAX_KEY_BITS` or with an exponent over :data:`MAX_EXPONENT_BITS`
    is refused (``KeyFormatError``): the sender of the message publishes the
    key, and dkimpy checks only that it is not too small."""
    key: Key = dkim.evaluate_pk(b"", record)
    pk, keysize, ktag, _ = key
    if ktag == b"rsa":
        if keysize > MAX_KEY_BITS:
            raise dkim.KeyFormatError(f"public key too large: {keysize} bits")
        if pk["publicExponent"].bit_length() > MAX_EXPONENT_BITS:
            raise dkim.KeyFormatError(f"public exponent too large: {pk['publicExponent'].bit_length()} bits")
    return key


def _tag(sig: Mapping[bytes, bytes], name: bytes) -> str:
    return sig.get(name, b"").decode("ascii", "replace")


def _name_tag(sig: Mapping[bytes, bytes], name: bytes) -> str:
    """``d=`` or ``s=`` as an ASCII DNS name.  RFC 8616 §4: in an SMTPUTF8
    message they may be U-labels (UTF-8), which are looked up, and compared
    with the From domain, as A-labels; one IDNA cannot convert stays as it
    is (its key is then not found)."""
    value = sig.get(name, b"")
    if value.isascii():
        return value.decode("ascii")
    text = value.decode("utf-8", "replace")
    try:
        return to_ascii_domain(text)
    except UnicodeError:
        return text


def _described(result: str, sig: Mapping[bytes, bytes], reason: str = "") -> DkimResult:
    return DkimResult(
        result,
        domain=_name_tag(sig, b"d").lower(),
        selector=_name_tag(sig, b"s"),
        identity=_tag(sig, b"i"),
        algorithm=_tag(sig, b"a").lower(),
        b="".join(_tag(sig, b"b").split())[:8],  # str.split() splits at what r"\s" matches
        reason=reason,
    )


def _key_name(sig: Mapping[bytes, bytes]) -> bytes:
    selector, domain = sig[b"s"], sig[b"d"]
    if not (selector.isascii() and domain.isascii()):  # U-labels: see _name_tag
        selector, domain = _name_tag(sig, b"s").encode(), _name_tag(sig, b"d").encode()
    return selector + b"._domainkey." + domain + b"."


@functools.lru_cache(maxsize=1024)
def _key_limits(record: bytes) -> tuple[frozenset[bytes] | None, bool, bool]:
    """What a key record restricts its use to (RFC 6376 §3.6.1), tags
    dkimpy does not read: the hash algorithms it allows (``h=``, None for
    any), whether its ``t=`` has the flag ``s`` (no ``i=`` below ``d=``)
    and the flag ``y`` (the domain is testing DKIM).  Called only for a
    record :func:`_parse_key` took, so its tag list parses."""
    tags = _parse_tag_value(record)
    allowed = tags.get(b"h")
    hashes = None if allowed is None else frozenset(name.strip().lower() for name in allowed.split(b":"))
    flags = {flag.strip().lower() for flag in tags.get(b"t", b"").split(b":")}
    return hashes, b"s" in flags, b"y" in flags


def _in_testing(result: DkimResult) -> DkimResult:
    """A result other than ``pass`` under a key flagged ``t=y``.

    §3.6.1: verifiers MUST NOT treat mail from a signer in testing mode
    differently from unsigned mail, "even should the signature fail to
    verify".  So it is no ``fail`` or ``permerror`` a policy (or a filter
    downstream reading ``dkim=fail``) could punish: RFC 8601's ``neutral``,
    the result for a signature that gave no conclusion, with what went
    wrong in the comment for the signer who is testing.  A pass stays a
    pass: it proves the same under any key.
    """
    return DkimResult(
        "neutral", result.domain, result.selector, result.identity, result.algorithm, result.b,
        f"testing key t=y, {result.result}: {result.reason}", testing=True,
    )


def _key_from(sig: Mapping[bytes, bytes], record: bytes | None | dkim.DnsTimeoutError) -> tuple[Key, bool] | DkimResult:
    """The signature's public key from its key record (or the failed
    lookup), with whether the key is flagged ``t=y``; or the result that
    ends its verification."""
    if isinstance(record, dkim.DnsTimeoutError):
        return _described("temperror", sig, f"key lookup failed: {record}")
    if not record:
        return _described("permerror", sig, "no key for signature")
    try:
        key = _parse_key(record)
    except (dkim.DKIMException, binascii.Error, ValueError, TypeError, KeyError, IndexError) as exc:
        return _described("permerror", sig, f"unusable key: {exc}")
    hashes, strict, testing = _key_limits(record)
    refused = None
    if hashes is not None and sig[b"a"].rpartition(b"-")[2].lower() not in hashes:
        # §6.1.2: the verifier MUST ignore the key and return PERMFAIL
        # (inappropriate hash algorithm): a key published for sha256 only
        # must not vouch for a signature made with a weaker hash.
        allowed = b":".join(sorted(hashes)).decode("ascii", "replace")
        refused = _described("permerror", sig, f"inappropriate hash algorithm: the key allows h={allowed}")
    elif strict and b"i" in sig and sig[b"i"].rpartition(b"@")[2].lower() != sig[b"d"].lower():
        # t=s: the i= domain MUST be d= itself, not a subdomain of it.
        refused = _described("permerror", sig, "domain mismatch: the key's t=s forbids an i= below d=")
    if refused is not None:
        return _in_testing(refused) if testing else refused
    return key, testing


async def _fetch_key(sig: Mapping[bytes, bytes], dnsfunc: DkimDnsFunc) -> tuple[Key, bool] | DkimResult:
    try:
        record: bytes | None | dkim.DnsTimeoutError = await dnsfunc(_key_name(sig))
    except dkim.DnsTimeoutError as exc:
        record = exc
    return _key_from(sig, record)


def _cached_key(sig: Mapping[bytes, bytes], resolver: Resolver) -> tuple[Key, bool] | DkimResult | None:
    """:func:`_fetch_key` from the resolver's cache, or None if not cached."""
    qname = _key_name(sig).decode("utf-8", "replace")
    answer = resolver.cached(qname, "TXT")
    if answer is None:
        return None
    try:
        record: bytes | None | dkim.DnsTimeoutError = dkim_key_record(qname, answer)
    except dkim.DnsTimeoutError as exc:
        record = exc
    return _key_from(sig, record)


async def _maybe_in_thread(big: bool, function: Callable[..., T], *args: Any) -> T:
    """Run ``function`` here, or in a worker thread for a big message:
    dkimpy splits the whole message into lines and canonicalises the body
    in Python, about 10 ms per MB that would stall every other session."""
    if big:
        return await asyncio.to_thread(function, *args)
    return function(*args)


@dataclass
class _Parsed:
    """A message dkimpy has read, with each signature's prepared fields (or
    the result that already ends its verification)."""

    verifier: dkim.DKIM
    prepared: list[DkimResult | tuple[Any, ...]]

    @property
    def signatures(self) -> list[Mapping[bytes, bytes]]:
        """The tags of the signatures whose key is needed, in order."""
        return [p[0] for p in self.prepared if not isinstance(p, DkimResult)]


def _signed(message: Message | bytes) -> tuple[Sequence[tuple[str, str]], bytes] | None:
    """The header fields and bytes of ``message``, or None if it carries no
    DKIM-Signature (most mail: no need to hand it to dkimpy)."""
    fields = ar.header_fields(message)  # kept on a Message for the other plugins
    if not any(name.lower() == "dkim-signature" for name, _ in fields):
        return None
    return fields, message.raw if isinstance(message, Message) else message


def _parse(raw: bytes, fields: Sequence[tuple[str, str]], crlf: bool = False) -> _Parsed | tuple[DkimResult, ...]:
    try:
        # What dkim.DKIM(raw) does, with ``crlf`` passed on (_rfc822_parse).
        verifier = dkim.DKIM(None, logger=_log, minkey=MIN_KEY_BITS)
        verifier.headers, verifier.body = _rfc822_parse(raw, crlf)
    except dkim.DKIMException as exc:  # a header line dkimpy cannot parse
        count = sum(1 for name, _ in fields if name.lower() == "dkim-signature")
        return tuple(DkimResult("permerror", reason=f"malformed message: {exc}") for _ in range(min(count, MAX_SIGNATURES)))
    count = sum(1 for name, _ in verifier.headers if name.lower() == b"dkim-signature")
    prepared: list[DkimResult | tuple[Any, ...]] = []
    for idx in range(min(count, MAX_SIGNATURES)):
        try:
            prep = verifier.verify_headerprep(idx)
        except (dkim.DKIMException, KeyError, ValueError, TypeError) as exc:  # missing or bad tags, expired...
            prepared.append(DkimResult("neutral", reason=f"bad signature: {exc}"))
            continue
        if b"from" not in prep[1]:
            # RFC 6376 §6.1.1: a signature that leaves From out vouches for
            # no author, and any From can be put on it; dkimpy verifies it
            # anyway.  Decided before its key is fetched.
            prepared.append(_described("permerror", prep[0], FROM_NOT_SIGNED))
            continue
        prepared.append(prep)
    return _Parsed(verifier, prepared)


def _finish(parsed: _Parsed, keys: Sequence[tuple[Key, bool] | DkimResult]) -> tuple[DkimResult, ...]:
    """Each signature's result, given the keys of :attr:`_Parsed.signatures`."""
    verifier = parsed.verifier
    results = []
    key_iter = iter(keys)
    for idx, prep in enumerate(parsed.prepared):
        if isinstance(prep, DkimResult):
            results.append(_with_tags(prep, verifier, idx))
            continue
        sig, include_headers, sigheaders = prep
        key = next(key_iter)
        if isinstance(key, DkimResult):
            results.append(key)
            continue
        (verifier.pk, verifier.keysize, verifier.ktag, verifier.seqtlsrpt), testing = key
        try:
            # The dnsfunc argument is for ARC; a signature's key is set above.
            ok = verifier.verify_sig_process(sig, include_headers, sigheaders[idx], None)
        except dkim.ValidationError as exc:  # body hash mismatch, wrong service type
            result = _described("fail", sig, str(exc).split(" (")[0])
        except dkim.DKIMException as exc:  # key too small, bad c=...
            result = _described("permerror", sig, str(exc))
        except (KeyError, ValueError, TypeError) as exc:
            result = _described("neutral", sig, f"bad signature: {exc!r}")
        else:
            result = _described("pass", sig) if ok else _described("fail", sig, "signature did not verify")
        results.append(_in_testing(result) if testing and result.result != "pass" else result)
    return tuple(results)


async def verify_message(message: Message | bytes, dnsfunc: DkimDnsFunc) -> tuple[DkimResult, ...]:
    """Verify each DKIM signature of ``message``, topmost first (keys
    fetched concurrently); ``()`` when there is none."""
    signed = _signed(message)
    if signed is None:
        return ()
    fields, raw = signed
    big = len(raw) > BIG_MESSAGE
    parsed = await _maybe_in_thread(big, _parse, raw, fields, isinstance(message, Message))
    if isinstance(parsed, tuple):
        return parsed
    wanted = parsed.signatures
    if len(wanted) == 1:  # the usual case: no task
        keys = [await _fetch_key(wanted[0], dnsfunc)]
    else:
        keys = await asyncio.gather(*(_fetch_key(sig, dnsfunc) for sig in wanted))
    return await _maybe_in_thread(big, _finish, parsed, keys)


def verify_cached(message: Message | bytes, resolver: Resolver) -> tuple[DkimResult, ...] | None:
    """:func:`verify_message` done here and now, when nothing has to be
    waited for: the message is small and every key is in the resolver's
    cache (the usual case); else None."""
    signed = _signed(message)
    if signed is None:
        return ()
    fields, raw = signed
    if len(raw) > BIG_MESSAGE:
        return None
    parsed = _parse(raw, fields, isinstance(message, Message))
    if isinstance(parsed, tuple):
        return parsed
    keys = []
    for sig in parsed.signatures:
        key = _cached_key(sig, resolver)
        if key is None:
            return None  # verify_message reads the message again: once per key TTL
        keys.append(key)
    return _finish(parsed, keys)


def _with_tags(result: DkimResult, verifier: dkim.DKIM, idx: int) -> DkimResult:
    """A ``neutral`` result with whatever tags of the field could be read."""
    try:
        sig = _parse_tag_value([v for n, v in verifier.headers if n.lower() == b"dkim-signature"][idx])
    except Exception:  # noqa: BLE001 - the field is broken, that is the point
        return result
    return _described(result.result, sig, result.reason)


_VERIFIED: StashKey[tuple[DkimResult, ...] | asyncio.Future[tuple[DkimResult, ...]]] = StashKey()


def dkim_results(
    message: Message, resolver: Resolver
) -> tuple[DkimResult, ...] | asyncio.Future[tuple[DkimResult, ...]]:
    """The verification of ``message``, done once and shared by every caller
    (dkim and dmarc): the results at once when nothing had to be waited for
    (:func:`verify_cached`), else a future to await.  A caller that is
    cancelled (its hook timed out) does not cancel it for the others."""
    done = message.stash.get(_VERIFIED, None)
    if done is None:
        done = verify_cached(message, resolver)
        if done is None:
            done = asyncio.ensure_future(verify_message(message, dkim_dnsfunc(resolver)))
        message.stash[_VERIFIED] = done
    return done if isinstance(done, tuple) else asyncio.shield(done)


# ------------------------------------------------------------------ deciding


def _within(domain: str, parent: str) -> bool:
    return domain == parent or domain.endswith("." + parent)


def required_domain(author: str, required: Sequence[str]) -> str:
    """The entry of ``required`` that covers ``author`` (itself or a parent
    domain), ``""`` if none."""
    return next((d for d in required if author and _within(author, d.lower().rstrip("."))), "")


def dkim_decision(
    results: Sequence[DkimResult],
    authors: str | Sequence[str],
    actions: Mapping[str, ActionSpec],
    required: Sequence[str] = (),
    headers: tuple[tuple[str, str], ...] = (),
) -> Verdict:
    """The DATA verdict for a message's DKIM results.

    ``authors`` are the From domains: every address of every From field
    (:func:`plugins._authresults.author_domains`), or one domain as a
    string.  Each author under an entry of ``required`` needs a signature
    that passed, whose ``d=`` is that entry or a subdomain of it, and of
    which the author is ``d=`` or a subdomain.  An author without one is
    ``required`` (refused, naming that author); when the only such
    signatures could not be checked (DNS), ``required_temperror`` --
    unless another author is ``required`` outright, which a retry would
    not change.
    """
    if isinstance(authors, str):
        authors = (authors,) if authors else ()
    # A signature that failed under a testing key counts as none (_in_testing).
    counted = [r for r in results if not r.testing]
    if any(r.result == "pass" for r in counted):
        finding = "pass"
    elif not counted:
        finding = "none"
    else:
        finding = next((f for f in ("temperror", "fail") if any(r.result == f for r in counted)), "permerror")
    author = authors[0] if authors else ""
    reject = DKIM_REJECTED.format(finding=finding) if finding == "pass" else DKIM_NO_PASS.format(domain=author or "sender")
    defer = None
    unsigned: list[str] = []  # required authors without a passing signature
    unchecked: list[str] = []  # ... of which one could not be checked (DNS)
    for domain in authors:
        listed = required_domain(domain, required).lower().rstrip(".")
        if not listed:
            continue
        candidates = [r for r in results if _within(r.domain, listed) and _within(domain, r.domain)]
        if not any(r.result == "pass" for r in candidates):
            (unchecked if any(r.result == "temperror" for r in candidates) else unsigned).append(domain)
    if unsigned or unchecked:
        if unsigned:
            finding, author = "required", unsigned[0]
        else:
            finding, author = "required_temperror", unchecked[0]
            defer = DKIM_REQUIRED_TEMP.format(domain=author)
        passing = any(r.result == "pass" for r in results)
        reject = (DKIM_NOT_AUTHOR if passing else DKIM_NO_PASS).format(domain=author)
    label = f"dkim={finding}" + (" " + ",".join(f"{r.domain or '?'}:{r.result}" for r in results) if results else "")
    return decide(finding, actions, reject=reject, defer=defer, headers=headers, result=label)


# ------------------------------------------------------------------ headers

_SELECTOR = re.compile(r"[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*\Z")
_ALGORITHM = re.compile(r"[a-z0-9-]{1,32}\Z")
_IDENTITY = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]*@[A-Za-z0-9.-]+\Z")
_B64 = re.compile(r"[A-Za-z0-9+/]{1,8}\Z")


def ar_results(results: Sequence[DkimResult]) -> list[Any]:
    """The ``dkim=`` clauses for Authentication-Results: one per signature
    (RFC 8601 §2.7.1, tags checked before they are reported), ``dkim=none``
    without signatures."""
    if not results:
        return [authres.DKIMAuthenticationResult(result="none")]
    clauses = []
    for r in results:
        props = []
        domain = ar.domain_or_none(r.domain) if r.domain else None
        if domain:
            props.append(ar.property_("header", "d", domain))
        if _IDENTITY.match(r.identity) and domain and is_domain(r.identity.rpartition("@")[2]):
            props.append(ar.property_("header", "i", r.identity))
        if _SELECTOR.match(r.selector):
            props.append(ar.property_("header", "s", r.selector))
        if _ALGORITHM.match(r.algorithm):
            props.append(ar.property_("header", "a", r.algorithm))
        if _B64.match(r.b):
            props.append(ar.property_("header", "b", r.b))
        clauses.append(ar.clause("dkim", r.result, r.reason, props))
    return clauses


def _without_b(key: tuple[str, str, str, str, str, str]) -> Any:
    (clause,) = ar_results([DkimResult(*key[:5], reason=key[5])])
    return clause


_AR_TEXTS = ar.Memo(ar.clause_text(_without_b), lambda key: sum(map(len, key)))


def ar_texts(results: Sequence[DkimResult]) -> list[str]:
    """:func:`ar_results` as text.  ``header.b`` is the one part that differs
    from message to message, and the last: the rest is formatted once per
    distinct result, and that property added after it."""
    if not results:
        return ["dkim=none"]
    texts = []
    for r in results:
        text = _AR_TEXTS((r.result, r.domain, r.selector, r.identity, r.algorithm, r.reason))
        if r.b and _B64.match(r.b):
            text += " " + str(ar.property_("header", "b", r.b))
        texts.append(text)
    return texts


# ------------------------------------------------------------------ plugin


class DkimPlugin(Plugin):
    """Verifies every DKIM signature at end of DATA."""

    @dataclass(frozen=True)
    class Options(ActionOptions):
        DEFAULT_ACTIONS = DEFAULT_ACTIONS

        #: From domains (and their subdomains) whose mail must carry a
        #: passing signature of that domain -- checked for every address of
        #: every From field.
        required_domains: tuple[str, ...] = ()

        def check(self) -> dict[str, str]:
            bad = check_actions(self.actions, FINDINGS, ("temperror", "required_temperror"))
            for i, domain in enumerate(self.required_domains):
                if ar.domain_or_none(domain) is None:
                    bad[f"required_domains[{i}]"] = f"expected a domain name, got {domain!r}"
            return bad

    def __init__(self, options: Any, context: Context, name: str = "") -> None:
        super().__init__(options, context, name)
        self.required = tuple(ar.domain_or_none(d) or d for d in options.required_domains)

    @hookimpl
    def data(
        self, session: Session, envelope: Envelope, message: Message
    ) -> Verdict | None | Coroutine[Any, Any, Verdict | None]:
        if session.trusted:
            return None
        # A plain answer when the keys are cached; else a coroutine.
        return then(
            dkim_results(message, self.context.resolver),
            lambda results: self._decided(session, envelope, message, results),
        )

    def _decided(
        self, session: Session, envelope: Envelope, message: Message, results: tuple[DkimResult, ...]
    ) -> Verdict | None:
        authors = ar.authors_of(message).domains  # every one: a second From hides none
        if ar.reporter(self.context) != "dkim":
            return dkim_decision(results, authors, self.options.actions, self.required)
        clauses: list[str] = []
        outcome = spf.stored_outcome(session, envelope)
        if outcome is not None:
            clauses += spf.ar_texts(outcome)
        clauses += ar_texts(results)
        header = ar.authentication_results(self.context.hostname, clauses)
        return dkim_decision(results, authors, self.options.actions, self.required, headers=(header,))
