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

Signals are blocked and taken with ``sigtimedwait``, so no code runs in a
signal handler and none can arrive unseen between two checks.  ``serve``
blocks SIGHUP from its start, so a reload asked for while it loads the
policy and plugins is done once the workers run, instead of ending it.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

from . import log as logsetup
from .config import Policy, PolicyError, Problem
from .limits import Counts, SharedCounts

__all__ = ["Supervisor", "policy_for_reload", "STEADY", "FIRST_DELAY", "MAX_DELAY"]

log = logging.getLogger("smtpgate.server")

#: Seconds a worker must have run for its death to count as rare: it is
#: replaced at once.
STEADY = 10.0
#: The wait before replacing a worker that died sooner, doubled for each
#: such death in a row, up to MAX_DELAY.
FIRST_DELAY = 1.0
MAX_DELAY = 30.0

_WATCHED = frozenset({signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP})
_STOP = (signal.SIGTERM, signal.SIGINT)

#: What a worker runs: the policy, its socket, its row of the shared
#: connection counts, the signals that arrived while it started, and what
#: to call once it serves.
Work = Callable[[Policy, socket.socket, Counts, "set[int]", Callable[[], None]], None]

#: A worker's exit status when its start-up found a policy problem (as
#: ``smtpgate lint`` and ``serve`` exit with for one).
POLICY_PROBLEM = 2


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
    #: Our end of the pipe the running worker writes to once it serves
    #: (-1: none open).
    ready_fd: int = -1


class Supervisor:
    """Runs ``work`` in one child process per socket until told to stop.

    :param policy: the policy new workers start with.
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
                if info is not None and info.si_signo != signal.SIGCHLD:
                    self._signal(signal.Signals(info.si_signo))
                self._reap()
                self._start_due()
        finally:
            self._close_sockets()
            for slot in self.slots:
                if slot.ready_fd >= 0:
                    os.close(slot.ready_fd)
                    slot.ready_fd = -1
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
        self.policy = policy  # for workers started from now on
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
            slot.pid = 0
            # Its connections died with it; the other workers must not count them.
            self._counts.clear(slot.index)
            code = os.waitstatus_to_exitcode(status)
            served = self._served(slot)
            if self.stopping:
                # Killed by the stop signal we passed on (before it could
                # set up its handler) is a clean stop too.
                if code != 0 and -code not in _STOP and not self.status:
                    self.status = 1
                continue
            if not served and not any(self._served(other) for other in self.slots):
                self._give_up(slot, pid, code)
                continue
            self._schedule(slot, pid, code)

    def _served(self, slot: _Slot) -> bool:
        """Whether some worker has served, reading ``slot``'s pipe: its
        worker wrote there once it did (nothing, and the end of the pipe,
        if it died before)."""
        if slot.ready_fd >= 0:
            try:
                said = os.read(slot.ready_fd, 1)
            except BlockingIOError:  # alive, and not serving yet
                return self.served
            os.close(slot.ready_fd)
            slot.ready_fd = -1
            if said:
                self.served = True
        return self.served

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
            os.set_blocking(ours, False)
            slot.pid, slot.ready_fd = pid, ours
            return
        code = 0
        try:
            os.close(ours)
            for other in self.slots:
                if other is not slot:
                    other.sock.close()
                    if other.ready_fd >= 0:
                        os.close(other.ready_fd)
            early = _record_signals()
            # Without the signals we watch, which a worker takes itself (serve
            # blocks SIGHUP from its start, see cli.py).
            signal.pthread_sigmask(signal.SIG_SETMASK, self._mask - _WATCHED)
            _die_with(self._parent)
            self._work(self.policy, slot.sock, self._counts.row(slot.index), early, _ready_call(theirs))
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


def _ready_call(fd: int) -> Callable[[], None]:
    """What a worker calls once it serves: a byte down its pipe to the
    parent, once."""

    def ready() -> None:
        nonlocal fd
        if fd >= 0:
            try:
                os.write(fd, b"!")
            except OSError:  # the parent is gone: nobody to tell
                pass
            finally:
                os.close(fd)
                fd = -1

    return ready


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
