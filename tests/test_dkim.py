"""plugins.dkim (and the header helpers of plugins._authresults) with keys
made for this run and published on the loopback DNS server.

The signing helpers here are also used by test_dmarc.py and
tests/e2e/test_auth.py.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import re
from collections.abc import Sequence
from typing import Any

import dkim
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from gateway import Action, Message, Reply
from gateway.config import PolicyError
from gateway.dns import Resolver, dkim_dnsfunc
from plugins import _authresults as ar
from plugins import dkim as dkim_plugin
from plugins.dkim import DkimResult, dkim_results, verify_message
from tests.fixtures.dkimkeys import keypair
from tests.fixtures.dnsserver import DNSServer
from tests.fixtures.hooks import settle
from tests.test_spf import (
    GOOD_IP,
    HOSTNAME,
    build,
    envelope,
    headers_named,
    session,
    unfold,
)

MESSAGE = (
    b"From: Alice <alice@auth.test>\r\n"
    b"To: Bob <bob@example.com>\r\n"
    b"Subject: quarterly report\r\n"
    b"Date: Mon, 01 Jan 2024 00:00:00 +0000\r\n"
    b"Message-ID: <1@auth.test>\r\n"
    b"\r\n"
    b"The numbers are good.\r\n"
)


# ------------------------------------------------------------------ keys




def key_record(public: str | None = None) -> str:
    """A DKIM key TXT record in 255-byte strings, as big keys are published."""
    record = f"v=DKIM1; k=rsa; p={keypair()[1] if public is None else public}"
    return " ".join(f'"{record[i : i + 255]}"' for i in range(0, len(record), 255)) or '""'


def publish_keys(dns: DNSServer, domain: str, selectors: dict[str, str]) -> None:
    """Serve ``selector._domainkey.domain`` TXT records (a zone of their own,
    so the domain's file zone stays as it is)."""
    dns.add_zone(f"_domainkey.{domain}", "\n".join(f"{s} IN TXT {r}" for s, r in selectors.items()))


def sign(message: bytes, domain: str = "auth.test", selector: str = "s1", **kw: object) -> bytes:
    headers = [b"from", b"to", b"subject", b"date", b"message-id"]
    signature: bytes = dkim.sign(message, selector.encode(), domain.encode(), keypair()[0], include_headers=headers, **kw)
    return signature + message


def sign_by_hand(message: bytes, signed: Sequence[str], domain: str = "auth.test", selector: str = "s1") -> bytes:
    """``message`` with a DKIM-Signature (rsa-sha256, c=relaxed/simple) over
    the header fields named in ``signed`` (the last of each), made here:
    dkimpy's signer refuses to leave From out, a careless or hostile signer
    does not (RFC 6376 §3.4.2 and §3.4.3 canonicalisation, §3.7 hashing)."""
    head, _, body = message.partition(b"\r\n\r\n")
    body_hash = base64.b64encode(hashlib.sha256(body.rstrip(b"\r\n") + b"\r\n").digest()).decode()
    fields = {name.lower(): value for name, value in ar.header_fields(head + b"\r\n\r\n")}
    value = (
        f"v=1; a=rsa-sha256; c=relaxed/simple; d={domain}; s={selector}; "
        f"h={':'.join(signed)}; bh={body_hash}; b="
    )
    hashed = "".join(f"{name.lower()}:{' '.join(fields[name.lower()].split())}\r\n" for name in signed)
    hashed += f"dkim-signature:{value}"  # the field itself last, b= empty, no CRLF
    key = serialization.load_pem_private_key(keypair()[0], password=None)
    assert isinstance(key, rsa.RSAPrivateKey)
    signature = key.sign(hashed.encode(), padding.PKCS1v15(), hashes.SHA256())
    return f"DKIM-Signature: {value}{base64.b64encode(signature).decode()}\r\n".encode() + message


@pytest.fixture
def resolver(dns: DNSServer) -> Resolver:
    return Resolver([dns.nameserver], timeout=5.0)


@pytest.fixture
def keys(dns: DNSServer) -> DNSServer:
    publish_keys(dns, "auth.test", {"s1": key_record()})
    return dns


async def verify(raw: bytes, resolver: Resolver) -> tuple[DkimResult, ...]:
    return await verify_message(raw, dkim_dnsfunc(resolver))


# ------------------------------------------------------------------ results


async def test_pass(resolver: Resolver, keys: DNSServer) -> None:
    signed = sign(MESSAGE)
    (result,) = await verify(signed, resolver)
    b = re.search(rb"b=([A-Za-z0-9+/]{8})", signed.split(b"bh=")[1])
    assert result == DkimResult("pass", "auth.test", "s1", "@auth.test", "rsa-sha256", b.group(1).decode())  # type: ignore[union-attr]


async def test_tampered_body_fails_on_body_hash(resolver: Resolver, keys: DNSServer) -> None:
    (result,) = await verify(sign(MESSAGE).replace(b"good", b"bad"), resolver)
    assert (result.result, result.reason) == ("fail", "body hash mismatch")


async def test_tampered_header_fails_on_signature(resolver: Resolver, keys: DNSServer) -> None:
    (result,) = await verify(sign(MESSAGE).replace(b"quarterly", b"urgent"), resolver)
    assert (result.result, result.reason) == ("fail", "signature did not verify")


async def test_a_signature_that_leaves_out_from_is_permerror(resolver: Resolver, keys: DNSServer) -> None:
    # RFC 6376 §6.1.1: h= without From is PERMFAIL, whatever the signature.
    signed = sign_by_hand(MESSAGE, ("subject", "date"))
    replayed = signed.replace(b"From: Alice <alice@auth.test>", b"From: The CEO <ceo@auth.test>")
    b = re.search(rb" b=([A-Za-z0-9+/]{8})", signed).group(1).decode()  # type: ignore[union-attr]
    for raw in (signed, replayed):
        (result,) = await verify(raw, resolver)
        assert result == DkimResult("permerror", "auth.test", "s1", "", "rsa-sha256", b, "From field not signed")
    assert keys.total_queries == 0  # refused before its key is fetched
    # The same hand-made signature with From in h= passes: the refusal is for From.
    (control,) = await verify(sign_by_hand(MESSAGE, ("from", "subject", "date")), resolver)
    assert control.result == "pass"


async def test_unsigned_message_has_no_results(resolver: Resolver, dns: DNSServer) -> None:
    assert await verify(MESSAGE, resolver) == ()
    assert dns.total_queries == 0


@pytest.mark.parametrize(
    "record, reason",
    [
        (None, "no key for signature"),
        (key_record(""), "unusable key"),  # p= empty: the key was revoked
        ('"v=DKIM1; k=rsa; p=!!notbase64!!"', "unusable key"),
    ],
)
async def test_key_problems_are_permerror(resolver: Resolver, dns: DNSServer, record: str | None, reason: str) -> None:
    publish_keys(dns, "auth.test", {"other": key_record()} if record is None else {"s1": record})
    (result,) = await verify(sign(MESSAGE), resolver)
    assert result.result == "permerror" and result.reason.startswith(reason)
    assert result.domain == "auth.test" and result.selector == "s1"


def _public_key(modulus: int, exponent: int) -> str:
    """``p=`` for any modulus and exponent, even ones no library would make
    a key of (DER SubjectPublicKeyInfo written by hand)."""

    def der(tag: int, body: bytes) -> bytes:
        size = len(body).to_bytes((len(body).bit_length() + 7) // 8, "big")
        return bytes([tag]) + (bytes([len(body)]) if len(body) < 128 else bytes([0x80 | len(size)]) + size) + body

    def integer(value: int) -> bytes:
        return der(2, value.to_bytes(value.bit_length() // 8 + 1, "big"))

    rsa_key = der(0x30, integer(modulus) + integer(exponent))
    algorithm = der(0x30, bytes.fromhex("06092a864886f70d0101010500"))  # rsaEncryption, NULL
    return base64.b64encode(der(0x30, algorithm + der(3, b"\0" + rsa_key))).decode()


def _fixture_key() -> tuple[int, int]:
    public = serialization.load_pem_private_key(keypair()[0], password=None).public_key()
    assert isinstance(public, rsa.RSAPublicKey)
    numbers = public.public_numbers()
    return numbers.n, numbers.e


@pytest.mark.parametrize(
    "modulus, exponent, reason",
    [
        # The key's owner is the message's sender: a big key, or an exponent
        # OpenSSL refuses (here: larger than the modulus), went to dkimpy's
        # pow() in Python, about 20 s for a 20000-bit key.
        ((1 << 8200) | 1, 65537, "public key too large: 8201 bits"),
        (None, (1 << 4096) | 1, "public exponent too large: 4097 bits"),
    ],
    ids=["big-modulus", "big-exponent"],
)
async def test_keys_too_costly_to_use_are_permerror(
    resolver: Resolver, dns: DNSServer, modulus: int | None, exponent: int, reason: str
) -> None:
    modulus = modulus or _fixture_key()[0]
    publish_keys(dns, "auth.test", {"s1": key_record(_public_key(modulus, exponent))})
    (result,) = await verify(sign(MESSAGE), resolver)
    assert (result.result, result.reason) == ("permerror", f"unusable key: {reason}")


async def test_the_largest_key_allowed_still_verifies(resolver: Resolver, dns: DNSServer) -> None:
    # The limits leave a key of the usual shape alone (the fixture's own).
    publish_keys(dns, "auth.test", {"s1": key_record(_public_key(*_fixture_key()))})
    (result,) = await verify(sign(MESSAGE), resolver)
    assert result.result == "pass"
    assert dkim_plugin.MAX_KEY_BITS >= 4096  # RFC 8301 §3.1


async def test_key_lookup_failure_is_temperror(resolver: Resolver, keys: DNSServer) -> None:
    keys.servfail("s1._domainkey.auth.test")
    (result,) = await verify(sign(MESSAGE), resolver)
    assert result.result == "temperror" and "SERVFAIL" in result.reason


async def test_unusable_signature_field_is_neutral(resolver: Resolver, keys: DNSServer) -> None:
    signed = re.sub(rb"bh=[^;]+;", b"", sign(MESSAGE))
    (result,) = await verify(signed, resolver)
    assert result.result == "neutral" and "missing" in result.reason
    assert (result.domain, result.selector) == ("auth.test", "s1")  # still reported


async def test_every_signature_is_verified_topmost_first(resolver: Resolver, dns: DNSServer) -> None:
    publish_keys(dns, "auth.test", {"s1": key_record()})
    publish_keys(dns, "list.test", {"lists": key_record()})
    twice = sign(sign(MESSAGE, "auth.test", "s1"), "list.test", "lists")  # a list re-signs
    results = await verify(twice, resolver)
    assert [(r.result, r.domain) for r in results] == [("pass", "list.test"), ("pass", "auth.test")]
    broken = sign(sign(MESSAGE, "auth.test", "nokey"), "list.test", "lists")
    results = await verify(broken, resolver)
    assert [(r.result, r.domain) for r in results] == [("pass", "list.test"), ("permerror", "auth.test")]


async def test_signatures_beyond_the_limit_are_ignored(resolver: Resolver, keys: DNSServer) -> None:
    signed = sign(MESSAGE)
    signature, body = signed.split(b"From: ", 1)
    many = signature * (dkim_plugin.MAX_SIGNATURES + 4) + b"From: " + body
    results = await verify(many, resolver)
    assert len(results) == dkim_plugin.MAX_SIGNATURES and {r.result for r in results} == {"pass"}
    assert keys.query_count("s1._domainkey.auth.test", "TXT") == 1  # one question, shared


async def test_malformed_header_section_is_permerror(resolver: Resolver, keys: DNSServer) -> None:
    raw = sign(MESSAGE).replace(b"To: Bob", b"\x01bad line\r\nTo: Bob")
    (result,) = await verify(raw, resolver)
    assert result.result == "permerror" and "malformed" in result.reason


async def test_with_cached_keys_a_small_message_is_verified_at_once(resolver: Resolver, keys: DNSServer) -> None:
    from plugins.dkim import BIG_MESSAGE, verify_cached

    good = sign(MESSAGE)
    tampered = good.replace(b"numbers are good", b"numbers are bad!")
    assert verify_cached(good, resolver) is None  # the key is not cached yet
    assert verify_cached(MESSAGE, resolver) == ()  # unsigned: nothing to wait for
    expected = [await verify(raw, resolver) for raw in (good, tampered)]
    assert [r.result for (r,) in expected] == ["pass", "fail"]
    assert [verify_cached(raw, resolver) for raw in (good, tampered)] == expected
    big = sign(MESSAGE + (b"x" * 998 + b"\r\n") * (BIG_MESSAGE // 1000 + 1))
    assert verify_cached(big, resolver) is None  # big ones go to a thread
    message = Message(good)
    assert dkim_results(message, resolver) == expected[0]  # the results, not a future
    assert keys.query_count("s1._domainkey.auth.test", "TXT") == 1


async def test_verification_is_shared_by_every_caller(resolver: Resolver, keys: DNSServer) -> None:
    message = Message(sign(MESSAGE))
    first, second = await asyncio.gather(dkim_results(message, resolver), dkim_results(message, resolver))
    assert first is second and first[0].result == "pass"
    assert await dkim_results(message, resolver) is first
    assert keys.query_count("s1._domainkey.auth.test", "TXT") == 1


async def test_a_cancelled_caller_does_not_cancel_the_verification(resolver: Resolver, keys: DNSServer) -> None:
    keys.delay("_domainkey.auth.test", 0.2)
    message = Message(sign(MESSAGE))
    impatient = asyncio.ensure_future(dkim_results(message, resolver))
    await asyncio.sleep(0.05)
    impatient.cancel()
    (result,) = await dkim_results(message, resolver)
    assert result.result == "pass"


# ------------------------------------------------------------------ policy


async def run_data(
    resolver: Resolver, raw: bytes, *, tables: dict[str, dict[str, object]] | None = None,
    ip: str = GOOD_IP, sender: str = "alice@auth.test",
) -> Any:
    """MAIL (when spf is in the policy) and the dkim plugin's DATA hook."""
    plugins = build(resolver, tables or {"dkim": {}})
    s, e = session(ip), envelope(sender)
    if "spf" in plugins:
        await settle(plugins["spf"].mail(s, e))
    return await settle(plugins["dkim"].data(s, e, Message(raw)))


async def test_findings_only_inform_by_default(resolver: Resolver, keys: DNSServer) -> None:
    for raw, finding in [(sign(MESSAGE), "pass"), (MESSAGE, "none"), (sign(MESSAGE).replace(b"good", b"bad"), "fail")]:
        verdict = await run_data(resolver, raw)
        assert verdict.action is Action.CONTINUE and verdict.result.startswith(f"dkim={finding}")


async def test_dkim_alone_reports_dkim_and_spf(resolver: Resolver, keys: DNSServer) -> None:
    signed = sign(MESSAGE)
    verdict = await run_data(resolver, signed, tables={"spf": {}, "dkim": {}})
    (header,) = headers_named(verdict, "Authentication-Results")
    b = re.search(rb"b=([A-Za-z0-9+/]{8})", signed.split(b"bh=")[1]).group(1).decode()  # type: ignore[union-attr]
    b = f'"{b}"' if "/" in b else b  # "/" is a tspecial: the value is quoted (RFC 8601 §2.2)
    assert unfold(header) == (
        f"{HOSTNAME}; spf=pass smtp.mailfrom=alice@auth.test; "
        f"dkim=pass header.d=auth.test header.i=@auth.test header.s=s1 header.a=rsa-sha256 header.b={b}"
    )
    assert all(len(line) <= 78 for line in f"Authentication-Results: {header}".split("\r\n"))


async def test_dkim_without_spf_reports_dkim_only(resolver: Resolver, keys: DNSServer) -> None:
    verdict = await run_data(resolver, MESSAGE)
    assert [unfold(h) for h in headers_named(verdict, "Authentication-Results")] == [f"{HOSTNAME}; dkim=none"]


async def test_failure_reason_is_a_comment(resolver: Resolver, keys: DNSServer) -> None:
    verdict = await run_data(resolver, sign(MESSAGE).replace(b"good", b"bad"))
    (header,) = headers_named(verdict, "Authentication-Results")
    assert "dkim=fail (body hash mismatch) header.d=auth.test" in unfold(header)


async def test_dkim_does_not_report_when_dmarc_does(resolver: Resolver, keys: DNSServer) -> None:
    verdict = await run_data(resolver, sign(MESSAGE), tables={"dkim": {}, "dmarc": {}})
    assert verdict.headers == ()


REQUIRED = {"dkim": {"required_domains": ["auth.test"]}}


async def test_required_domain_without_signature_is_rejected(resolver: Resolver, keys: DNSServer) -> None:
    verdict = await run_data(resolver, MESSAGE, tables=REQUIRED)
    assert verdict.action is Action.REJECT and verdict.result == "dkim=required"
    assert verdict.reply == Reply(550, "5.7.20", "No passing DKIM signature found for auth.test")


async def test_a_signature_that_leaves_out_from_does_not_count(resolver: Resolver, keys: DNSServer) -> None:
    raw = sign_by_hand(MESSAGE, ("to", "subject", "date", "message-id"))
    verdict = await run_data(resolver, raw, tables=REQUIRED)
    assert verdict.action is Action.REJECT and verdict.result == "dkim=required auth.test:permerror"
    assert str(verdict.reply) == "550 5.7.20 No passing DKIM signature found for auth.test"
    (header,) = headers_named(verdict, "Authentication-Results")
    assert unfold(header).startswith(f"{HOSTNAME}; dkim=permerror (From field not signed) header.d=auth.test header.s=s1")


async def test_required_domain_signed_by_someone_else_is_rejected(resolver: Resolver, dns: DNSServer) -> None:
    publish_keys(dns, "list.test", {"lists": key_record()})
    verdict = await run_data(resolver, sign(MESSAGE, "list.test", "lists"), tables=REQUIRED)
    assert verdict.action is Action.REJECT
    assert verdict.reply == Reply(550, "5.7.22", "No valid author-matched DKIM signature found for auth.test")


@pytest.mark.parametrize(
    "author, signer, action",
    [
        ("auth.test", "auth.test", Action.CONTINUE),
        ("news.auth.test", "auth.test", Action.CONTINUE),  # subdomain of the signer
        ("news.auth.test", "news.auth.test", Action.CONTINUE),
        ("auth.test", "news.auth.test", Action.REJECT),  # a subdomain does not vouch for its parent
        ("example.com", "auth.test", Action.CONTINUE),  # not a required domain
    ],
)
async def test_required_domain_alignment(
    resolver: Resolver, dns: DNSServer, author: str, signer: str, action: Action
) -> None:
    publish_keys(dns, signer, {"s1": key_record()})
    raw = sign(MESSAGE.replace(b"alice@auth.test", f"alice@{author}".encode()), signer)
    verdict = await run_data(resolver, raw, tables=REQUIRED)
    assert verdict.action is action


async def test_required_domain_with_key_lookup_failure_is_deferred(resolver: Resolver, keys: DNSServer) -> None:
    keys.servfail("s1._domainkey.auth.test")
    verdict = await run_data(resolver, sign(MESSAGE), tables=REQUIRED)
    assert verdict.action is Action.DEFER and verdict.result.startswith("dkim=required_temperror")
    assert str(verdict.reply) == "451 4.7.20 No passing DKIM signature found for auth.test: DNS error, try again later"


def key_with(tags: str) -> str:
    """The test key's record with more tags before ``p=`` (RFC 6376 §3.6.1)."""
    record = f"v=DKIM1; k=rsa; {tags}; p={keypair()[1]}"
    return " ".join(f'"{record[i : i + 255]}"' for i in range(0, len(record), 255))


@pytest.mark.parametrize(
    "tags, refused, reason, accepted",
    [
        # h=: a key published for sha256 only vouches for no rsa-sha1 signature
        ("h=sha256", {"signature_algorithm": b"rsa-sha1"},
         "inappropriate hash algorithm: the key allows h=sha256", {}),
        ("h=sha256 : sha512", {"signature_algorithm": b"rsa-sha1"},
         "inappropriate hash algorithm: the key allows h=sha256:sha512", {}),
        # t=s: the i= domain MUST be d= itself, no subdomain
        ("t=s", {"identity": b"@news.auth.test"},
         "domain mismatch: the key's t=s forbids an i= below d=", {"identity": b"alice@auth.test"}),
        ("t=s:x", {"identity": b"@news.auth.test"},  # an unknown flag is ignored (t=y: see below)
         "domain mismatch: the key's t=s forbids an i= below d=", {"identity": b"alice@auth.test"}),
    ],
)
async def test_a_signature_the_key_does_not_allow_is_permerror(
    resolver: Resolver, dns: DNSServer, tags: str, refused: dict[str, bytes], reason: str,
    accepted: dict[str, bytes],
) -> None:
    # RFC 6376 §3.6.1 and §6.1.2: the verifier MUST ignore such a key (PERMFAIL).
    publish_keys(dns, "auth.test", {"s1": key_with(tags)})
    raw = sign(MESSAGE, **refused)
    verdict = await run_data(resolver, raw, tables=REQUIRED)
    assert verdict.action is Action.REJECT and verdict.result == "dkim=required auth.test:permerror"
    assert str(verdict.reply) == "550 5.7.20 No passing DKIM signature found for auth.test"
    (header,) = headers_named(verdict, "Authentication-Results")
    identity = refused.get("identity", b"@auth.test").decode()
    algorithm = refused.get("signature_algorithm", b"rsa-sha256").decode()
    assert unfold(header).startswith(
        f"{HOSTNAME}; dkim=permerror ({reason}) header.d=auth.test header.i={identity} header.s=s1"
        f" header.a={algorithm} header.b=")
    # what the key allows passes
    verdict = await run_data(resolver, sign(MESSAGE, **accepted), tables=REQUIRED)
    assert verdict.action is Action.CONTINUE and verdict.result == "dkim=pass auth.test:pass"


@pytest.mark.parametrize("flags", ["y", "y:s", " Y "])
async def test_a_signature_failing_under_a_testing_key_counts_as_unsigned(
    resolver: Resolver, dns: DNSServer, flags: str
) -> None:
    # RFC 6376 §3.6.1, t=y: "Verifiers MUST NOT treat messages from Signers
    # in testing mode differently from unsigned email, even should the
    # signature fail to verify."  Reported (neutral, with what went wrong,
    # for the signer), but no finding a policy could punish.
    publish_keys(dns, "auth.test", {"s1": key_with(f"t={flags}")})
    tampered = sign(MESSAGE).replace(b"good", b"bad")
    strict = {"dkim": {"actions": {"fail": "reject", "permerror": "reject", "none": 1.0}}}
    verdict = await run_data(resolver, tampered, tables=strict)
    assert verdict.action is Action.CONTINUE and verdict.result == "dkim=none auth.test:neutral"
    assert verdict.score == 1.0  # what unsigned mail gets
    (header,) = headers_named(verdict, "Authentication-Results")
    assert unfold(header).startswith(
        f"{HOSTNAME}; dkim=neutral (testing key t=y, fail: body hash mismatch) header.d=auth.test header.i=@auth.test")
    # required_domains: as unsigned mail, refused for want of a passing signature
    verdict = await run_data(resolver, tampered, tables=REQUIRED)
    assert verdict.action is Action.REJECT and verdict.result == "dkim=required auth.test:neutral"
    assert str(verdict.reply) == "550 5.7.20 No passing DKIM signature found for auth.test"
    # a signature that verifies under a testing key still passes
    verdict = await run_data(resolver, sign(MESSAGE), tables=REQUIRED)
    assert verdict.action is Action.CONTINUE and verdict.result == "dkim=pass auth.test:pass"


async def test_a_key_restriction_broken_under_a_testing_key_counts_as_unsigned(resolver: Resolver, dns: DNSServer) -> None:
    publish_keys(dns, "auth.test", {"s1": key_with("t=y; h=sha256")})
    raw = sign(MESSAGE, signature_algorithm=b"rsa-sha1")
    verdict = await run_data(resolver, raw, tables={"dkim": {"actions": {"permerror": "reject"}}})
    assert verdict.action is Action.CONTINUE and verdict.result == "dkim=none auth.test:neutral"
    (header,) = headers_named(verdict, "Authentication-Results")
    assert unfold(header).startswith(
        f"{HOSTNAME}; dkim=neutral (testing key t=y, permerror: inappropriate hash algorithm: the key allows"
        " h=sha256) header.d=auth.test")


async def test_an_internationalised_signing_domain_is_a_label_for_lookup_and_comparison(
    resolver: Resolver, dns: DNSServer
) -> None:
    # RFC 8616 §4: an SMTPUTF8 message may name its signing domain in
    # U-labels (d=straße.auth.test); the key is looked up, and the domain
    # compared with the From domain, in A-labels (xn--strae-oqa.auth.test).
    publish_keys(dns, "xn--strae-oqa.auth.test", {"s1": key_record()})
    raw = sign(MESSAGE.replace(b"alice@auth.test", "alice@straße.auth.test".encode()), "straße.auth.test")
    verdict = await run_data(resolver, raw, tables=REQUIRED)
    assert verdict.action is Action.CONTINUE and verdict.result == "dkim=pass xn--strae-oqa.auth.test:pass"
    (header,) = headers_named(verdict, "Authentication-Results")
    assert unfold(header).startswith(f"{HOSTNAME}; dkim=pass header.d=xn--strae-oqa.auth.test header.s=s1 ")
    assert dns.query_count("s1._domainkey.xn--strae-oqa.auth.test", "TXT") == 1
    # ... so it aligns for DMARC (else auth.test's sp=quarantine applied)
    dmarc = build(resolver, {"dkim": {}, "dmarc": {}})["dmarc"]
    verdict = await settle(dmarc.data(session(), envelope("bounce@example.com"), Message(raw)))
    (header,) = headers_named(verdict, "Authentication-Results")
    assert verdict.result == "dmarc=pass xn--strae-oqa.auth.test"
    assert unfold(header).endswith(
        "dmarc=pass (p=reject sp=quarantine dis=none) header.from=xn--strae-oqa.auth.test")


def with_from(*values: str) -> bytes:
    """MESSAGE with its From field replaced by one field per value."""
    fields = "".join(f"From: {v}\r\n" for v in values).encode()
    return MESSAGE.replace(b"From: Alice <alice@auth.test>\r\n", fields)


@pytest.mark.parametrize(
    "raw",
    [
        with_from("ceo@auth.test, x@thirdparty.test"),
        with_from("x@thirdparty.test, The CEO <ceo@auth.test>"),
        with_from("ceo@auth.test", "x@thirdparty.test"),
        with_from("x@thirdparty.test", "ceo@news.auth.test"),  # a subdomain, in the second field
        with_from("ceo@auth.test", "undisclosed"),  # a field that cannot be read hides nothing
        with_from("The CEO <ceo@(x)auth.test"),  # nor does a comment after the @ of one
        with_from('The CEO <ceo@"auth.test">'),
    ],
)
async def test_required_domain_in_any_from_address_is_required(
    resolver: Resolver, keys: DNSServer, raw: bytes
) -> None:
    verdict = await run_data(resolver, raw, tables=REQUIRED)
    assert verdict.action is Action.REJECT and verdict.result == "dkim=required"
    assert verdict.reply.code == 550 and verdict.reply.enhanced == "5.7.20"
    assert re.fullmatch(r"No passing DKIM signature found for (news\.)?auth\.test", verdict.reply.text)


async def test_required_domain_among_several_authors_signed_by_another_is_refused(
    resolver: Resolver, dns: DNSServer
) -> None:
    publish_keys(dns, "thirdparty.test", {"tp": key_record()})
    # (dkimpy fails any signature of a message with two From fields, so one field.)
    raw = sign(with_from("x@thirdparty.test, ceo@auth.test"), "thirdparty.test", "tp")
    verdict = await run_data(resolver, raw, tables=REQUIRED)
    assert verdict.reply == Reply(550, "5.7.22", "No valid author-matched DKIM signature found for auth.test")


@pytest.mark.parametrize(
    "raw",
    [sign(with_from("alice@auth.test, x@thirdparty.test")), sign(with_from("x@thirdparty.test, alice@news.auth.test"))],
)
async def test_required_domain_signed_among_several_authors_passes(
    resolver: Resolver, keys: DNSServer, raw: bytes
) -> None:
    verdict = await run_data(resolver, raw, tables=REQUIRED)
    assert verdict.action is Action.CONTINUE and verdict.result == "dkim=pass auth.test:pass"


async def test_required_domain_among_several_authors_with_key_lookup_failure_is_deferred(
    resolver: Resolver, keys: DNSServer
) -> None:
    keys.servfail("s1._domainkey.auth.test")
    verdict = await run_data(resolver, b"From: x@thirdparty.test\r\n" + sign(MESSAGE), tables=REQUIRED)
    assert str(verdict.reply) == "451 4.7.20 No passing DKIM signature found for auth.test: DNS error, try again later"


def test_an_author_refused_outright_is_not_deferred_for_another() -> None:
    # auth.test's key could not be fetched (a retry may pass); bank.test has no signature at all.
    results = (DkimResult("temperror", "auth.test", "s1"),)
    required = ("auth.test", "bank.test")
    actions = dkim_plugin.DEFAULT_ACTIONS
    deferred = dkim_plugin.dkim_decision(results, ("auth.test", "example.com"), actions, required)
    assert (deferred.action, str(deferred.reply)) == (
        Action.DEFER, "451 4.7.20 No passing DKIM signature found for auth.test: DNS error, try again later"
    )
    refused = dkim_plugin.dkim_decision(results, ("auth.test", "bank.test"), actions, required)
    assert (refused.action, str(refused.reply)) == (Action.REJECT, "550 5.7.20 No passing DKIM signature found for bank.test")
    assert dkim_plugin.dkim_decision(results, "auth.test", actions, required).action is Action.DEFER  # one, as a string


async def test_no_from_field_requires_nothing(resolver: Resolver, keys: DNSServer) -> None:
    verdict = await run_data(resolver, with_from(), tables=REQUIRED)
    assert verdict.action is Action.CONTINUE and verdict.result == "dkim=none"


async def test_actions_can_refuse_unsigned_mail(resolver: Resolver, keys: DNSServer) -> None:
    verdict = await run_data(resolver, MESSAGE, tables={"dkim": {"actions": {"none": "reject"}}})
    assert str(verdict.reply) == "550 5.7.20 No passing DKIM signature found for auth.test"


@pytest.mark.parametrize(
    "table, key",
    [
        ({"required_domains": ["not a domain"]}, "plugins.dkim.required_domains[0]"),
        ({"actions": {"missing": "reject"}}, "plugins.dkim.actions.missing"),
    ],
)
def test_bad_options_are_policy_errors(table: dict[str, object], key: str) -> None:
    with pytest.raises(PolicyError) as info:
        build(None, {"dkim": table})
    assert [p.key for p in info.value.problems] == [key]


async def test_trusted_clients_are_not_checked(resolver: Resolver, keys: DNSServer) -> None:
    plugin = build(resolver, {"dkim": {}})["dkim"]
    assert plugin.data(session("198.51.100.7"), envelope("alice@auth.test"), Message(sign(MESSAGE))) is None
    assert keys.total_queries == 0


@pytest.mark.parametrize("name", [n for n in dkim_plugin.__all__ if isinstance(getattr(dkim_plugin, n), Reply)])
def test_reply_constants_are_well_formed(name: str) -> None:
    reply: Reply = getattr(dkim_plugin, name)
    assert reply.enhanced[0] == str(reply.code)[0] and reply.code >= 400


# ------------------------------------------------------------------ header section


def test_header_fields_follow_one_rule() -> None:
    raw = b"A: 1\r\nB: two\r\n  folded\r\n\tagain\r\nno colon here\r\nC :3\r\n\r\nD: body\r\n"
    assert ar.header_fields(raw) == (("A", " 1"), ("B", " two  folded\tagain"), ("", "no colon here"), ("C", "3"))
    assert ar.header_fields(b"\r\nFrom: a@b.test\r\n") == ()
    assert ar.header_fields(b"From: a@b.test") == (("From", " a@b.test"),)
    assert ar.header_fields(b" leading: space\r\nX: y\r\n\r\n") == ((" leading", " space"), ("X", " y"))


def test_header_fields_are_split_once_per_message() -> None:
    message = Message(MESSAGE)
    assert ar.header_fields(message) is ar.header_fields(message)


@pytest.mark.parametrize(
    "headers, domain, problem",
    [
        (b"From: Alice <alice@Auth.Test>\r\n", "auth.test", ""),
        (b"From: Alice <alice@auth.test> (comment)\r\n", "auth.test", ""),
        (b"From: Group: alice@auth.test;\r\n", "auth.test", ""),
        (b"From: alice@auth.test.\r\n", "", "invalid From header field"),
        (b"From: alice@auth.test <ceo@evil.test>\r\n", "", "invalid From header field"),
        (b"From: <alice@auth.test>evil.test\r\n", "", "invalid From header field"),
        (b'From: "ceo@auth.test" <x@evil.test>\r\n', "evil.test", ""),
        (b"From: =?utf-8?q?Caf=C3=A9?= <a@xn--caf-dma.test>\r\n", "xn--caf-dma.test", ""),
        ("From: a@café.test\r\n".encode(), "xn--caf-dma.test", ""),
        (b"To: b@example.com\r\n", "", "no From header field"),
        (b"From: a@auth.test\r\nFrom: b@evil.test\r\n", "", "2 From header fields"),
        (b"From: a@auth.test, b@evil.test\r\n", "", "2 addresses in From"),
        (b"From: undisclosed\r\n", "", "invalid From header field"),
        (b"From: Undisclosed recipients:;\r\n", "", "0 addresses in From"),
        (b"From: a@[192.0.2.1]\r\n", "", "no usable domain in From"),
        (b"From: a@localhost\r\n", "", "no usable domain in From"),
    ],
)
def test_author_domain(headers: bytes, domain: str, problem: str) -> None:
    author = ar.author_domain(ar.header_fields(headers + b"\r\nbody\r\n"))
    assert (author.domain, author.problem) == (domain, problem)


@pytest.mark.parametrize(
    "headers, domains, problem",
    [
        (b"From: Alice <alice@Auth.Test>\r\n", ("auth.test",), ""),
        (b"From: a@auth.test, b@evil.test\r\n", ("auth.test", "evil.test"), ""),
        (b"From: a@auth.test\r\nTo: x@y.test\r\nfrom: b@evil.test, c@AUTH.test\r\n", ("auth.test", "evil.test"), ""),
        (b"From: Group: a@auth.test, b@evil.test;\r\n", ("auth.test", "evil.test"), ""),
        (b"From: a@auth.test\r\nFrom: undisclosed\r\n", ("auth.test",), "invalid From header field"),
        (b"From: a@localhost, b@evil.test\r\n", ("evil.test",), "no usable domain in From"),
        (b"From: Undisclosed recipients:;\r\nFrom: b@evil.test\r\n", ("evil.test",), "0 addresses in From"),
        # Readers take invalid syntax two ways: every domain after an @ is judged.
        (b"From: alice@auth.test <ceo@evil.test>\r\n", ("auth.test", "evil.test"), "invalid From header field"),
        (b"From: Bob <bob@Auth.Test\r\n", ("auth.test",), "invalid From header field"),
        # Comments and blanks after the @ are dropped by readers (RFC 5322
        # §3.2.2), quotes show their content: the domain shown is judged.
        (b"From: CEO <ceo@(x)auth.test\r\n", ("auth.test",), "invalid From header field"),
        (b"From: CEO <ceo@(x)auth.test.>\r\n", ("auth.test",), "invalid From header field"),
        (b"From: ceo@(x)auth.test.\r\n", ("auth.test",), "invalid From header field"),
        (b"From: ceo@ (a (b) \\) c)\t(d) auth.test.\r\n", ("auth.test",), "invalid From header field"),
        (b'From: CEO <ceo@"auth.test">\r\n', ("auth.test",), "invalid From header field"),
        (b'From: CEO <ceo@"a\\uth.test".>\r\n', ("auth.test",), "invalid From header field"),
        (b"From: CEO <ceo@auth (x) . test\r\n", ("auth.test",), "invalid From header field"),
        (b"From: CEO <ceo@(x@evil.test)auth.test.>\r\n", ("auth.test", "evil.test"), "invalid From header field"),
        (b"To: b@example.com\r\n", (), "no From header field"),
    ],
)
def test_author_domains_are_every_from_domain(headers: bytes, domains: tuple[str, ...], problem: str) -> None:
    authors = ar.author_domains(ar.header_fields(headers + b"\r\nbody\r\n"))
    assert (authors.domains, authors.problem) == (domains, problem)


class _CountedSearch:
    """Stands in for the comment scanner's pattern and stops a reading that
    scans more than ``budget`` times: a quadratic one fails at once instead
    of running for hours."""

    def __init__(self, pattern: re.Pattern[str], budget: int) -> None:
        self.pattern, self.budget, self.calls = pattern, budget, 0

    def search(self, value: str, pos: int) -> re.Match[str] | None:
        self.calls += 1
        assert self.calls <= self.budget, "comments are reread for every @"
        return self.pattern.search(value, pos)


@pytest.mark.parametrize(
    ("value", "domains"),
    [("@(" * 20_000, ()), ("x@(" + "(a)@" * 10_000 + "auth.test", ("auth.test",))],
)
def test_an_unreadable_from_field_is_read_once_however_many_at_signs(
    monkeypatch: pytest.MonkeyPatch, value: str, domains: tuple[str, ...]
) -> None:
    # Every @ is followed past comments; a comment met again is not reread,
    # so the scans grow with the field, not with its square.
    counted = _CountedSearch(ar._IN_COMMENT, budget=2 * len(value))
    monkeypatch.setattr(ar, "_IN_COMMENT", counted)
    assert ar._candidates(value) == domains
    assert counted.calls > 0


def test_fold_keeps_the_value() -> None:
    value = " ".join(["word"] * 40)
    folded = ar.fold("Authentication-Results", value)
    assert folded.replace("\r\n", "") == value
    assert all(0 < len(line) <= 78 for line in f"Authentication-Results: {folded}".split("\r\n"))


def test_an_overlong_dkim_tag_is_cut_in_authentication_results() -> None:
    # s= and i= are the signer's and as long as it likes; a value is one
    # token, which folding cannot break (RFC 5322 §2.1.1: 998 octets a line).
    result = DkimResult("permerror", "auth.test", "s" * 1200, "x" * 1500 + "@auth.test", "rsa-sha256", reason="no key")
    _, header = ar.authentication_results(HOSTNAME, dkim_plugin.ar_results([result]))
    assert max(len(line) for line in f"Authentication-Results: {header}".split("\r\n")) <= 998
    assert unfold(header) == (
        f"{HOSTNAME}; dkim=permerror (no key) header.d=auth.test header.i={'x' * 256} (cut from 1510 characters) "
        f"header.s={'s' * 256} (cut from 1200 characters) header.a=rsa-sha256"
    )


def test_comments_are_made_safe() -> None:
    assert ar.comment("a (b) \\c\r\n  d") == "a [b] /c d"
    assert len(ar.comment("x" * 500)) == 200


async def test_big_messages_verify_quickly(resolver: Resolver, keys: DNSServer) -> None:
    big = MESSAGE + (b"x" * 998 + b"\r\n") * 5000  # 5 MB
    loop = asyncio.get_running_loop()
    started = loop.time()
    (result,) = await verify(sign(big), resolver)
    assert result.result == "pass"
    assert loop.time() - started < 2.0



@pytest.mark.parametrize("hash_name", ["sha256", "sha1"])
def test_openssl_rsa_verification_agrees_with_dkimpys(hash_name: str) -> None:
    import hashlib
    import random

    import dkim.crypto

    from plugins.dkim import _DKIMPY_RSA_VERIFY, _openssl_key, _rsa_verify
    from tests.fixtures.dkimkeys import new_keypair

    pem, _ = new_keypair()
    private = dkim.crypto.parse_pem_private_key(pem)
    key = {"modulus": private["modulus"], "publicExponent": private["publicExponent"]}
    rng = random.Random(3)
    for _ in range(20):
        data = rng.randbytes(100)
        signature = dkim.crypto.RSASSA_PKCS1_v1_5_sign(hashlib.new(hash_name, data), private)
        tampered = bytes([signature[0] ^ 1]) + signature[1:]
        for sig, body in ((signature, data), (tampered, data), (signature, data + b"x"), (signature[1:], data), (b"\0" + signature, data)):
            expected = _DKIMPY_RSA_VERIFY(hashlib.new(hash_name, body), sig, key)
            assert _rsa_verify(hashlib.new(hash_name, body), sig, key) is expected
        assert _rsa_verify(hashlib.new(hash_name, data), signature, key) is True
    assert _openssl_key.cache_info().hits > 0  # OpenSSL did the work, not the fallback


def _fragments(rng: Any, pieces: tuple[bytes, ...], length: int) -> bytes:
    return b"".join(rng.choice(pieces) for _ in range(length))


def test_faster_canonicalisation_gives_dkimpys_bytes() -> None:
    import random

    from plugins.dkim import (
        _DKIMPY_COMPRESS,
        _DKIMPY_STRIP_TRAILING,
        _DKIMPY_UNFOLD,
        _compress_whitespace,
        _strip_trailing_whitespace,
        _unfold_header_value,
    )

    crafted = [b"", b" ", b"\t", b"  ", b" \t ", b"a b", b"a  b", b"a\tb", b"a \r\n", b"a\t\r\n", b"\r\n \r\n",
               b" \t\r\n", b"a \t \tb \r\n\r\n", b"x" * 100, b"\r\r\n\n", b"\n\r", b"a\r\n b\n\tc\r"]
    rng = random.Random(5)
    pieces = (b" ", b"  ", b"\t", b"a", b"bc", b"\r\n", b"\r", b"\n", b" \r\n", b"\t\r\n")
    generated = [_fragments(rng, pieces, rng.randrange(0, 40)) for _ in range(3000)]
    for content in crafted + generated:
        assert _compress_whitespace(content) == _DKIMPY_COMPRESS(content), content
        assert _strip_trailing_whitespace(content) == _DKIMPY_STRIP_TRAILING(content), content
        assert _unfold_header_value(content) == _DKIMPY_UNFOLD(content), content


def test_faster_message_parsing_gives_dkimpys_headers_and_body() -> None:
    import random

    from plugins.dkim import _DKIMPY_RFC822_PARSE, _rfc822_parse

    crafted = [
        MESSAGE,
        b"",
        b"\r\n",
        b"\r\nbody only\r\n",
        b"A: 1\r\n",
        b"A: 1\r\n\r\n",
        b"A: 1\r\n\r\n\r\n\r\n",
        b"A: 1\r\n folded\r\n\tagain\r\nB:2\r\n\r\nbody\r\n\r\nmore\r\n",
        b"From someone\r\nA: 1\r\n\r\nx",
        b"A: 1\nB: 2\n\nbare LF body\n",
        b"A: 1\r\n\r\nbody with a bare\nLF\r\n",
        b"A: 1\r\r\n\r\nbody\r\r\n",
        b"no colon here\r\n\r\nx",
        b" leading continuation\r\n\r\nx",
        b"A:1\r\nFrom x\r\n\tmore\r\nB\x7f: 2\r\n\r\n",
        b"A:1\r\n:x\r\n\r\n",
        b"A b: 1\r\n\r\n",
        b"A:1\r\r\n\r\n",
    ]
    rng = random.Random(7)
    pieces = (b"A: 1", b"Subject: x", b" cont", b"\tcont", b"\r\n", b"\r\n", b"\r\n\r\n", b"body", b"\n", b"\r", b"From x",
              b"B:", b":", b" ", b"x y:", b"\x7f")
    generated = [b"H: v\r\n" + _fragments(rng, pieces, rng.randrange(0, 30)) for _ in range(3000)]
    crlf_only = tuple(p for p in pieces if p not in (b"\n", b"\r"))  # no fallback to dkimpy's own
    generated += [b"H: v\r\n" + _fragments(rng, crlf_only, rng.randrange(0, 30)) for _ in range(3000)]
    for message in crafted + generated:
        # crlf=True is what a Message passes: the SMTP front ends every line in CRLF.
        flags = (False, True) if message.count(b"\n") == message.count(b"\r\n") == message.count(b"\r") else (False,)
        try:
            expected = _DKIMPY_RFC822_PARSE(message)
        except Exception as exc:  # noqa: BLE001 - the same exception must come out of ours
            for crlf in flags:
                with pytest.raises(type(exc)):
                    _rfc822_parse(message, crlf)
            continue
        for crlf in flags:
            assert _rfc822_parse(message, crlf) == expected, message


def test_faster_signature_value_pattern_removes_what_dkimpys_removes() -> None:
    import random

    from plugins.dkim import _DKIMPY_RE_BTAG, _RE_BTAG

    signed = sign(MESSAGE)
    field = signed.split(b"DKIM-Signature:", 1)[1].split(b"\r\nFrom:")[0] + b"\r\n"
    crafted = [field, field.rstrip(), b"b=", b"; b=abc \r\n", b" b =\r\n a b\r\n", b";bh=xyz; b=\tQ+/=\r\n\t9\n"]
    rng = random.Random(11)
    pieces = (b"b", b"=", b" ", b"\t", b"\r\n", b"\n", b"\r", b";", b"a", b"Z", b"9", b"+", b"/", b"bh=", b"b =", b"-")
    generated = [_fragments(rng, pieces, rng.randrange(0, 30)) for _ in range(5000)]
    for value in crafted + generated:
        assert _RE_BTAG.sub(b"\\1", value) == _DKIMPY_RE_BTAG.sub(b"\\1", value), value
    assert _RE_BTAG.sub(b"\\1", b" a=1; b=xyz; c=2") == b" a=1; b=; c=2"


def test_whitespace_removal_gives_what_dkimpys_pattern_gives() -> None:
    import random
    import re

    from plugins.dkim import _sub

    every_byte = [bytes([b]) for b in range(256)] + [b"a" + bytes([b]) + b"b" for b in range(256)]
    rng = random.Random(19)
    pieces = (b" ", b"\t", b"\r\n", b"\n", b"\r", b"\x0b", b"\x0c", b"\x1c", b"\x85", b"\xa0", b"A", b"9", b"+", b"=")
    generated = [_fragments(rng, pieces, rng.randrange(0, 30)) for _ in range(3000)]
    for value in [b"", sign(MESSAGE)] + every_byte + generated:
        assert _sub(rb"\s+", b"", value) == re.sub(rb"\s+", b"", value), value
    # Any other call is the stdlib's.
    assert _sub(rb"\s+", b"-", b"a  b") == b"a-b"
    assert _sub(r"\s+", "", "a \u2003b") == "ab"
    assert _sub(rb"\s+", b"", b"a b c", 1) == b"ab c"


def test_dkimpy_sees_the_faster_whitespace_removal_and_the_rest_of_re() -> None:
    import re

    assert dkim.re.sub is dkim_plugin._sub
    assert dkim.re.match is re.match and dkim.re.split is re.split and dkim.re.findall is re.findall
    assert re.sub is not dkim_plugin._sub  # the stdlib module is left alone


def test_header_selection_gives_dkimpys_fields() -> None:
    import random

    from plugins.dkim import _DKIMPY_SELECT_HEADERS, _select_headers

    rng = random.Random(13)
    names = (b"from", b"From", b"FROM", b"to", b"subject", b"x", b"dkim-signature")
    for _ in range(3000):
        headers = [(rng.choice(names), str(i).encode()) for i in range(rng.randrange(0, 12))]
        include = [rng.choice(names).lower() for _ in range(rng.randrange(0, 12))]
        assert _select_headers(headers, list(include)) == _DKIMPY_SELECT_HEADERS(headers, list(include))


def test_header_selection_takes_time_in_proportion() -> None:
    # dkimpy scanned every field for each name in h=: 10,000 names absent
    # from 10,000 fields (120 KB, under the size of a message verified in
    # the event loop) took it about 10 s.
    import time

    from plugins.dkim import _select_headers

    headers = [(b"x%d" % i, b"v") for i in range(10_000)] + [(b"from", b"a@auth.test")]
    include = [b"h%d" % i for i in range(10_000)] + [b"from"]
    started = time.process_time()
    assert _select_headers(headers, include) == [(b"from", b"a@auth.test")]
    assert time.process_time() - started < 1.0


def test_dkimpy_uses_the_faster_functions() -> None:
    # The replacements are installed where dkimpy looks them up.
    from plugins.dkim import _compress_whitespace, _rfc822_parse, _strip_trailing_whitespace

    assert dkim.rfc822_parse is _rfc822_parse
    assert dkim.select_headers is dkim_plugin._select_headers
    assert dkim.RE_BTAG is dkim_plugin._RE_BTAG
    assert dkim.canonicalization.compress_whitespace is _compress_whitespace
    assert dkim.canonicalization.strip_trailing_whitespace is _strip_trailing_whitespace
    assert dkim.canonicalization.unfold_header_value is dkim_plugin._unfold_header_value


def test_tag_list_parsing_gives_dkimpys_tags_and_errors() -> None:
    import random

    from plugins.dkim import _DKIMPY_PARSE_TAG_VALUE, _parse_tag_value

    signed = sign(MESSAGE)
    field = signed.split(b"DKIM-Signature:", 1)[1].split(b"\r\nFrom:")[0]
    crafted = [field, b"", b";", b"a=1;", b"a=1;;", b"=1", b" a = 1 ; b=2=3 ", b"1a=2", b"_a=1", b"a", b"a=1; a=2",
               b"\xe9=1", b"a\tb=1", b"A=", b" ; a=1"]
    rng = random.Random(17)
    pieces = (b"a", b"B", b"1", b"_", b"=", b";", b" ", b"\t", b"\r\n", b"v=1", b"h=from:to", b"\xff", b"-")
    generated = [_fragments(rng, pieces, rng.randrange(0, 20)) for _ in range(5000)]
    for value in crafted + generated:
        try:
            expected = _DKIMPY_PARSE_TAG_VALUE(value)
        except Exception as exc:  # noqa: BLE001 - the same exception must come out of ours
            with pytest.raises(type(exc)) as raised:
                _parse_tag_value(value)
            assert raised.value.args == exc.args, value
            continue
        assert _parse_tag_value(value) == expected, value
    assert dkim.parse_tag_value is _parse_tag_value
