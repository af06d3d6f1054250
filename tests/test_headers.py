"""Edits of the raw header block: fields put in front, fields removed, and
whether an Authentication-Results field claims our authserv-id."""

import pytest

from gateway.headers import claims_authserv_id, claims_receiver, field_value, prepend, remove_fields

MESSAGE = (
    b"Received: from a\r\n\tby b\r\n"
    b"Authentication-Results: gw.example; spf=pass\r\n"
    b"Subject: Authentication-Results: gw.example\r\n"
    b"Authentication-Results: other.example;\r\n dkim=pass\r\n"
    b"\r\n"
    b"Authentication-Results: gw.example; in the body\r\n"
)


def test_prepend_puts_fields_first_in_order() -> None:
    assert prepend(b"Subject: x\r\n\r\nbody\r\n", [("X-A", "1"), ("X-B", "2")]) == (
        b"X-A: 1\r\nX-B: 2\r\nSubject: x\r\n\r\nbody\r\n")


def test_prepend_nothing_keeps_the_message() -> None:
    raw = b"Subject: x\r\n\r\nbody\r\n"
    assert prepend(raw, []) is raw


def test_remove_fields_drops_whole_folded_fields_and_nothing_else() -> None:
    out = remove_fields(MESSAGE, "Authentication-Results", lambda f: b"other.example" in f)
    assert out == (
        b"Received: from a\r\n\tby b\r\n"
        b"Subject: Authentication-Results: gw.example\r\n"
        b"Authentication-Results: other.example;\r\n dkim=pass\r\n"
        b"\r\n"
        b"Authentication-Results: gw.example; in the body\r\n"
    )


def test_remove_fields_sees_the_obsolete_blank_before_the_colon() -> None:
    raw = b"authentication-results \t: gw.example; spf=pass\r\nSubject: x\r\n\r\nbody\r\n"
    assert remove_fields(raw, "Authentication-Results", lambda f: False) == b"Subject: x\r\n\r\nbody\r\n"


def test_remove_fields_without_a_match_returns_the_message_itself() -> None:
    raw = b"Subject: x\r\n\r\nAuthentication-Results: only in the body\r\n"
    assert remove_fields(raw, "Authentication-Results", lambda f: False) is raw


def test_remove_fields_in_a_message_without_a_body() -> None:
    raw = b"Authentication-Results: gw.example; spf=pass\r\nSubject: x\r\n"
    assert remove_fields(raw, "Authentication-Results", lambda f: False) == b"Subject: x\r\n"


@pytest.mark.parametrize("field,claims", [
    (b"Authentication-Results: gw.example; spf=pass", True),
    (b"Authentication-Results: GW.Example.; spf=pass", True),
    (b"Authentication-Results: (a (nested) comment) gw.example; spf=pass", True),
    (b'Authentication-Results: "gw.example"; spf=pass', True),
    (b"Authentication-Results:\r\n gw.example\r\n ; dkim=pass", True),
    (b"Authentication-Results: gw.example.evil; spf=pass", False),
    (b"Authentication-Results: other.example; x=gw.example", False),
    (b"Authentication-Results: (gw.example) other.example; spf=pass", False),
    (b"Authentication-Results: ;", False),
])
def test_claims_authserv_id(field: bytes, claims: bool) -> None:
    assert claims_authserv_id(field, "gw.example") is claims


@pytest.mark.parametrize("field,claims", [
    (b"Received-SPF: pass (gw.example: domain of a@b.example designates 192.0.2.1 as permitted sender)"
     b" receiver=gw.example; client-ip=192.0.2.1;", True),
    (b"Received-SPF: pass receiver=GW.Example.; client-ip=192.0.2.1", True),
    (b'Received-SPF: pass client-ip=192.0.2.1; receiver="gw.example";', True),
    (b"Received-SPF: pass\r\n (gw.example: domain of a@b.example designates 192.0.2.1 as permitted sender)", True),
    (b"Received-SPF: pass (mx.other.example: ...) receiver=mx.other.example;", False),
    (b"Received-SPF: pass (says receiver=gw.example) receiver=mx.other.example;", False),
    (b"Received-SPF: pass receiver=gw.example.evil; helo=gw.example;", False),
    (b"Received-SPF: none", False),
])
def test_claims_receiver(field: bytes, claims: bool) -> None:
    assert claims_receiver(field, "gw.example") is claims


@pytest.mark.parametrize("value,safe", [
    ("plain", "plain"),
    ("a;\r\n\tb=c", "a;\r\n\tb=c"),  # a fold stays a fold
    ("ok\r\nX-Injected: yes", "ok\r\n\tX-Injected: yes"),
    ("bare\nX-Injected: yes", "bare\r\n\tX-Injected: yes"),
    ("lone\rcr", "lone\r\n\tcr"),
    ("trailing\r\n", "trailing"),
])
def test_field_value_cannot_start_a_new_field(value: str, safe: str) -> None:
    assert field_value(value) == safe


def test_prepend_refuses_what_is_not_a_field_name() -> None:
    with pytest.raises(ValueError):
        prepend(b"Subject: x\r\n\r\n", [("X-Bad: injected\r\nX-A", "1")])


def test_remove_fields_takes_several_names_in_one_pass() -> None:
    raw = b"X-Spam-Status: No\r\nx-spam-score : -9\r\nX-Spam-Level: *\r\nSubject: s\r\n\r\nX-Spam-Status: body\r\n"
    assert remove_fields(raw, ("X-Spam-Status", "X-Spam-Score"), lambda f: False) == (
        b"X-Spam-Level: *\r\nSubject: s\r\n\r\nX-Spam-Status: body\r\n")


@pytest.mark.parametrize("value", [
    "word " * 400,                      # many short words: folded
    "x" * 2000,                         # one word too long for any line: cut
    "ok\r\n\t" + "y " * 600,            # folded already, a continuation too long
    " ".join(["\u00e9" * 100] * 9),      # UTF-8: 200 octets a word, counted as octets
    "\u00e9" * 1000,                      # one UTF-8 word too long: cut on a character
])
def test_prepend_keeps_every_line_within_998(value: str) -> None:
    out = prepend(b"\r\nbody\r\n", [("X-Long", value)])
    head = out.split(b"\r\n\r\n", 1)[0]
    assert max(len(line) for line in head.split(b"\r\n")) <= 998
    assert head.startswith(b"X-Long: ")
    assert all(line[:1] in (b" ", b"\t") for line in head.split(b"\r\n")[1:])  # one field
    if "x" * 2000 not in value and "\u00e9" * 1000 not in value:
        assert head.replace(b"\r\n", b"").split() == (b"X-Long: " + value.replace("\r\n", "").encode()).split()
