"""Every reply constant is well-formed: the enhanced code's class matches the
basic code (RFC 3463 §3.1), so a 5yz never carries a 4.x.x by accident."""

import pytest

from gateway import replies
from gateway.replies import Reply

CONSTANTS = {name: value for name, value in vars(replies).items() if isinstance(value, Reply)}


@pytest.mark.parametrize("name", sorted(CONSTANTS))
def test_enhanced_class_matches_basic_code(name: str) -> None:
    reply = CONSTANTS[name]
    assert 200 <= reply.code <= 599
    if reply.enhanced:
        assert reply.enhanced[0] == str(reply.code)[0], name
        assert reply.enhanced.count(".") == 2


def test_wire_multiline_repeats_code_and_enhanced() -> None:
    assert Reply(250, "2.0.0", "a\nb").wire() == b"250-2.0.0 a\r\n250 2.0.0 b\r\n"
    assert Reply(250, "", "host\nPIPELINING").wire() == b"250-host\r\n250 PIPELINING\r\n"


@pytest.mark.parametrize(
    "code,message",
    [
        (550, "5.1.1 <x@example.com>: Recipient address rejected: User unknown"),
        (250, "2.0.0 Ok: queued as 4ABC"),
        (250, "mx.example\nPIPELINING\nSIZE 100"),
        (451, "4.3.0 first\n4.3.0 second"),
        (554, "5.7.1 first\nsecond without code"),
        (220, "mx ESMTP"),
    ],
)
def test_parse_then_wire_is_verbatim(code: int, message: str) -> None:
    wire = Reply.parse(code, message).wire()
    lines = message.split("\n")
    expected = "".join(f"{code}-{ln}\r\n" for ln in lines[:-1]) + f"{code} {lines[-1]}\r\n"
    assert wire == expected.encode()


def test_parse_splits_enhanced_code() -> None:
    reply = Reply.parse(550, "5.1.1 <x>: User unknown")
    assert (reply.code, reply.enhanced, reply.text) == (550, "5.1.1", "<x>: User unknown")


def test_a_cr_inside_a_line_cannot_end_it() -> None:
    assert Reply(554, "5.7.1", "listed; reason\rINJECTED").wire() == b"554 5.7.1 listed; reason INJECTED\r\n"


def test_an_empty_text_leaves_no_trailing_blank() -> None:
    assert Reply.parse(250, "").wire() == b"250\r\n"
    assert Reply(250, "2.0.0", "").wire() == b"250 2.0.0\r\n"
