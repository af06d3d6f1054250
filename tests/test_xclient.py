"""XCLIENT attributes as the SMTP front takes them (the command itself,
who may send it and what follows, is in tests/e2e/)."""

import ipaddress

import pytest

from gateway.xclient import Refused, session_changes


def refusal(arg: str) -> str:
    with pytest.raises(Refused) as caught:
        session_changes(arg)
    return str(caught.value.reply)


def test_a_new_address_forgets_the_previous_clients_names() -> None:
    assert session_changes("ADDR=203.0.113.7") == {
        "client_ip": ipaddress.ip_address("203.0.113.7"),
        "client_name": "unknown", "reverse_name": "unknown", "name_tempfail": False, "reverse_tempfail": False,
    }


def test_names_port_helo_and_proto() -> None:
    changes = session_changes("addr=IPV6:2001:db8::1 NAME=mx.example.net REVERSE_NAME=[TEMPUNAVAIL] "
                              "PORT=2525 HELO=mx+2Eexample.net PROTO=esmtp DESTADDR=192.0.2.1 DESTPORT=25")
    assert changes == {
        "client_ip": ipaddress.ip_address("2001:db8::1"),
        "client_name": "mx.example.net", "name_tempfail": False,
        "reverse_name": "unknown", "reverse_tempfail": True,
        "client_port": 2525, "helo": "mx.example.net", "protocol": "ESMTP",
    }


def test_xtext_octets_are_utf_8() -> None:
    assert session_changes("HELO=b+C3+BCcher.example")["helo"] == "b\u00fccher.example"


def test_an_ipv4_mapped_address_is_the_ipv4_client() -> None:
    assert session_changes("ADDR=IPV6:::ffff:192.0.2.9")["client_ip"] == ipaddress.ip_address("192.0.2.9")


def test_destination_attributes_are_checked_and_dropped() -> None:
    assert session_changes("DESTADDR=192.0.2.1 DESTPORT=25") == {}
    assert session_changes("DESTADDR=ipv6:2001:db8::25 DESTPORT=[UNAVAILABLE]") == {}
    assert session_changes("DESTADDR=[unavailable] DESTPORT=00025") == {}


def test_unavailable_values_are_unknown() -> None:
    assert session_changes("NAME=[UNAVAILABLE] PORT=[UNAVAILABLE] HELO=[UNAVAILABLE]") == {
        "client_name": "unknown", "name_tempfail": False, "client_port": 0, "helo": None,
    }


@pytest.mark.parametrize("arg,attribute", [
    ("ADDR=not-an-ip", "ADDR=not-an-ip"),
    ("ADDR=IPV6:fe80::1%eth0", "ADDR=IPV6:fe80::1%eth0"),  # names no host beyond a link
    # As Postfix reads ADDR: IPv6 only behind IPV6:, and nothing else there.
    ("ADDR=2001:db8::1", "ADDR=2001:db8::1"),
    ("ADDR=::ffff:192.0.2.9", "ADDR=::ffff:192.0.2.9"),
    ("ADDR=IPV6:192.0.2.9", "ADDR=IPV6:192.0.2.9"),
    ("NAME=bad_name!", "NAME=bad_name!"),
    ("PORT=65536", "PORT=65536"),
    ("PORT=\u0663", "PORT=\u0663"),  # a digit, but not ASCII
    ("PROTO=LMTP", "PROTO=LMTP"),
    ("LOGIN=alice", "LOGIN=alice"),  # we take no word for who authenticated
    ("HELO", "HELO"),
    ("HELO=" + "a" * 256, "HELO=" + "a" * 256),
    # xtext may encode any byte, a line break too: one for our log lines
    ("HELO=mx.example.net+0D+0Aforged=yes", "HELO=mx.example.net+0D+0Aforged=yes"),
    ("HELO=a+00b", "HELO=a+00b"),
    ("HELO=a+C2+85b", "HELO=a+C2+85b"),  # U+0085, a C1 control (NEXT LINE)
    ("HELO=a+FFb", "HELO=a+FFb"),  # no UTF-8
    ("NAME=[UNAVAILABLE]+09", "NAME=[UNAVAILABLE]+09"),
    # Not forwarded, but held to Postfix's syntax all the same.
    ("DESTADDR=bogus", "DESTADDR=bogus"),
    ("DESTADDR=192.0.2", "DESTADDR=192.0.2"),
    ("DESTADDR=IPV6:192.0.2.1", "DESTADDR=IPV6:192.0.2.1"),
    ("DESTADDR=[TEMPUNAVAIL]", "DESTADDR=[TEMPUNAVAIL]"),
    ("DESTADDR=IPV6:fe80::1%eth0", "DESTADDR=IPV6:fe80::1%eth0"),
    ("DESTADDR", "DESTADDR"),
    ("DESTPORT=x", "DESTPORT=x"),
    ("DESTPORT=-1", "DESTPORT=-1"),
    ("DESTPORT=000025", "DESTPORT=000025"),  # six digits
    ("DESTPORT=65536", "DESTPORT=65536"),
    ("DESTPORT=[TEMPUNAVAIL]", "DESTPORT=[TEMPUNAVAIL]"),
])
def test_a_bad_attribute_is_named(arg: str, attribute: str) -> None:
    assert refusal(arg) == f"501 5.5.4 Bad XCLIENT attribute: {attribute}"


def test_an_unavailable_address_is_refused_not_kept() -> None:
    # Keeping the address before it would let this client pass as that one.
    assert refusal("NAME=mx.example.net ADDR=[UNAVAILABLE]") == (
        "501 5.5.4 Bad XCLIENT attribute: ADDR=[UNAVAILABLE]: the client's address is required"
    )
