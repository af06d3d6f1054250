"""The parent process of ``smtpgate serve``: it keeps the workers running.

The parent binds one SO_REUSEPORT socket per worker, forks the workers and
then only watches them:

* A worker that dies before it serves (its plugins or resolver cannot be
  built there: the parent's own check of the policy builds no resolver)
  while no worker has served yet ends ``serve``: every worker of that
  policy would fail alike, and a gateway that restarts its workers for
  ever behind a "listening" line looks up to systemd while it refuses
  every client.  Its exit status is the worker's: 2 for a policy problem
  (``FILE: key: expected ...``), 1 otherwise.
* A worker that dies later (a crash, the OOM killer, a stray ``kill``) is
  replaced on the same socket.  The parent keeps every socket open, so the
  connections the kernel had queued for the dead worker wait for its
  successor instead of being reset.  A worker that dies within
  :data:`STEADY` seconds of its start is replaced after a delay that
  doubles each time (:data:`FIRST_DELAY` up to :data:`MAX_DELAY`), so a
  fault that kills every new worker costs a log line now and then, not a
  busy loop; Postfix's master throttles a failing service the same way.
* SIGTERM and SIGINT are passed on: each worker stops accepting, lets its
  sessions finish (``shutdown_timeout``) and exits.  The parent closes its
  copies of the sockets first, so nothing queues where nobody will accept.
* SIGHUP reloads the policy: the parent reads and checks the file once (an
  error is logged and the running policy stays), then passes the signal on;
  each worker reads the file again and hands new connections to the new
  policy while open sessions finish under the old one (gateway/server.py).
  The parent's check builds no resolver, so plugins may still fail in the
  workers, which then keep the policy they ran.  Workers started from
  then on must run what the others run, not a policy that fails in every
  worker: each worker says down a pipe which file content it put in force
  (its digest) or that it refused, and the parent takes a checked content
  for its new workers only once a worker has put it in force.

Signals are blocked and taken with ``sigtimedwait``, so no code runs in a
signal handler and none can arrive unseen between two checks.  ``serve``
blocks SIGHUP from its start, so a reload asked for while it loads the
policy and plugins is done once the workers run, instead of ending it.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import logging
import os
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from . import log as logsetup
from .config import DIGEST_SIZE, Policy, PolicyError, Problem
from .limits import Counts, SharedCounts

__all__ = ["Supervisor", "Reporter", "policy_for_reload", "STEADY", "FIRST_DELAY", "MAX_DELAY"]

log = logging.getLogger("smtpgate.server")

#: Seconds a worker must have run for its death to count as rare: it is
#: replaced at once.
STEADY = 10.0
#: The wait before replacing a worker that died sooner, doubled for each
#: such death in a row, up to MAX_DELAY.
FIRST_DELAY = 1.0
MAX_DELAY = 30.0

# SIGIO: a worker wrote down its pipe (O_ASYNC), see _Slot.report_fd.
_WATCHED = frozenset({signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGIO})
_STOP = (signal.SIGTERM, signal.SIGINT)

#: What a worker runs: the policy, its socket, its row of the shared
#: connection counts, the signals that arrived while it started, and its
#: end of the pipe to the parent.
Work = Callable[[Policy, socket.socket, Counts, "set[int]", "Reporter"], None]

#: A worker's exit status when its start-up found a policy problem (as
#: ``smtpgate lint`` and ``serve`` exit with for one).
POLICY_PROBLEM = 2

#: What a worker writes down its pipe: it serves; a reload put the file
#: content with the digest that follows in force; a reload was refused.
SERVING = b"!"
APPLIED = b"+"
REFUSED = b"-"


@dataclass
class _Slot:
    index: int
    sock: socket.socket
    pid: int = 0
    started: float = 0.0
    #: Deaths within STEADY of the start, in a row.
    quick_deaths: int = 0
    #: When the replacement of a dead worker is to start.
    due: float | None = None
    #: Our end of the pipe the running worker reports on (-1: none open).
    report_fd: int = -1
    #: What it wrote there that is not a whole report yet.
    heard: bytearray = field(default_factory=bytearray)


class Supervisor:
    """Runs ``work`` in one child process per socket until told to stop.

    :param policy: the policy new workers start with, until a worker puts
        a reloaded one in force.
    :param socks: one listening socket per worker.
    :param work: what a worker runs (gateway.server's worker main).
    :param check: reads and validates the policy file again for SIGHUP;
        raises :class:`PolicyError`.
    """

    def __init__(self, policy: Policy, socks: list[socket.socket], work: Work, check: Callable[[], Policy]):
        self.policy = policy
        self.slots = [_Slot(i, sock) for i, sock in enumerate(socks)]
        self._work = work
        self._check = check
        self._counts = SharedCounts(len(socks))  # before forking: every worker maps it
        self._parent = os.getpid()
        self._mask: set[int | signal.Signals] = set()
        self.stopping = False
        self.status = 0
        #: Some worker has served: from then on, one that dies is replaced.
        self.served = False
        self._failure = "a worker failed"
        #: Policies checked at a SIGHUP that no worker has put in force
        #: yet, by digest, oldest first.
        self._offers: dict[bytes, Policy] = {}
        self._refusal_said = False

    def run(self) -> int:
        """Start the workers and watch them; the exit code once all are gone."""
        # An ignored SIGCHLD (inherited through exec from whoever started
        # us) would reap the workers unseen: nothing would replace them.
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        self._mask = signal.pthread_sigmask(signal.SIG_BLOCK, _WATCHED)
        try:
            for slot in self.slots:
                self._start(slot)
            while not self.stopping or any(slot.pid for slot in self.slots):
                info = self._wait()
                self._hear_all()
                if info is not None and info.si_signo not in (signal.SIGCHLD, signal.SIGIO):
                    self._signal(signal.Signals(info.si_signo))
                self._reap()
                self._start_due()
        finally:
            self._close_sockets()
            for slot in self.slots:
                if slot.report_fd >= 0:
                    os.close(slot.report_fd)
                    slot.report_fd = -1
            # A SIGIO still pending (the last worker's pipe closing) would
            # end the process once unblocked: SIGIO's default action.
            while signal.sigtimedwait({signal.SIGIO}, 0) is not None:
                pass
            signal.pthread_sigmask(signal.SIG_SETMASK, self._mask)
        log.info("stopped%s", "" if self.status == 0 else f" (exit {self.status}: {self._failure})")
        return self.status

    def _wait(self) -> signal.struct_siginfo | None:
        due = [slot.due for slot in self.slots if slot.due is not None]
        if not due:
            return signal.sigwaitinfo(_WATCHED)
        return signal.sigtimedwait(_WATCHED, max(0.0, min(due) - time.monotonic()))

    def _signal(self, signum: signal.Signals) -> None:
        if signum in _STOP:
            if not self.stopping:
                self.stopping = True
                self._close_sockets()
                log.info("%s: stopping; open sessions have %gs to finish (shutdown_timeout)",
                         signum.name, self.policy.gateway.shutdown_timeout)
                for slot in self.slots:
                    slot.due = None
            self._tell(signum)  # again on a second signal: the workers decide
        elif signum == signal.SIGHUP and not self.stopping:
            self._reload()

    def _reload(self) -> None:
        policy = policy_for_reload(self._check, self.policy)
        if policy is None:
            return
        # Not yet for workers started from now on: its plugins may still
        # fail where they are built with a resolver (see _applied).
        self._offers.pop(policy.digest, None)  # as new: offers are taken in order
        self._offers[policy.digest] = policy
        self._refusal_said = False
        log.info("reloading %s in %d worker(s)", policy.source, sum(1 for s in self.slots if s.pid))
        self._tell(signal.SIGHUP)

    def _tell(self, signum: signal.Signals) -> None:
        for slot in self.slots:
            if slot.pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(slot.pid, signum)

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            slot = next((s for s in self.slots if s.pid == pid), None)
            if slot is None:
                continue
            self._hear_all()  # what it said before it died too
            slot.pid = 0
            # Its connections died with it; the other workers must not count them.
            self._counts.clear(slot.index)
            code = os.waitstatus_to_exitcode(status)
            if slot.report_fd >= 0:  # the pipe outlived it: nothing more will come
                os.close(slot.report_fd)
                slot.report_fd = -1
            if self.stopping:
                # Killed by the stop signal we passed on (before it could
                # set up its handler) is a clean stop too.
                if code != 0 and -code not in _STOP and not self.status:
                    self.status = 1
                continue
            if not self.served:
                self._give_up(slot, pid, code)
                continue
            self._schedule(slot, pid, code)

    def _hear_all(self) -> None:
        for slot in self.slots:
            self._hear(slot)

    def _hear(self, slot: _Slot) -> None:
        """Take in what the worker in ``slot`` has said down its pipe (at
        the end of the pipe, the worker is gone: close it)."""
        while slot.report_fd >= 0:
            try:
                chunk = os.read(slot.report_fd, 4096)
            except BlockingIOError:  # alive, and nothing more said yet
                break
            if not chunk:
                os.close(slot.report_fd)
                slot.report_fd = -1
            slot.heard += chunk
        while slot.heard:
            size = 1 + DIGEST_SIZE if slot.heard[:1] == APPLIED else 1
            if len(slot.heard) < size:
                return  # the rest is on its way
            report = bytes(slot.heard[:size])
            del slot.heard[:size]
            if report == SERVING:
                self.served = True
            elif report == REFUSED:
                self._refused(slot)
            else:
                self._applied(slot, report[1:])

    def _applied(self, slot: _Slot, digest: bytes) -> None:
        """The worker in ``slot`` put the file content with ``digest`` in
        force: from now on new workers get it too."""
        if digest not in self._offers:
            # Offered before one a worker has put in force since, or read
            # by the worker after an edit the parent never checked: what
            # the parent has is known to start, so it stays.
            return
        # Older offers go with it: a worker reads the file as it is at its
        # SIGHUP, so none of them can be put in force from now on.
        offers = list(self._offers)
        for older in offers[:offers.index(digest)]:
            del self._offers[older]
        self.policy = self._offers.pop(digest)
        log.info("worker %d put %s in force: workers started from now on get it too", slot.index,
                 self.policy.source)

    def _refused(self, slot: _Slot) -> None:
        if self._offers and not self._refusal_said:
            self._refusal_said = True  # once per SIGHUP: each worker has logged its own error
            log.error("worker %d (pid %d) refused the reload (its error is above): the running policy stays, "
                      "also for workers started from now on, unless a worker puts %s in force",
                      slot.index, slot.pid, next(reversed(self._offers.values())).source)

    def _give_up(self, slot: _Slot, pid: int, code: int) -> None:
        """Stop ``serve``: the worker in ``slot`` died before any served."""
        how = f"was killed by {_signal_name(-code)}" if code < 0 else f"exited with status {code}"
        log.error("worker %d (pid %d) %s before serving: smtpgate could not start: stopping (the worker's "
                  "error is above)", slot.index, pid, how)
        self.status = POLICY_PROBLEM if code == POLICY_PROBLEM else 1
        self._failure = "smtpgate could not start"
        self.stopping = True
        self._close_sockets()
        for other in self.slots:
            other.due = None
        self._tell(signal.SIGTERM)

    def _schedule(self, slot: _Slot, pid: int, code: int, why: str = "") -> None:
        lived = time.monotonic() - slot.started
        slot.quick_deaths = slot.quick_deaths + 1 if lived < STEADY else 0
        delay = min(MAX_DELAY, FIRST_DELAY * 2 ** (slot.quick_deaths - 1)) if slot.quick_deaths else 0.0
        slot.due = time.monotonic() + delay
        when = f"in {delay:g} s" if delay else "now"
        if why:
            log.error("worker %d %s; trying again %s", slot.index, why, when)
            return
        how = f"was killed by {_signal_name(-code)}" if code < 0 else f"exited with status {code}"
        log.error("worker %d (pid %d) %s after %.1f s; its replacement starts %s", slot.index, pid, how, lived, when)

    def _start_due(self) -> None:
        now = time.monotonic()
        for slot in self.slots:
            if slot.due is not None and slot.due <= now and not self.stopping:
                self._start(slot)

    def _start(self, slot: _Slot) -> None:
        slot.due = None
        slot.started = time.monotonic()
        slot.heard.clear()
        try:
            ours, theirs = os.pipe()
        except OSError as exc:
            self._schedule(slot, 0, 0, why=f"could not be started ({exc.strerror})")
            return
        try:
            pid = os.fork()
        except OSError as exc:
            # Out of memory or processes: the workers that run go on, and
            # this one is tried again later, as after a quick death.
            os.close(ours)
            os.close(theirs)
            self._schedule(slot, 0, 0, why=f"could not be started ({exc.strerror})")
            return
        if pid:
            os.close(theirs)
            # A report wakes the parent with SIGIO, as a death does with SIGCHLD.
            fcntl.fcntl(ours, fcntl.F_SETOWN, self._parent)
            fcntl.fcntl(ours, fcntl.F_SETFL, fcntl.fcntl(ours, fcntl.F_GETFL) | os.O_NONBLOCK | os.O_ASYNC)
            slot.pid, slot.report_fd = pid, ours
            return
        code = 0
        try:
            os.close(ours)
            for other in self.slots:
                if other is not slot:
                    other.sock.close()
                    if other.report_fd >= 0:
                        os.close(other.report_fd)
            early = _record_signals()
            # Without the signals we watch, which a worker takes itself (serve
            # blocks SIGHUP from its start, see cli.py).
            signal.pthread_sigmask(signal.SIG_SETMASK, self._mask - _WATCHED)
            _die_with(self._parent)
            self._work(self.policy, slot.sock, self._counts.row(slot.index), early, Reporter(theirs))
        except PolicyError as exc:
            # Its plugins failed where the parent's check did not build them
            # as the worker does (with a resolver): said as lint says it.
            for problem in exc.problems:
                log.error("%s", problem)
            code = POLICY_PROBLEM
        except BaseException:
            log.exception("worker failed")
            code = 1
        finally:
            logsetup.flush()  # os._exit skips logging's own shutdown
            os._exit(code)

    def _close_sockets(self) -> None:
        for slot in self.slots:
            slot.sock.close()


class Reporter:
    """A worker's end of its pipe to the parent."""

    def __init__(self, fd: int) -> None:
        # Never blocking: a parent that reads nothing (stopped) must not
        # stall the sessions; it loses reports, not mail.
        os.set_blocking(fd, False)
        self._fd = fd

    def serving(self) -> None:
        """Once the worker takes connections: its start-up went well."""
        self._say(SERVING)

    def reloaded(self, policy: Policy | None) -> None:
        """After a SIGHUP: the policy now in force for new connections,
        or None when the worker kept the one it ran."""
        self._say(REFUSED if policy is None else APPLIED + policy.digest)

    def _say(self, report: bytes) -> None:
        if self._fd < 0:
            return
        try:
            os.write(self._fd, report)  # whole or not at all: under PIPE_BUF
        except BlockingIOError:
            pass
        except OSError:  # the parent is gone: nobody to tell
            os.close(self._fd)
            self._fd = -1


def policy_for_reload(load: Callable[[], Policy], running: Policy) -> Policy | None:
    """The policy file read again, or None after logging why it cannot
    replace ``running`` (which then stays in force)."""
    try:
        policy = load()
        if policy.gateway.listen_endpoint != running.gateway.listen_endpoint:
            raise PolicyError([Problem(
                policy.source, "gateway.listen",
                f"{running.gateway.listen} as when started (a new address needs a restart)",
            )])
    except PolicyError as exc:
        for problem in exc.problems:
            log.error("reload refused, the running policy stays: %s", problem)
        return None
    except Exception:
        log.exception("reload failed, the running policy stays")
        return None
    return policy


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:  # real-time signals past SIGRTMIN have no name
        return f"signal {number}"


def _record_signals() -> set[int]:
    """Until the worker's event loop takes them over, note the signals that
    arrive instead of dying of them (SIGHUP's default is to end a process)."""
    seen: set[int] = set()
    for signum in (*_STOP, signal.SIGHUP):
        signal.signal(signum, lambda number, _frame: seen.add(number))
    return seen


#: prctl(2) option: the signal a process gets when its parent dies.
_PR_SET_PDEATHSIG = 1


def _die_with(parent: int) -> None:
    """A worker whose parent is gone (killed with SIGKILL, say) must not go
    on holding the port: ask Linux for a SIGTERM then, which drains and
    exits like any other; elsewhere this does nothing."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # it died before the request was made
        os.kill(os.getpid(), signal.SIGTERM)
