import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.address import PathError, _closing_bracket, is_domain, parse_path, to_ascii_domain


@pytest.mark.parametrize(
    "arg,local,domain,route,params",
    [
        ("FROM:<a@example.com>", "a", "example.com", "", ()),
        ("from:<a@example.com>", "a", "example.com", "", ()),
        ("FROM: <a@example.com>", "a", "example.com", "", ()),
        ("FROM:<>", "", "", "", ()),
        ("FROM:<a@example.com> SIZE=100 BODY=8BITMIME", "a", "example.com", "", (("SIZE", "100"), ("BODY", "8BITMIME"))),
        ('FROM:<"a b>c"@example.com>', '"a b>c"', "example.com", "", ()),
        ("FROM:<@relay.example,@r2.example:a@example.com>", "a", "example.com", "@relay.example,@r2.example:", ()),
        ("FROM:<a@[192.0.2.1]>", "a", "[192.0.2.1]", "", ()),
        ("FROM:a@example.com", "a", "example.com", "", ()),
    ],
)
def test_valid_paths(arg, local, domain, route, params) -> None:
    address, got_params, _ = parse_path(arg, "FROM")
    assert (address.local, address.domain, address.route, got_params) == (local, domain, route, params)


def test_params_text_is_kept_verbatim() -> None:
    _, _, text = parse_path("TO:<a@example.com> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;a@example.com", "TO")
    assert text == "NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;a@example.com"


def test_postmaster_without_domain_only_for_rcpt() -> None:
    address, _, _ = parse_path("TO:<Postmaster>", "TO")
    assert address.local == "Postmaster" and address.domain == ""
    with pytest.raises(PathError):
        parse_path("FROM:<Postmaster>", "FROM")


@pytest.mark.parametrize(
    "arg",
    [
        "FROM:<a@b@example.com>",
        "FROM:<a@example.com.>",
        "FROM:<a@-example.com>",
        "FROM:<a..b@example.com>",
        "FROM:<a@example.com",
        "FROM:<a@example.com>x",
        "FROM:<a b@example.com>",
        "FROM:<a@example.com> =x",
        "TO:<a@example.com>",
        "FROM:<\u00e4@example.com>",
    ],
)
def test_invalid_paths(arg: str) -> None:
    with pytest.raises(PathError):
        parse_path(arg, "FROM")


def test_a_parameter_value_is_left_to_the_parameter() -> None:
    # Postfix judges a value by its parameter ("Bad message size syntax",
    # "Unsupported option: FOO="): the path parser only splits them.
    assert parse_path("FROM:<a@example.com> SIZE= FOO=a=b", "FROM")[1] == (("SIZE", ""), ("FOO", "a=b"))


def test_empty_recipient_is_invalid() -> None:
    with pytest.raises(PathError):
        parse_path("TO:<>", "TO")


def test_utf8_addresses_only_with_smtputf8() -> None:
    address, _, _ = parse_path("FROM:<\u00e4@b\u00fccher.example> SMTPUTF8", "FROM", utf8=True)
    assert address.mailbox == "\u00e4@b\u00fccher.example"


def test_quoted_local_unquoted() -> None:
    address, _, _ = parse_path('TO:<"a\\"b@c"@example.com>', "TO")
    assert address.local_unquoted == 'a"b@c'


@pytest.mark.parametrize("text,ok", [("example.com", True), ("[192.0.2.1]", True), ("a_b.example", False), ("", False), ("x.", False)])
def test_is_domain(text: str, ok: bool) -> None:
    assert is_domain(text) is ok


@pytest.mark.parametrize("name,ascii_name", [
    ("example.org", "example.org"),
    ("straße.example", "xn--strae-oqa.example"),  # not strasse.example (IDNA2003)
    ("BÜCHER.example", "xn--bcher-kva.example"),
])
def test_to_ascii_domain(name: str, ascii_name: str) -> None:
    assert to_ascii_domain(name) == ascii_name


def test_to_ascii_domain_refuses_what_idna_cannot_convert() -> None:
    with pytest.raises(UnicodeError):
        to_ascii_domain("a\u200db.example")  # a ZERO WIDTH JOINER out of context


def test_may_be_ip_is_false_only_where_ip_address_fails() -> None:
    import ipaddress
    import random

    from gateway.address import may_be_ip

    crafted = ["", ".", "1", "1.2.3.4", "01.2.3.4", "1.2.3.4.", " 1.2.3.4", "::", "::1", "fe80::1%eth0", "1::", "a.b",
               "mail.example.org", "[1.2.3.4]", "٣.1.1.1", "１.2.3.4", "1.2.3", "256.1.1.1", "0x1.1.1.1", "1e3"]
    rng = random.Random(23)
    pieces = ("1", "0", "9", "25", ".", ":", "a", "f", "%", "x", " ", "٣", "::", "255")
    generated = ["".join(rng.choice(pieces) for _ in range(rng.randrange(0, 10))) for _ in range(20000)]
    for text in crafted + generated:
        try:
            ipaddress.ip_address(text)
        except ValueError:
            continue
        assert may_be_ip(text), text
    assert not may_be_ip("mail.example.org") and not may_be_ip("٣.1.1.1")
    assert may_be_ip("1.2.3.4") and may_be_ip("::1")


def _closing_bracket_by_hand(text: str) -> int | None:
    quoted, i = False, 1
    while i < len(text):
        if quoted and text[i] == "\\":
            i += 1
        elif text[i] == '"':
            quoted = not quoted
        elif text[i] == ">" and not quoted:
            return i
        i += 1
    return None


@given(st.text(alphabet='<>"\\a@ ', max_size=12).map(lambda t: "<" + t))
def test_the_closing_bracket_is_found_past_quoted_strings(text: str) -> None:
    # _closing_bracket finds it without a loop when nothing is quoted before
    # the first ">": the same answer as a walk over every character.
    expected = _closing_bracket_by_hand(text)
    if expected is None:
        with pytest.raises(PathError):
            _closing_bracket(text)
    else:
        assert _closing_bracket(text) == expected


def test_a_mailbox_is_parsed_once_and_a_refused_one_every_time() -> None:
    from gateway.address import MAILBOX_CACHE_SIZE, _parse_mailbox

    _parse_mailbox.cache_clear()
    first, _, _ = parse_path("FROM:<cached@example.com>", "FROM")
    again, _, _ = parse_path("FROM:<cached@example.com> SIZE=10", "FROM")
    assert again is first and _parse_mailbox.cache_info().hits == 1
    # The keyword and SMTPUTF8 are part of what is cached: Postmaster
    # without a domain is a recipient only.
    assert parse_path("TO:<Postmaster>", "TO")[0].local == "Postmaster"
    with pytest.raises(PathError):
        parse_path("FROM:<Postmaster>", "FROM")
    assert parse_path("FROM:<ü@example.com>", "FROM", utf8=True)[0].local == "ü"
    with pytest.raises(PathError):
        parse_path("FROM:<ü@example.com>", "FROM")
    # Refused addresses are not kept, so they raise again.
    for _ in range(2):
        with pytest.raises(PathError):
            parse_path("FROM:<a@@example.com>", "FROM")
    # Bounded: the least recently used mailbox goes.
    for i in range(MAILBOX_CACHE_SIZE + 1):
        parse_path(f"FROM:<a{i}@example.com>", "FROM")
    assert _parse_mailbox.cache_info().currsize == MAILBOX_CACHE_SIZE
    assert parse_path("FROM:<cached@example.com>", "FROM")[0] is not first
