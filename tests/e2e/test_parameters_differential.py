"""MAIL and RCPT parameters, said to Postfix and to the gateway in front of
it: the client hears the same reply, code and words, from either."""

import socket

import pytest

from tests.fixtures.gateway import OUTSIDE_IP, recv_reply
from tests.fixtures.postfix import PostfixInstance

MAIL = "MAIL FROM:<bob@example.org>"
RCPT = "RCPT TO:<alice@example.com>"

MAIL_PARAMETERS = [
    "FOO=bar", "FOO", "FOO=", "=x", "x=\u00e4",
    "SIZE=abc", "SIZE=", "SIZE", "SIZE=-1", "SIZE=\u00b2", "SIZE=10 SIZE=20",
    "SIZE=99999999999", "SIZE=9223372036854775807", "SIZE=9223372036854775808", "SIZE=99999999999999999999",
    "BODY=9BIT", "BODY", "BODY=", "BODY=binarymime", "body=8bitmime", "BODY=7BIT BODY=8BITMIME",
    "SMTPUTF8=yes", "SMTPUTF8=", "smtputf8",
    "RET=XYZ", "RET", "RET=", "ret=hdrs", "RET=HDRS RET=FULL",
    "ENVID", "ENVID=", "ENVID=a+2", "ENVID=a+2b", "ENVID=a+ZZ", "ENVID=a+00", "ENVID=+00", "ENVID=a=b",
    "ENVID=a b", "ENVID=a ENVID=b", "ENVID=\u00e4", "ENVID=" + "x" * 200,
    "AUTH=<>", "AUTH=<> AUTH=<>", "AUTH=a@b AUTH=<>", "AUTH=<> AUTH=a@b",
    "NOTIFY=NEVER", "ORCPT=rfc822;a@b",
]

RCPT_PARAMETERS = [
    "FOO=bar", "SIZE=10", "RET=HDRS", "SMTPUTF8", "BODY=8BITMIME",
    "NOTIFY=BOGUS", "NOTIFY", "NOTIFY=", "NOTIFY=NEVER,SUCCESS", "NOTIFY=SUCCESS NOTIFY=FAILURE",
    "NOTIFY=success,,failure", "NOTIFY=,NEVER", "notify=delay",
    "ORCPT", "ORCPT=rfc822", "ORCPT=rfc822;", "ORCPT=bogus;a@b", "ORCPT=rfc822;a+ZZ", "ORCPT=;a@b",
    "ORCPT=rfc822;a;b", "ORCPT=rfc822;a@b ORCPT=rfc822;a@b",
]


def replies(port: int, commands: list[str]) -> list[bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        recv_reply(sock)
        out = []
        for command in [f"XCLIENT ADDR={OUTSIDE_IP} NAME=[UNAVAILABLE]", "EHLO client.example.net", *commands]:
            sock.sendall(command.encode() + b"\r\n")
            out.append(recv_reply(sock))
    return out[2:]


def test_mail_and_rcpt_parameters_are_answered_as_postfix_answers_them(start_gateway, postfix) -> None:
    gateway = start_gateway(f"127.0.0.1:{postfix.port}")
    dialogues = [[f"{MAIL} {p}"] for p in MAIL_PARAMETERS] + [[MAIL, f"{RCPT} {p}"] for p in RCPT_PARAMETERS]
    differ = []
    for commands in dialogues:
        expected, got = replies(postfix.port, commands), replies(gateway.port, commands)
        if got != expected:
            differ.append((commands[-1], expected[-1], got[-1]))
    assert differ == []


@pytest.fixture(scope="module")
def postfix_without_dsn(tmp_path_factory: pytest.TempPathFactory):
    with PostfixInstance(tmp_path_factory.mktemp("postfix-nodsn"),
                         extra_main_cf={"smtpd_discard_ehlo_keywords": "dsn"}) as instance:
        yield instance


@pytest.mark.parametrize("commands", [
    [f"{MAIL} RET=HDRS"], [f"{MAIL} ENVID=x"], [f"{MAIL} RET"],
    [MAIL, f"{RCPT} NOTIFY=NEVER"], [MAIL, f"{RCPT} ORCPT=rfc822;a@b"], [MAIL, f"{RCPT} NOTIFY"],
])
def test_dsn_parameters_where_dsn_is_withheld_are_answered_as_postfix_answers_them(
        start_gateway, postfix_without_dsn, commands: list[str]) -> None:
    # Postfix offers us no DSN, so neither do we; a client that uses it
    # anyway hears Postfix's 501 5.7.1, not our own words for it.
    gateway = start_gateway(f"127.0.0.1:{postfix_without_dsn.port}")
    assert replies(gateway.port, commands) == replies(postfix_without_dsn.port, commands)
