"""The parent process: replacing dead workers, and how soon."""

import hashlib
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import textwrap
import time
from dataclasses import replace
from pathlib import Path

import pytest

from gateway.config import Policy, policy_from_dict
from gateway.supervisor import FIRST_DELAY, MAX_DELAY, SERVING, STEADY, Supervisor

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def supervisor():
    sock = socket.socket()
    policy = policy_from_dict({"gateway": {"hostname": "gw.test.example"}}, "<test>")
    yield Supervisor(policy, [sock], lambda *args: None, lambda: policy)
    sock.close()


def delay_after_death(supervisor: Supervisor, lived: float, code: int = -9) -> float:
    slot = supervisor.slots[0]
    slot.started = time.monotonic() - lived
    supervisor._schedule(slot, 4242, code)
    assert slot.due is not None
    return round(slot.due - time.monotonic())


def test_a_worker_that_ran_steadily_is_replaced_at_once(supervisor, caplog) -> None:
    with caplog.at_level(logging.ERROR, "smtpgate.server"):
        assert delay_after_death(supervisor, lived=STEADY + 1) == 0
    assert caplog.messages == [
        f"worker 0 (pid 4242) was killed by SIGKILL after {STEADY + 1:.1f} s; its replacement starts now"
    ]


def test_a_worker_killed_by_a_signal_without_a_name_is_replaced_too(supervisor, caplog) -> None:
    with caplog.at_level(logging.ERROR, "smtpgate.server"):
        assert delay_after_death(supervisor, lived=STEADY + 1, code=-40) == 0
    assert caplog.messages == [
        f"worker 0 (pid 4242) was killed by signal 40 after {STEADY + 1:.1f} s; its replacement starts now"
    ]


def test_quick_deaths_in_a_row_wait_longer_each_time_up_to_a_limit(supervisor, caplog) -> None:
    with caplog.at_level(logging.ERROR, "smtpgate.server"):
        delays = [delay_after_death(supervisor, lived=0.2, code=3) for _ in range(8)]
    assert delays == [1, 2, 4, 8, 16, 30, 30, 30]
    assert FIRST_DELAY == 1 and MAX_DELAY == 30
    assert caplog.messages[0] == "worker 0 (pid 4242) exited with status 3 after 0.2 s; its replacement starts in 1 s"
    # One that then runs steadily starts the count afresh.
    assert delay_after_death(supervisor, lived=STEADY) == 0
    assert delay_after_death(supervisor, lived=0.2) == 1


SCRIPT = """
import logging, socket, sys, os
from gateway import supervisor
from gateway.config import policy_from_dict
from gateway.supervisor import Supervisor

supervisor.FIRST_DELAY = 0.25  # the doubling is what is tested, not the seconds

logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
policy = policy_from_dict({"gateway": {"hostname": "gw.test.example"}}, "<test>")

def work(policy, sock, counts, early, report):
    report.serving()  # it serves, then dies: a fault of its running, not of its start
    raise RuntimeError("this worker dies")

sys.exit(Supervisor(policy, [socket.socket()], work, lambda: policy).run())
"""


def supervise_until(needle: str, script: str = SCRIPT, **popen) -> str:
    """Run ``script``'s supervisor until its log shows ``needle``, then
    SIGTERM it; its whole log.  It must exit 0: stopped while it waited."""
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(script)], cwd=ROOT,
                            stderr=subprocess.PIPE, text=True, **popen)
    log = ""
    try:
        os.set_blocking(proc.stderr.fileno(), False)
        deadline = time.monotonic() + 10
        while needle not in log and time.monotonic() < deadline:
            if select.select([proc.stderr], [], [], 0.5)[0]:
                log += os.read(proc.stderr.fileno(), 65536).decode()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        os.set_blocking(proc.stderr.fileno(), True)
        log += proc.stderr.read()
    finally:
        proc.kill()
        proc.stderr.close()
    return log


def test_a_worker_that_dies_soon_is_retried_ever_more_slowly_until_stopped() -> None:
    # Deaths at about 0, 0.25 and 0.75 s; then it would wait 1 s, but is stopped.
    log = supervise_until("starts in 1 s")
    waits = [line.rsplit("starts ", 1)[1] for line in log.splitlines() if "its replacement starts" in line]
    assert waits == ["in 0.25 s", "in 0.5 s", "in 1 s"]
    assert log.count("RuntimeError: this worker dies") == 3


def supervise(script: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], cwd=ROOT, capture_output=True,
                          text=True, timeout=20)


CANNOT_START = SCRIPT.replace("    report.serving()  # it serves, then dies: a fault of its running, not of its start\n", "")


@pytest.mark.parametrize(("raised", "status"), [
    ('RuntimeError("no resolver")', 1),
    ('PolicyError([Problem("p.toml", "plugins.x", "a plugin that starts (OSError())")])', 2),
])
def test_a_worker_that_fails_before_any_served_stops_the_supervisor(raised: str, status: int) -> None:
    # Every worker of this policy fails alike: restarting them for ever
    # (with a "listening" line logged) hid that nothing would ever serve.
    run = supervise(CANNOT_START.replace('RuntimeError("this worker dies")', raised)
                    .replace("from gateway.config import", "from gateway.config import PolicyError, Problem,")
                    .replace("[socket.socket()]", "[socket.socket(), socket.socket()]"))
    assert run.returncode == status, run.stderr
    assert "its replacement starts" not in run.stderr
    assert "before serving: smtpgate could not start: stopping (the worker's error is above)\n" in run.stderr
    assert run.stderr.endswith(f"\nstopped (exit {status}: smtpgate could not start)\n")
    assert ("no resolver" if status == 1 else "p.toml: plugins.x: a plugin that starts (OSError())") in run.stderr


def test_once_a_worker_has_served_one_that_fails_to_start_is_retried(tmp_path: Path) -> None:
    # Something of its own (memory, a file) failed; the serving worker
    # goes on, and its sibling is tried again.
    first = f"""
def work(policy, sock, counts, early, report):
    import time
    try:
        os.close(os.open({str(tmp_path / "first")!r}, os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        while not os.path.exists({str(tmp_path / "served")!r}):
            time.sleep(0.01)
        raise RuntimeError("the second cannot start")
    report.serving()
    open({str(tmp_path / "served")!r}, "w").close()
    while not early:  # until SIGTERM
        time.sleep(0.05)
"""
    script = SCRIPT[:SCRIPT.index("def work")] + first + SCRIPT[SCRIPT.index("sys.exit"):]
    log = supervise_until("starts in 0.5 s", script.replace("[socket.socket()]", "[socket.socket(), socket.socket()]"))
    assert "could not start" not in log and log.count("RuntimeError: the second cannot start") == 2


def test_a_worker_that_cannot_be_forked_is_tried_again_later(supervisor, monkeypatch, caplog) -> None:
    def no_fork() -> int:
        raise OSError(11, "Resource temporarily unavailable")

    monkeypatch.setattr("os.fork", no_fork)
    slot = supervisor.slots[0]
    with caplog.at_level(logging.ERROR, "smtpgate.server"):
        supervisor._start(slot)
    assert slot.pid == 0 and slot.due is not None and 0.5 < slot.due - time.monotonic() <= 1.0
    assert caplog.messages == [
        "worker 0 could not be started (Resource temporarily unavailable); trying again in 1 s"
    ]


def test_workers_are_replaced_even_if_sigchld_was_ignored_by_whoever_started_us() -> None:
    # SIG_IGN survives exec: a careless service manager hands it down.
    log = supervise_until("starts in 0.5 s", preexec_fn=lambda: signal.signal(signal.SIGCHLD, signal.SIG_IGN))
    assert "its replacement starts in 0.5 s" in log  # the second death was seen too


def test_workers_take_the_signals_the_parent_watches_whoever_blocked_them() -> None:
    # serve blocks SIGHUP from its start, so a reload asked for while it
    # loads its plugins waits for the supervisor; a worker that inherited
    # the block would never reload (nor stop, for a blocked SIGTERM).
    tell = ('import signal; print("worker blocks", sorted(s.name for s in signal.pthread_sigmask(signal.SIG_BLOCK, [])),'
            ' file=sys.stderr, flush=True); raise RuntimeError("done")')
    log = supervise_until("its replacement starts", SCRIPT.replace('raise RuntimeError("this worker dies")', tell),
                          preexec_fn=lambda: signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP, signal.SIGTERM}))
    assert "worker blocks []" in log


def told(supervisor: Supervisor, *reports: bytes) -> None:
    """What the parent makes of ``reports`` down worker 0's pipe."""
    read, write = os.pipe()
    os.set_blocking(read, False)
    slot = supervisor.slots[0]
    slot.report_fd, slot.pid = read, 4242
    try:
        for report in reports:
            os.write(write, report)
            supervisor._hear_all()
    finally:
        os.close(write)
        supervisor._hear_all()
        slot.pid = 0  # no signal may reach the pid made up
    assert slot.report_fd == -1  # closed at the end of the pipe


def offered(supervisor: Supervisor, hostname: str) -> Policy:
    policy = replace(policy_from_dict({"gateway": {"hostname": hostname}}, "p.toml"),
                     digest=hashlib.sha256(hostname.encode()).digest())
    supervisor._check = lambda: policy
    supervisor._reload()
    return policy


def test_a_reload_is_for_new_workers_only_once_a_worker_has_put_it_in_force(supervisor, caplog) -> None:
    running = supervisor.policy
    with caplog.at_level(logging.INFO, "smtpgate.server"):
        new = offered(supervisor, "new.example")
        assert supervisor.policy is running
        told(supervisor, b"-")
        assert supervisor.policy is running
        told(supervisor, b"+" + new.digest[:5], new.digest[5:])  # a report may arrive in pieces
    assert supervisor.policy is new
    assert caplog.messages[1:] == [
        "worker 0 (pid 4242) refused the reload (its error is above): the running policy stays, also for "
        "workers started from now on, unless a worker puts p.toml in force",
        "worker 0 put p.toml in force: workers started from now on get it too",
    ]


def test_of_two_reloads_in_a_row_the_one_a_worker_put_in_force_counts(supervisor) -> None:
    # A worker reads the file at its SIGHUP: two SIGHUPs close together may
    # reach it as one, and a worker may report for the first after another
    # reported for the second.
    first, second = offered(supervisor, "first.example"), offered(supervisor, "second.example")
    told(supervisor, b"+" + second.digest, b"+" + first.digest, SERVING)
    assert supervisor.policy is second and supervisor.served
    told(supervisor, b"+" + hashlib.sha256(b"an edit never checked").digest())
    assert supervisor.policy is second
