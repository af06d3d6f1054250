import pytest

from gateway.address import PathError, is_domain, parse_path, to_ascii_domain


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
        "FROM:<a@example.com> SIZE=",
        "TO:<a@example.com>",
        "FROM:<\u00e4@example.com>",
    ],
)
def test_invalid_paths(arg: str) -> None:
    with pytest.raises(PathError):
        parse_path(arg, "FROM")


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
