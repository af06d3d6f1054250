"""Units of the SMTP front that need no network (the rest is in tests/e2e/)."""

from gateway.smtp import _field_lines


def test_our_header_fields_end_every_line_in_crlf() -> None:
    # The next hop takes the message's line ends on trust (data(crlf=True));
    # field_value leaves a fold made with a bare LF as it is.
    assert _field_lines([("X-Folded", "one\n\ttwo"), ("X-Plain", "three")]) == (
        b"X-Folded: one\r\n\ttwo\r\nX-Plain: three\r\n"
    )
