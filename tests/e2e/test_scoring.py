"""Scores summed per transaction against [scoring] thresholds; monitor mode;
headers from plugins; forged Authentication-Results removed."""

import logging

from gateway import Plugin, Verdict, hookimpl
from tests.fixtures.gateway import OUTSIDE_IP, TRUSTED_IP
from tests.fixtures.testplugins import Boom, Scorer, Tagger

MSG = b"Subject: scored\r\n\r\nbody\r\n"
EXTRA = {"scorer": Scorer, "tagger": Tagger, "boom": Boom}


def start(start_gateway, postfix, plugins=("scorer",), **kw):
    table = {name: {} for name in plugins}
    return start_gateway(f"127.0.0.1:{postfix.port}", plugins=table, extra=EXTRA, **kw)


def send(smtp, *rcpts):
    smtp.mail("bob@example.org")
    for rcpt in rcpts:
        assert smtp.rcpt(rcpt)[0] == 250
    return smtp.data(MSG)


def test_scores_are_recorded_in_headers(start_gateway, postfix) -> None:
    gw = start(start_gateway, postfix, plugins=("scorer", "tagger"))
    with gw.client(xclient=TRUSTED_IP) as smtp:
        assert send(smtp, "s3@remote.example", "alice@example.com")[0] == 250
    (delivered,) = postfix.wait_for_messages("alice")
    assert b"X-Spam-Score: 3.0\n" in delivered
    assert b"X-Spam-Status: No, score=3.0 tests=scorer:score-s3(3)\n" in delivered
    assert b"X-Test-Tag: size=" in delivered


def test_thresholds(start_gateway, postfix) -> None:
    gw = start(start_gateway, postfix, scoring={"reject": 10.0, "defer": 6.0, "tag": 2.0})
    with gw.client(xclient=TRUSTED_IP) as smtp:
        assert send(smtp, "s4@remote.example", "s7@remote.example", "alice@example.com") == (
            554, b"5.7.1 Error: message rejected as spam (score 11.0)")
        assert send(smtp, "s7@remote.example", "alice@example.com") == (
            451, b"4.7.1 Error: message deferred, spam score 7.0, try again later")
        assert send(smtp, "s3@remote.example", "alice@example.com")[0] == 250
    (delivered,) = postfix.wait_for_messages("alice")
    assert b"X-Spam-Status: Yes, score=3.0 required=2.0 tests=scorer:score-s3(3)\n" in delivered


def test_judged_at_rcpt_when_the_policy_says_so(start_gateway, postfix) -> None:
    gw = start(start_gateway, postfix, scoring={"reject": 5.0, "stage": "rcpt"})
    with gw.client(xclient=TRUSTED_IP) as smtp:
        smtp.mail("bob@example.org")
        assert smtp.rcpt("s6@remote.example") == (554, b"5.7.1 Error: message rejected as spam (score 6.0)")


def test_at_rcpt_a_score_found_in_the_message_is_judged_at_data(start_gateway, postfix) -> None:
    gw = start(start_gateway, postfix, scoring={"reject": 5.0, "stage": "rcpt"})
    with gw.client(xclient=TRUSTED_IP) as smtp:
        smtp.mail("bob@example.org")
        assert smtp.rcpt("s2@remote.example")[0] == 250
        assert smtp.rcpt("alice@example.com")[0] == 250
        assert smtp.data(b"X-Test-Score: 4\r\nSubject: scored\r\n\r\nbody\r\n") == (
            554, b"5.7.1 Error: message rejected as spam (score 6.0)")
        assert send(smtp, "s2@remote.example", "alice@example.com")[0] == 250
    (delivered,) = postfix.wait_for_messages("alice")
    assert b"X-Spam-Status: No, score=2.0 required=5.0 tests=scorer:score-s2(2)\n" in delivered


def test_monitor_mode_refuses_nothing_and_logs_what_it_would_have_done(start_gateway, postfix, caplog) -> None:
    gw = start(start_gateway, postfix, plugins=("scorer", "boom"), scoring={"reject": 1.0}, monitor=True)
    with caplog.at_level(logging.INFO, "smtpgate"):
        with gw.client(xclient=TRUSTED_IP) as smtp:
            assert send(smtp, "boom@remote.example", "s5@remote.example", "alice@example.com")[0] == 250
    postfix.wait_for_messages("alice")
    assert "rcpt monitor: client=unknown[198.51.100.7]" in caplog.text
    assert "data monitor: client=unknown[198.51.100.7]" in caplog.text
    assert 'result=would reject: scorer:score-s5(5) reply="554 5.7.1 Error: message rejected as spam (score 5.0)"' in caplog.text


def test_monitor_mode_never_opens_the_relay(start_gateway, postfix, caplog) -> None:
    gw = start(start_gateway, postfix, plugins=("scorer",), scoring={"reject": 1.0}, monitor=True)
    with caplog.at_level(logging.INFO, "smtpgate"):
        with gw.client(xclient=OUTSIDE_IP) as smtp:
            smtp.mail("bob@example.org")
            assert smtp.rcpt("victim@remote.example") == (554, b"5.7.1 <victim@remote.example>: Relay access denied")
            assert smtp.rcpt("bob%remote.example@example.com") == (
                554, b"5.7.1 <bob%remote.example@example.com>: Relay access denied")
            assert smtp.rcpt("alice@example.com")[0] == 250
    assert "rcpt reject: client=unknown[203.0.113.7]" in caplog.text
    assert "victim@remote.example" not in postfix.maillog()


def test_a_repeated_helo_keeps_a_plugins_score_once(start_gateway, postfix) -> None:
    gw = start_gateway(f"127.0.0.1:{postfix.port}", plugins={"helo": {"actions": {"not_fqdn": 2.5}}})
    with gw.client(xclient=OUTSIDE_IP, helo="mailserver") as smtp:
        assert smtp.ehlo("mailserver")[0] == 250
        assert send(smtp, "alice@example.com")[0] == 250
    (delivered,) = postfix.wait_for_messages("alice")
    assert b"X-Spam-Status: No, score=2.5 tests=helo:helo=not_fqdn(2.5)\n" in delivered


def test_a_refused_recipients_score_does_not_count(start_gateway, postfix) -> None:
    # s6@example.com scores 6, then Postfix refuses it (no such user): the
    # message to alice must not be judged, or marked, by its score.
    gw = start(start_gateway, postfix, scoring={"reject": 5.0})
    with gw.client(xclient=TRUSTED_IP) as smtp:
        smtp.mail("bob@example.org")
        assert smtp.rcpt("s6@example.com")[0] == 550
        assert smtp.rcpt("alice@example.com")[0] == 250
        assert smtp.data(MSG)[0] == 250
    (delivered,) = postfix.wait_for_messages("alice")
    assert b"X-Spam-" not in delivered


def test_at_rcpt_a_refused_recipient_does_not_refuse_the_next(start_gateway, postfix) -> None:
    gw = start(start_gateway, postfix, scoring={"reject": 5.0, "stage": "rcpt"})
    with gw.client(xclient=TRUSTED_IP) as smtp:
        smtp.mail("bob@example.org")
        assert smtp.rcpt("s6@remote.example") == (554, b"5.7.1 Error: message rejected as spam (score 6.0)")
        assert smtp.rcpt("alice@example.com")[0] == 250


def test_monitor_marks_what_it_would_have_rejected_as_spam(start_gateway, postfix, caplog) -> None:
    gw = start(start_gateway, postfix, scoring={"reject": 5.0}, monitor=True)
    with caplog.at_level(logging.INFO, "smtpgate"):
        with gw.client(xclient=TRUSTED_IP) as smtp:
            assert send(smtp, "s6@remote.example", "alice@example.com")[0] == 250
    (delivered,) = postfix.wait_for_messages("alice")
    assert b"X-Spam-Status: Yes, score=6.0 required=5.0 tests=scorer:score-s6(6)\n" in delivered
    # The monitor line names the transaction, as the delivery line does.
    assert "data monitor: client=unknown[198.51.100.7] helo=<client.example.net> from=<bob@example.org>" in caplog.text


class Injector(Plugin):
    """Puts line breaks where a careless plugin might: a header value and a
    result copied from outside text (a DNS TXT record, the message)."""

    @hookimpl
    def data(self, message):
        return Verdict(headers=(("X-Checked", "ok\r\nX-Injected-Header: yes"),), score=1.0,
                       result="txt=evil\r\nX-Injected-Result: yes")


def test_plugin_text_cannot_add_header_lines(start_gateway, postfix) -> None:
    gw = start_gateway(f"127.0.0.1:{postfix.port}", plugins={"injector": {}}, extra={"injector": Injector})
    with gw.client(xclient=TRUSTED_IP) as smtp:
        assert send(smtp, "alice@example.com")[0] == 250
    (delivered,) = postfix.wait_for_messages("alice")
    head = delivered.split(b"\n\n", 1)[0]
    assert not [line for line in head.split(b"\n") if line.startswith((b"X-Injected-Header", b"X-Injected-Result"))]
    assert b"X-Checked: ok\n\tX-Injected-Header: yes\n" in head
    assert b"tests=injector:txt=evil__X-Injected-Result:_yes(1)" in head


def test_a_tag_without_headers_gets_ours(start_gateway, postfix) -> None:
    gw = start_gateway(f"127.0.0.1:{postfix.port}", plugins={"helo": {"actions": {"not_fqdn": "tag"}}})
    with gw.client(xclient=OUTSIDE_IP, helo="mailserver") as smtp:
        assert send(smtp, "alice@example.com")[0] == 250
    (delivered,) = postfix.wait_for_messages("alice")
    assert b"X-Smtpgate-Tag: helo: helo=not_fqdn\n" in delivered


class GuardBoom(Boom):
    monitored = False


def test_monitor_mode_keeps_the_451_of_a_guarding_plugin_that_fails(start_gateway, postfix) -> None:
    gw = start_gateway(f"127.0.0.1:{postfix.port}", plugins={"scorer": {}, "guard": {}},
                       extra={**EXTRA, "guard": GuardBoom}, scoring={"reject": 1.0}, monitor=True)
    with gw.client(xclient=TRUSTED_IP) as smtp:
        smtp.mail("bob@example.org")
        assert smtp.rcpt("boom@remote.example") == (451, b"4.3.0 Error: internal policy failure, try again later")
        assert smtp.rcpt("alice@example.com")[0] == 250


def test_forged_authentication_results_are_removed(gateway, postfix) -> None:
    forged = (
        b"X-Spam-Status: No, score=-100.0\r\n"
        b"x-spam-score : -100.0\r\n"
        b"Authentication-Results: gw.test.example; spf=pass smtp.mailfrom=example.org\r\n"
        b"Authentication-Results: (comment) GW.TEST.EXAMPLE;\r\n  dkim=pass header.d=example.org\r\n"
        b"Authentication-Results: other.example; spf=fail\r\n"
        b"X-Smtpgate-Tag: helo: helo=ok\r\n"
    )
    with gateway.client(xclient=OUTSIDE_IP) as smtp:
        smtp.sendmail("bob@example.org", ["alice@example.com"], forged + b"Subject: ar\r\n\r\nbody\r\n")
    (delivered,) = postfix.wait_for_messages("alice")
    assert delivered.count(b"Authentication-Results:") == 1
    assert b"-100.0" not in delivered  # the client's X-Spam-* are gone too
    assert b"X-Smtpgate-Tag" not in delivered  # and its tags: only ours may say a check tagged it
    assert b"Authentication-Results: other.example; spf=fail\nSubject: ar\n" in delivered


def test_a_repeated_helo_does_not_count_twice(start_gateway, postfix) -> None:
    gw = start(start_gateway, postfix)
    with gw.client(xclient=TRUSTED_IP, helo="scored.example") as smtp:
        assert smtp.ehlo("scored.example")[0] == 250
        assert send(smtp, "alice@example.com")[0] == 250
    (delivered,) = postfix.wait_for_messages("alice")
    assert b"X-Spam-Status: No, score=2.0 tests=scorer:helo-scored(2)\n" in delivered


class Rambler(Plugin):
    """A tag whose result is longer than a header line may be: the raw d=
    of eight DKIM signatures, say."""

    @hookimpl
    def data(self, message):
        return Verdict.tag(result=" ".join(f"d={'a' * 300}.example" for _ in range(8)))


def test_no_header_line_we_write_is_longer_than_rfc_5322_allows(start_gateway, postfix) -> None:
    gw = start_gateway(f"127.0.0.1:{postfix.port}", plugins={"rambler": {}}, extra={"rambler": Rambler})
    with gw.client(xclient=TRUSTED_IP) as smtp:
        assert send(smtp, "alice@example.com")[0] == 250
    (delivered,) = postfix.wait_for_messages("alice")
    head = delivered.split(b"\n\n", 1)[0]
    assert max(len(line) for line in head.split(b"\n")) <= 998
    tag = head[head.index(b"X-Smtpgate-Tag: "):].split(b"\nSubject")[0]
    assert tag.replace(b"\n", b"").count(b"d=" + b"a" * 300 + b".example") == 8  # folded, nothing lost
