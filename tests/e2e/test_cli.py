"""The smtpgate command as a user runs it: a real process, real signals."""

import contextlib
import importlib.metadata
import json
import os
import select
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.fixtures.gateway import recv_reply
from tests.fixtures.postfix import free_port

ROOT = Path(__file__).resolve().parents[2]
SMTPGATE = [sys.executable, "-m", "gateway"]
# The checkout under test, whatever copy is installed and whatever the cwd.
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


def wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"smtpgate exited with {proc.returncode}: {proc.stderr.read()}")
        try:
            smtplib.SMTP("127.0.0.1", port, timeout=2).quit()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError("smtpgate did not listen in time")


@pytest.fixture
def serve(tmp_path: Path):
    procs: list[subprocess.Popen] = []

    def start(*args: str, env: dict[str, str] = ENV) -> tuple[subprocess.Popen, int]:
        port = free_port()
        proc = subprocess.Popen(
            [*SMTPGATE, "serve", "--listen", f"127.0.0.1:{port}", *args],
            cwd=tmp_path, stderr=subprocess.PIPE, text=True, start_new_session=True, env=env,
        )
        procs.append(proc)
        wait_for_port(port, proc)
        return proc, port

    yield start
    for proc in procs:
        # The whole group: a worker must not outlive the test.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        proc.stderr.close()


def test_default_policy_delivers_to_a_local_maildir(serve, tmp_path: Path) -> None:
    # No --policy: policies/default.toml of the checkout, Maildir under cwd.
    proc, port = serve("--workers", "1")
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.example.net", timeout=10) as smtp:
        assert smtp.ehlo("client.example.net")[1].startswith(b"smtpgate.localhost")
        assert smtp.sendmail("bob@example.org", ["alice@example.com"], b"Subject: hi\r\n\r\nhello\r\n") == {}
    (delivered,) = list((tmp_path / "maildir" / "new").iterdir())
    assert delivered.read_bytes() == (
        b"Return-Path: <bob@example.org>\nDelivered-To: alice@example.com\nSubject: hi\n\nhello\n"
    )
    assert list((tmp_path / "maildir" / "tmp").iterdir()) == []
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(15) == 0
    log = proc.stderr.read()
    assert "data delivered: client=localhost[127.0.0.1] helo=<client.example.net> from=<bob@example.org>" in log


def test_sigterm_lets_an_open_session_finish(serve, tmp_path: Path) -> None:
    proc, port = serve("--workers", "1")
    smtp = smtplib.SMTP("127.0.0.1", port, timeout=10)
    smtp.ehlo("client.example.net")
    smtp.mail("bob@example.org")
    smtp.rcpt("alice@example.com")
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    assert smtp.data(b"Subject: late\r\n\r\nstill delivered\r\n")[0] == 250
    # Between transactions the session is told to go away.
    assert smtp.noop()[0] == 421
    smtp.close()
    assert proc.wait(15) == 0
    assert len(list((tmp_path / "maildir" / "new").iterdir())) == 1
    log = proc.stderr.read()
    assert "SIGTERM: stopping; open sessions have 30s to finish (shutdown_timeout)" in log
    assert log.rstrip().endswith("INFO stopped")
    assert "closed with 421" not in log


def test_a_session_past_shutdown_timeout_hears_421_and_delivers_nothing(serve, tmp_path: Path) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text('[gateway]\nhostname = "gw.test.example"\nlocal_domains = ["example.com"]\nshutdown_timeout = 1\n')
    proc, port = serve("--workers", "1", "--policy", str(policy))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        recv_reply(sock)
        for line in (b"EHLO client.example.net", b"MAIL FROM:<bob@example.org>", b"RCPT TO:<alice@example.com>", b"DATA"):
            sock.sendall(line + b"\r\n")
            recv_reply(sock)
        sock.sendall(b"Subject: slow\r\n\r\nhalf a message")
        proc.send_signal(signal.SIGTERM)
        assert recv_reply(sock) == b"421 4.3.2 gw.test.example Service shutting down, try again later\r\n"
        assert sock.recv(100) == b""
    assert proc.wait(15) == 0
    assert not (tmp_path / "maildir" / "new").exists() or not list((tmp_path / "maildir" / "new").iterdir())
    log = proc.stderr.read()
    assert "SIGTERM: stopping; open sessions have 1s to finish (shutdown_timeout)" in log
    assert "WARNING shutdown_timeout (1s) is over: 1 session(s) closed with 421" in log


def test_workers_share_the_port_and_log_json(serve, tmp_path: Path) -> None:
    proc, port = serve("--workers", "2", "--log-format", "json")
    for _ in range(30):
        with smtplib.SMTP("127.0.0.1", port, local_hostname="client.example.net", timeout=10) as smtp:
            smtp.sendmail("bob@example.org", ["alice@example.com"], b"Subject: w\r\n\r\nx\r\n")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(15) == 0
    lines = [json.loads(line) for line in proc.stderr.read().splitlines() if line.startswith("{")]
    # Which version ran is in the log, for the bug report written later.
    version = importlib.metadata.version("smtpgate")
    assert f"smtpgate {version} listening on 127.0.0.1:{port}, next hop maildir:" in lines[0]["message"]
    delivered = [line for line in lines if line.get("stage") == "data" and line.get("action") == "delivered"]
    assert len(delivered) == 30
    assert {"session", "client", "helo", "from", "to", "reply", "time"} <= set(delivered[0])
    # SO_REUSEPORT spreads 30 connections over both workers.
    assert len({line["session"].split(".")[0] for line in delivered}) == 2
    assert len(list((tmp_path / "maildir" / "new").iterdir())) == 30


def test_plugins_command_lists_order_hooks_and_origin(tmp_path: Path) -> None:
    run = subprocess.run([*SMTPGATE, "plugins", "--policy", str(ROOT / "policies" / "default.toml")],
                         capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    assert "  1. relay: hooks rcpt; from plugins.relay:RelayPlugin (smtpgate " in run.stdout
    assert "  2. commands: hooks vrfy, expn; from plugins.commands:CommandsPlugin (smtpgate " in run.stdout
    assert "  3. helo: hooks helo; from plugins.helo:HeloPlugin (smtpgate " in run.stdout
    assert "installed, not enabled:\n  dkim: from plugins.dkim:DkimPlugin" in run.stdout


def test_console_script_is_installed() -> None:
    exe = shutil.which("smtpgate")
    assert exe is not None
    run = subprocess.run([exe, "lint", str(ROOT / "policies" / "default.toml")], capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.strip().endswith(": ok")


@pytest.mark.parametrize("workers", ["1", "2"])
def test_port_in_use_is_a_clear_error(serve, tmp_path: Path, workers: str) -> None:
    # Workers share the port through SO_REUSEPORT; a second smtpgate of the
    # same user must not be able to join them and take half the mail.
    _, port = serve("--workers", workers)
    run = subprocess.run([*SMTPGATE, "serve", "--listen", f"127.0.0.1:{port}", "--workers", workers],
                         capture_output=True, text=True, cwd=tmp_path, timeout=30, env=ENV)
    assert run.returncode == 1
    assert f"smtpgate: cannot listen on 127.0.0.1:{port}: Address already in use" in run.stderr
    assert "listening on" not in run.stderr  # said only once the socket is bound


def running(pid: int) -> bool:
    try:
        return "zombie" not in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False


def test_workers_do_not_outlive_a_killed_parent(serve, tmp_path: Path) -> None:
    proc, port = serve("--workers", "2")
    workers = [int(p) for p in subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()]
    assert len(workers) == 2
    os.kill(proc.pid, signal.SIGKILL)  # as a careless supervisor might
    deadline = time.monotonic() + 10
    while any(map(running, workers)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [w for w in workers if running(w)]
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2)


def test_workers_must_be_positive(tmp_path: Path) -> None:
    run = subprocess.run([*SMTPGATE, "serve", "--workers", "0"], capture_output=True, text=True, cwd=tmp_path, timeout=30,
                         env=ENV)
    assert run.returncode == 2
    assert "--workers: expected a positive integer, got '0'" in run.stderr


def serve_two_workers(serve, tmp_path: Path, max_connections_per_ip: int) -> int:
    """Two workers on a policy with that limit.  The readiness probe's
    session no longer counts when this returns: the gateway releases a
    client's place before its 221."""
    policy = tmp_path / "limits.toml"
    policy.write_text(
        '[gateway]\nhostname = "gw.test.example"\nupstream = "maildir:maildir"\n'
        f'local_domains = ["example.com"]\nmax_connections_per_ip = {max_connections_per_ip}\n'
    )
    _, port = serve("--workers", "2", "--policy", str(policy))
    return port


def test_connection_limit_per_address_holds_across_workers(serve, tmp_path: Path) -> None:
    port = serve_two_workers(serve, tmp_path, max_connections_per_ip=2)
    socks = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(8)]
    try:
        banners = [recv_reply(sock) for sock in socks]
    finally:
        for sock in socks:
            sock.close()
    # SO_REUSEPORT spreads the 8 connections over both workers; counted per
    # worker, each would have let 2 in, and without the admission lock two
    # workers admitting at once could both take the last place.
    assert [b[:4] for b in banners].count(b"220 ") == 2
    refused = [b for b in banners if not b.startswith(b"220 ")]
    assert all(b == b"421 4.7.0 gw.test.example Error: too many connections from 127.0.0.1\r\n" for b in refused), refused


def test_a_client_may_reconnect_as_soon_as_it_reads_221(serve, tmp_path: Path) -> None:
    # At its limit, a client that QUITs and reconnects at once must find its
    # slot free in whichever worker takes the new connection.
    port = serve_two_workers(serve, tmp_path, max_connections_per_ip=1)
    for _ in range(40):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            assert recv_reply(sock).startswith(b"220 ")
            sock.sendall(b"QUIT\r\n")
            assert recv_reply(sock).startswith(b"221 ")


class StderrTail:
    """What a running smtpgate has written to stderr so far, read without
    blocking, so a test can wait for a log line and go on."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self._fd = proc.stderr.fileno()
        os.set_blocking(self._fd, False)
        self.text = ""

    def read(self) -> str:
        while True:
            try:
                chunk = os.read(self._fd, 65536)
            except BlockingIOError:
                return self.text
            if not chunk:
                return self.text
            self.text += chunk.decode()

    def wait_for(self, needle: str, count: int = 1, timeout: float = 15.0) -> str:
        deadline = time.monotonic() + timeout
        while self.read().count(needle) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"{needle!r} not logged {count} time(s):\n{self.text}")
            time.sleep(0.05)
        return self.text


def children(pid: int) -> set[int]:
    listed = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return {int(p) for p in listed if running(int(p))}


@pytest.mark.parametrize("count", [1, 2])  # one worker: a one-core machine's default
def test_a_worker_that_dies_is_replaced_and_its_queued_clients_wait_for_it(serve, tmp_path: Path, count: int) -> None:
    proc, port = serve("--workers", str(count))
    log = StderrTail(proc)
    workers = children(proc.pid)
    assert len(workers) == count
    victim = min(workers)
    # Stopped, the worker accepts nothing: the kernel queues the connections
    # it hashes to that worker's socket (on average half of them).
    os.kill(victim, signal.SIGSTOP)
    socks = [socket.create_connection(("127.0.0.1", port), timeout=15) for _ in range(20)]
    try:
        time.sleep(0.5)  # the running worker greets its share meanwhile
        greeted, _, _ = select.select(socks, [], [], 0)
        assert len(greeted) < len(socks), "no connection went to the stopped worker"
        os.kill(victim, signal.SIGKILL)
        # None is reset: the parent kept the socket, and the replacement
        # takes the connections its predecessor never accepted.
        for sock in socks:
            assert recv_reply(sock).startswith(b"220 ")
            sock.sendall(b"QUIT\r\n")
            assert recv_reply(sock).startswith(b"221 ")
    finally:
        for sock in socks:
            sock.close()
    replaced = children(proc.pid)
    assert len(replaced) == count and victim not in replaced
    assert f"(pid {victim}) was killed by SIGKILL after " in log.wait_for("its replacement starts")
    for _ in range(10):  # mail flows through both workers again
        with smtplib.SMTP("127.0.0.1", port, local_hostname="client.example.net", timeout=10) as smtp:
            smtp.sendmail("bob@example.org", ["alice@example.com"], b"Subject: after\r\n\r\nx\r\n")
    assert len(list((tmp_path / "maildir" / "new").iterdir())) == 10
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(15) == 0


def write_policy(path: Path, hostname: str, local_domain: str, extra: str = "") -> None:
    path.write_text(
        f'[gateway]\nhostname = "{hostname}"\nupstream = "maildir:maildir"\n'
        f'local_domains = ["{local_domain}"]\n{extra}'
    )


def test_sighup_reloads_the_policy_and_open_sessions_keep_theirs(serve, tmp_path: Path) -> None:
    policy = tmp_path / "policy.toml"
    write_policy(policy, "before.example", "example.com")
    proc, port = serve("--workers", "2", "--policy", str(policy))
    log = StderrTail(proc)
    opened = smtplib.SMTP("127.0.0.1", port, local_hostname="client.example.net", timeout=10)
    opened.ehlo("client.example.net")

    write_policy(policy, "after.example", "example.org")
    proc.send_signal(signal.SIGHUP)
    log.wait_for("in force for new connections", count=2)  # each worker
    for _ in range(10):  # whichever worker takes it
        with smtplib.SMTP("127.0.0.1", port, local_hostname="client.example.net", timeout=10) as smtp:
            assert smtp.ehlo("client.example.net")[1].startswith(b"after.example")
            smtp.mail("bob@example.net")
            assert smtp.rcpt("alice@example.com") == (554, b"5.7.1 <alice@example.com>: Relay access denied")
            assert smtp.rcpt("carol@example.org")[0] == 250
            smtp.rset()
    # The session opened before the reload is judged by the policy it began with.
    assert opened.sendmail("bob@example.net", ["alice@example.com"], b"Subject: before\r\n\r\nx\r\n") == {}
    opened.quit()
    assert len(list((tmp_path / "maildir" / "new").iterdir())) == 1

    # A broken file is reported once (by the parent) and changes nothing.
    write_policy(policy, "broken.example", "example.org", 'max_recipients = "many"\n')
    proc.send_signal(signal.SIGHUP)
    refusal = f"reload refused, the running policy stays: {policy}: gateway.max_recipients: expected an integer, got 'many'"
    log.wait_for(refusal)
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.example.net", timeout=10) as smtp:
        assert smtp.ehlo("client.example.net")[1].startswith(b"after.example")

    # A valid file that lets anyone relay is taken, with lint's warning, once.
    write_policy(policy, "open.example", "example.org", "[plugins.relay]\nenabled = false\n")
    proc.send_signal(signal.SIGHUP)
    log.wait_for("in force for new connections", count=4)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(15) == 0
    text = log.read()
    assert text.count(refusal) == 1
    assert text.count(f"{policy}: warning: plugins.relay is disabled: the next hop must refuse relaying itself") == 1


def test_no_acknowledged_message_is_lost_across_reloads_and_a_worker_crash(serve, tmp_path: Path) -> None:
    # Four clients send steadily while the policy is reloaded ten times and
    # a worker is killed. A session cut by the kill may fail (its client
    # retries); every message that was answered 250 must be in the Maildir.
    policy = tmp_path / "policy.toml"
    write_policy(policy, "one.example", "example.com")
    # Warnings only: a line per delivery would fill the stderr pipe no one reads.
    proc, port = serve("--workers", "2", "--policy", str(policy), "--log-level", "warning")
    acked: list[str] = []
    failed: list[str] = []
    stop = threading.Event()

    def client(n: int) -> None:
        for i in range(200):
            if stop.is_set():
                return
            subject = f"steady-{n}-{i}"
            try:
                with smtplib.SMTP("127.0.0.1", port, local_hostname="client.example.net", timeout=10) as smtp:
                    smtp.sendmail("bob@example.org", ["alice@example.com"], f"Subject: {subject}\r\n\r\nx\r\n".encode())
                acked.append(subject)
            except (smtplib.SMTPException, OSError) as exc:
                failed.append(f"{subject}: {exc!r}")

    threads = [threading.Thread(target=client, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    try:
        for i in range(10):
            time.sleep(0.1)
            write_policy(policy, "two.example" if i % 2 else "one.example", "example.com")
            proc.send_signal(signal.SIGHUP)
            if i == 5:
                os.kill(max(children(proc.pid)), signal.SIGKILL)
        time.sleep(1.5)  # the replacement starts after 1 s: let it serve too
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(15) == 0
    delivered = {f.read_bytes().split(b"Subject: ", 1)[1].split(b"\n", 1)[0].decode()
                 for f in (tmp_path / "maildir" / "new").iterdir()}
    assert len(acked) > 40
    assert set(acked) <= delivered
    # Reloads cut nobody off; only sessions on the killed worker may fail.
    assert len(failed) <= 4, failed


def third_party_plugins(tmp_path: Path, **modules: str) -> dict[str, str]:
    """An environment in which a distribution ``thirdparty`` is installed
    (on PYTHONPATH) with one plugin per module: ``NAME = tp_NAME:Plugin``."""
    site = tmp_path / "site"
    dist = site / "thirdparty-1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: thirdparty\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        "[smtpgate.plugins]\n" + "".join(f"{name} = tp_{name}:Plugin\n" for name in modules)
    )
    for name, source in modules.items():
        (site / f"tp_{name}.py").write_text(source)
    return {**ENV, "PYTHONPATH": os.pathsep.join([str(site), ENV["PYTHONPATH"]])}


NOT_A_DATACLASS = """\
import gateway

class Plugin(gateway.Plugin):
    class Options:
        level: int = 1

    @gateway.hookimpl
    async def mail(self, envelope):
        return None
"""


def refused_before_listening(tmp_path: Path, policy_text: str, env: dict[str, str]) -> str:
    """Run serve on ``policy_text``; assert it exits 2 and never listens;
    return what it said, the policy file's name as ``POLICY``."""
    policy = tmp_path / "refused.toml"
    policy.write_text(policy_text)
    port = free_port()
    run = subprocess.run([*SMTPGATE, "serve", "--policy", str(policy), "--listen", f"127.0.0.1:{port}"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=30, env=env)
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr and "listening on" not in run.stderr
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2)
    return run.stderr.replace(str(policy), "POLICY")


def test_a_third_party_plugin_with_unreadable_options_stops_serve_before_it_listens(tmp_path: Path) -> None:
    env = third_party_plugins(tmp_path, odd=NOT_A_DATACLASS)
    said = refused_before_listening(tmp_path, '[gateway]\nhostname = "gw.test.example"\n[plugins.odd]\n', env)
    assert "POLICY: plugins.odd: an Options dataclass the loader can read (" in said


QUITS_ON_IMPORT = "import sys\nsys.exit('no licence key')\n"


def test_a_plugin_that_exits_on_import_stops_only_a_policy_that_names_it(serve, tmp_path: Path) -> None:
    env = third_party_plugins(tmp_path, quits=QUITS_ON_IMPORT)
    said = refused_before_listening(tmp_path, '[gateway]\nhostname = "gw.test.example"\n[plugins.quits]\n', env)
    assert "POLICY: plugins.quits: an importable plugin (tp_quits:Plugin (thirdparty 1.0): " \
           "SystemExit('no licence key'))" in said
    # A policy that leaves it out serves, and says which plugin was skipped.
    other = tmp_path / "other.toml"
    other.write_text('[gateway]\nhostname = "gw.test.example"\nlocal_domains = ["example.com"]\n')
    proc, port = serve("--policy", str(other), env=env)
    with smtplib.SMTP("127.0.0.1", port, local_hostname="mail.example.org", timeout=10) as client:
        assert client.sendmail("bob@example.org", ["alice@example.com"], b"Subject: hi\r\n\r\nhello\r\n") == {}
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(15) == 0
    assert "plugin quits (tp_quits:Plugin (thirdparty 1.0)) does not import: SystemExit('no licence key')" \
        in proc.stderr.read()


#: A plugin whose module takes its time to import, as a big dependency
#: can: it says when it has begun, then waits (at most 10 s) for a file.
SLOW_IMPORT = """\
import os, pathlib, time
from dataclasses import dataclass
import gateway

here = pathlib.Path(os.environ["SLOW_IMPORT_DIR"])
(here / "importing").touch()
for _ in range(1000):
    if (here / "go").exists():
        break
    time.sleep(0.01)

class Plugin(gateway.Plugin):
    @dataclass(frozen=True)
    class Options:
        pass
"""


def test_a_sighup_while_serve_starts_is_a_reload_not_its_end(tmp_path: Path) -> None:
    # systemd counts a unit as started at once: `systemctl reload` right
    # after `start` sent SIGHUP while serve was still loading its plugins,
    # and its default action ended serve, silently, as a clean exit that
    # Restart=on-failure does not restart.
    env = {**third_party_plugins(tmp_path, slow=SLOW_IMPORT), "SLOW_IMPORT_DIR": str(tmp_path)}
    policy = tmp_path / "slow.toml"
    policy.write_text('[gateway]\nhostname = "gw.test.example"\nupstream = "maildir:maildir"\n'
                      'local_domains = ["example.com"]\n[plugins.slow]\n')
    port = free_port()
    proc = subprocess.Popen([*SMTPGATE, "serve", "--policy", str(policy), "--listen", f"127.0.0.1:{port}",
                             "--workers", "1"], cwd=tmp_path, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env=env)
    try:
        deadline = time.monotonic() + 15
        while not (tmp_path / "importing").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGHUP)
        (tmp_path / "go").touch()
        wait_for_port(port, proc)
        with smtplib.SMTP("127.0.0.1", port, local_hostname="mail.example.org", timeout=10) as client:
            assert client.sendmail("bob@example.org", ["alice@example.com"], b"Subject: hi\r\n\r\nhello\r\n") == {}
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(15) == 0
        assert f"reloading {policy} in 1 worker(s)" in proc.stderr.read()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        proc.stderr.close()


def test_a_stderr_nobody_reads_does_not_stall_the_sessions(serve, tmp_path: Path) -> None:
    # A full stderr pipe (a log shipper fallen behind, journald throttling)
    # holds up whoever writes to it.  The lines below are several times a
    # pipe's 64 KiB; written on the event loop, the replies would stop with
    # the pipe full.
    policy = tmp_path / "policy.toml"
    policy.write_text('[gateway]\nhostname = "gw.test.example"\nlocal_domains = ["example.com"]\nmax_errors = 2000\n')
    proc, port = serve("--workers", "1", "--policy", str(policy))
    helo = ".".join(["a" * 60] * 4)  # a long helo= in every line
    refused = 1000
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        recv_reply(sock)
        for line in (f"EHLO {helo}".encode(), b"MAIL FROM:<bob@example.org>"):
            sock.sendall(line + b"\r\n")
            recv_reply(sock)
        for n in range(refused):
            sock.sendall(f"RCPT TO:<u{n}@elsewhere.example>\r\n".encode())
            assert recv_reply(sock).startswith(b"554 5.7.1 <u")
        sock.sendall(b"QUIT\r\n")
        assert recv_reply(sock).startswith(b"221 ")
    tail = StderrTail(proc)
    tail.wait_for("rcpt reject:", count=refused)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(15) == 0
    assert tail.read().rstrip().endswith("INFO stopped")


def test_a_quoted_local_part_cannot_write_fields_into_the_log(serve, tmp_path: Path) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text('[gateway]\nhostname = "gw.test.example"\nlocal_domains = ["example.com"]\n')
    proc, port = serve("--workers", "1", "--policy", str(policy))
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.example.net", timeout=10) as smtp:
        smtp.ehlo()
        assert smtp.mail('"x> plugin=commands to=<ceo@example.com"@example.org')[0] == 250
        assert smtp.rcpt("someone@remote.example")[0] == 554
    line = next(line for line in StderrTail(proc).wait_for("rcpt reject:").splitlines() if "rcpt reject:" in line)
    words = line.split(" ")
    assert [w for w in words if w.startswith("plugin=")] == ["plugin=relay"]
    assert [w for w in words if w.startswith("to=")] == ["to=<someone@remote.example>"]
    assert r'from=<"x\x3e\x20plugin=commands\x20to=\x3cceo@example.com"@example.org>' in words


#: A plugin that starts in serve's own check, which builds no resolver,
#: and fails in every worker, which does: a third-party plugin that opens
#: its connection (a database, a socket) only where it will serve fails so.
FAILS_IN_A_WORKER = """\
from dataclasses import dataclass
import gateway

class Plugin(gateway.Plugin):
    @dataclass(frozen=True)
    class Options:
        pass

    def __init__(self, options, context, name):
        super().__init__(options, context, name)
        if context.resolver is not None:
            raise RuntimeError("cannot reach the reputation database")

    @gateway.hookimpl
    async def mail(self, envelope):
        return None
"""


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_worker_that_cannot_start_stops_serve_instead_of_being_restarted_forever(
    tmp_path: Path, workers: str,
) -> None:
    # It logged "listening on", then a worker's traceback and "its
    # replacement starts in 1 s", 2 s, ... 30 s, for ever: a service that
    # looked up to its supervisor (systemd) and refused every client.
    env = third_party_plugins(tmp_path, fails=FAILS_IN_A_WORKER)
    policy = tmp_path / "fails.toml"
    policy.write_text('[gateway]\nhostname = "gw.test.example"\nupstream = "maildir:maildir"\n[plugins.fails]\n')
    port = free_port()
    run = subprocess.run([*SMTPGATE, "serve", "--policy", str(policy), "--listen", f"127.0.0.1:{port}",
                          "--workers", workers], capture_output=True, text=True, cwd=tmp_path, timeout=30, env=env)
    assert run.returncode == 2, run.stderr
    said = run.stderr.replace(str(policy), "POLICY")
    assert "POLICY: plugins.fails: a plugin that starts (RuntimeError('cannot reach the reputation database'))" in said
    assert "could not start: stopping" in said
    assert "its replacement starts" not in said
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2)


def test_a_reload_that_fails_in_every_worker_is_not_what_their_replacements_get(serve, tmp_path: Path) -> None:
    # The parent checks a reloaded policy without a resolver, so this one
    # passed there and failed in each worker, which kept its policy; the
    # parent kept the new one all the same, and every worker that died
    # after was replaced by one that failed to start, for ever.
    env = third_party_plugins(tmp_path, fails=FAILS_IN_A_WORKER)
    policy = tmp_path / "policy.toml"
    write_policy(policy, "before.example", "example.com")
    proc, port = serve("--workers", "2", "--policy", str(policy), env=env)
    log = StderrTail(proc)

    write_policy(policy, "after.example", "example.com", "[plugins.fails]\n")
    proc.send_signal(signal.SIGHUP)
    log.wait_for("reload refused, the running policy stays: ", count=2)  # each worker
    log.wait_for("refused the reload (its error is above): the running policy stays, also for workers "
                 "started from now on")
    victim = max(children(proc.pid))
    os.kill(victim, signal.SIGKILL)
    log.wait_for("its replacement starts")
    time.sleep(1.5)  # a replacement that fails would have been tried again by now
    assert len(children(proc.pid)) == 2 and victim not in children(proc.pid)
    for _ in range(10):  # whichever worker takes it: both run the policy from before
        with smtplib.SMTP("127.0.0.1", port, local_hostname="client.example.net", timeout=10) as smtp:
            assert smtp.ehlo("client.example.net")[1].startswith(b"before.example")
    text = log.read()
    assert "cannot reach the reputation database" in text
    assert text.count("its replacement starts") == 1 and "exited with status 2" not in text

    # A reload that takes is what replacements get from then on.
    write_policy(policy, "third.example", "example.com")
    proc.send_signal(signal.SIGHUP)
    log.wait_for("in force for new connections", count=2)
    os.kill(max(children(proc.pid)), signal.SIGKILL)
    log.wait_for("its replacement starts", count=2)
    for _ in range(10):
        with smtplib.SMTP("127.0.0.1", port, local_hostname="client.example.net", timeout=10) as smtp:
            assert smtp.ehlo("client.example.net")[1].startswith(b"third.example")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(15) == 0
