"""Units of the SMTP front that need no network (the rest is in tests/e2e/)."""

from gateway.smtp import _field_lines


def test_our_header_fields_end_every_line_in_crlf() -> None:
    # The next hop takes the message's line ends on trust (data(crlf=True));
    # field_value leaves a fold made with a bare LF as it is.
    assert _field_lines([("X-Folded", "one\n\ttwo"), ("X-Plain", "three")]) == (
        b"X-Folded: one\r\n\ttwo\r\nX-Plain: three\r\n"
    )


def test_line_ends_are_made_crlf_as_the_pattern_would() -> None:
    import random
    import re

    from gateway.smtp import _crlf_ends

    pattern = re.compile(rb"\r\n|\r|\n")
    crafted = [b"", b"\r", b"\n", b"\r\n", b"\n\r", b"\r\r\n", b"\r\n\n", b"\r\r", b"\n\n", b"a\rb\nc\r\nd"]
    rng = random.Random(23)
    pieces = (b"\r", b"\n", b"\r\n", b"a", b" ", b"\t")
    generated = [b"".join(rng.choice(pieces) for _ in range(rng.randrange(0, 20))) for _ in range(3000)]
    for data in crafted + generated:
        assert _crlf_ends(data) == pattern.sub(b"\r\n", data), data
