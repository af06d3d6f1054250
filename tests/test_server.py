"""Reloading a policy inside a running worker (gateway.server.reload)."""

import gc
import ipaddress
import logging
import time
import weakref
from pathlib import Path

from gateway import Plugin
from tests.fixtures.gateway import make_policy, recv_reply


class Unbuildable(Plugin):
    def __init__(self, *args, **kwargs):
        raise RuntimeError("cannot reach its database")


def test_a_reload_cannot_move_the_listening_address(start_gateway, tmp_path: Path, caplog) -> None:
    gw = start_gateway(f"maildir:{tmp_path / 'maildir'}")
    with caplog.at_level(logging.ERROR, "smtpgate.server"):
        gw.reload(make_policy(f"maildir:{tmp_path / 'maildir'}", hostname="new.example", listen="127.0.0.1:2"))
    assert caplog.messages == [
        "reload refused, the running policy stays: <test policy>: gateway.listen:"
        " 127.0.0.1:1 as when started (a new address needs a restart)"
    ]
    with gw.raw() as sock:
        sock.sendall(b"EHLO client.example.net\r\n")
        assert recv_reply(sock).startswith(b"250-gw.test.example\r\n")


def test_a_plugin_that_cannot_start_keeps_the_running_policy(start_gateway, tmp_path: Path, caplog) -> None:
    upstream = f"maildir:{tmp_path / 'maildir'}"
    gw = start_gateway(upstream, extra={"unbuildable": Unbuildable})
    with caplog.at_level(logging.ERROR, "smtpgate.server"):
        gw.reload(make_policy(upstream, hostname="new.example", plugins={"unbuildable": {}}))
    (record,) = [r for r in caplog.records if r.name == "smtpgate.server"]
    assert record.getMessage() == ("reload refused, the running policy stays: <test policy>: plugins.unbuildable:"
                                   " a plugin that starts (RuntimeError('cannot reach its database'))")
    assert record.exc_info is None  # the traceback is the loader's, logged once
    assert caplog.text.count("RuntimeError: cannot reach its database") == 1
    with gw.client() as smtp:
        assert smtp.ehlo_resp.startswith(b"gw.test.example")


def test_a_retired_policy_still_times_out_its_sessions_then_is_let_go(start_gateway, tmp_path: Path) -> None:
    upstream = f"maildir:{tmp_path / 'maildir'}"
    gw = start_gateway(upstream, command_timeout=1)
    old = gw.gateway
    with gw.raw() as idle:
        gw.reload(make_policy(upstream, hostname="new.example"))
        assert old.retired and gw.gateway is not old
        assert gw.service.gateways == [gw.gateway, old]  # its session is still open
        # The old policy's time limit still holds for the session it had.
        assert recv_reply(idle) == b"421 4.4.2 gw.test.example Error: timeout exceeded\r\n"
    deadline = time.monotonic() + 5
    while len(gw.service.gateways) > 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert gw.service.gateways == [gw.gateway]
    with gw.raw() as sock:
        sock.sendall(b"HELO client.example.net\r\n")
        assert recv_reply(sock) == b"250 new.example\r\n"


def test_reloads_leave_no_old_policy_behind(start_gateway, tmp_path: Path) -> None:
    upstream = f"maildir:{tmp_path / 'maildir'}"
    gw = start_gateway(upstream)
    gone = []
    for i in range(5):
        with gw.client() as smtp:  # each policy serves a session before it goes
            smtp.noop()
        gone.append(weakref.ref(gw.gateway))
        gw.reload(make_policy(upstream, hostname=f"policy{i}.example"))
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and (len(gw.service.gateways) > 1 or any(ref() for ref in gone)):
        gc.collect()
        time.sleep(0.05)
    assert gw.service.gateways == [gw.gateway]
    assert [ref() for ref in gone] == [None] * 5


def test_a_reload_thaws_what_the_worker_froze_at_start(start_gateway, tmp_path: Path) -> None:
    # run_worker freezes what start-up built (gc.freeze); frozen, the old
    # policy's objects could never be collected after a reload.
    upstream = f"maildir:{tmp_path / 'maildir'}"
    gw = start_gateway(upstream)
    gc.freeze()
    try:
        gw.reload(make_policy(upstream, hostname="thawed.example"))
        assert gc.get_freeze_count() == 0
    finally:
        gc.unfreeze()


def test_a_reload_keeps_the_dns_cache_unless_the_dns_settings_change(start_gateway, dns, tmp_path: Path) -> None:
    upstream = f"maildir:{tmp_path / 'maildir'}"
    settings = {"nameservers": [dns.nameserver], "timeout": 2.0}

    def mail_from_good_domain(gw) -> None:
        with gw.client() as smtp:
            assert smtp.mail("bob@good.mail.test")[0] == 250  # the sender check asks the DNS

    gw = start_gateway(upstream, dns=settings, plugins={"sender": {}})
    mail_from_good_domain(gw)
    asked = dns.query_count("good.mail.test")
    assert asked > 0
    gw.reload(make_policy(upstream, hostname="new.example", dns=settings, plugins={"sender": {}}))
    mail_from_good_domain(gw)
    assert dns.query_count("good.mail.test") == asked  # answered from the cache the reload kept
    gw.reload(make_policy(upstream, hostname="new.example", dns={**settings, "timeout": 3.0}, plugins={"sender": {}}))
    mail_from_good_domain(gw)
    assert dns.query_count("good.mail.test") > asked  # new settings, new cache


def test_a_client_address_is_judged_once_per_policy(tmp_path: Path) -> None:
    from gateway.server import Gateway

    gateway = Gateway(make_policy(f"maildir:{tmp_path}", trusted_networks=["192.0.2.0/24"], xclient_hosts=[]))
    mapped = gateway.client("::ffff:192.0.2.7")
    assert mapped.peer == ipaddress.ip_address("::ffff:192.0.2.7")
    assert (mapped.ip, mapped.text) == (ipaddress.ip_address("192.0.2.7"), "192.0.2.7")
    assert (mapped.trusted, mapped.xclient, mapped.loopback) == (True, False, False)
    assert gateway.client("::ffff:192.0.2.7") is mapped
    assert gateway.client("127.0.0.1").loopback and not gateway.client("127.0.0.1").trusted
