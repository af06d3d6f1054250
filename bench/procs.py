"""Child-process bookkeeping: start, wait for a banner, and always clean up.

Every child runs in its own session (process group) so that
  * Ctrl-C in the terminal reaches only us, and we decide the teardown order;
  * a child that forks (a multi-worker gateway, Postfix helpers) is killed as
    a whole group, not just its first process.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

_CLK_TCK = os.sysconf("SC_CLK_TCK")


def group_cpu_seconds(pgid: int) -> tuple[float, float]:
    """User and system CPU used so far by the live processes of group
    ``pgid`` (a proxy and the workers it forked), from /proc."""
    user = system = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue  # gone meanwhile
        # After "pid (comm) ": state ppid pgrp ... utime(14) stime(15)
        fields = stat[stat.rindex(b")") + 2 :].split()
        if int(fields[2]) == pgid:
            user += int(fields[11])
            system += int(fields[12])
    return user / _CLK_TCK, system / _CLK_TCK


class BenchError(RuntimeError):
    """A setup or measurement step failed; the message says which and why."""


def free_port(host: str = "127.0.0.1") -> int:
    """Ask the kernel for a currently free TCP port on host.

    There is a small race until the child binds it; acceptable on a bench box.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class Child:
    """One started subprocess with its combined stdout/stderr log file."""

    def __init__(self, name: str, popen: subprocess.Popen[bytes], log: Path) -> None:
        self.name = name
        self.popen = popen
        self.log = log

    @property
    def pid(self) -> int:
        return self.popen.pid

    def running(self) -> bool:
        return self.popen.poll() is None

    def tail(self, nbytes: int = 2000) -> str:
        """Last bytes of the child's log, for error messages."""
        try:
            with self.log.open("rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - nbytes))
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def kill_group(self, grace: float = 3.0) -> None:
        """SIGTERM the child's process group, then SIGKILL after grace seconds."""
        if self.popen.poll() is not None:
            # The leader is gone, but forked workers may linger in the group.
            # If a live process holds the leader's number now, pids have
            # wrapped (pid_max is 32768 here) and the group may be someone
            # else's: leave it alone.
            if not os.path.exists(f"/proc/{self.popen.pid}"):
                _signal_group(self.popen.pid, signal.SIGKILL)
            return
        _signal_group(self.popen.pid, signal.SIGTERM)
        try:
            self.popen.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
        _signal_group(self.popen.pid, signal.SIGKILL)
        try:
            self.popen.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    # The child was started with start_new_session=True, so its pid is its
    # process-group id and the group holds only what it forked.
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


class Children:
    """Owns every subprocess the bench starts; closing it kills them all.

    Use as a context manager; children are stopped in reverse start order
    (proxy before its upstream) so the proxy does not log spurious errors.
    """

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self._children: list[Child] = []
        self._seq = 0

    def spawn(
        self,
        name: str,
        argv: Sequence[str],
        *,
        cwd: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> Child:
        self._seq += 1
        log = self.logdir / f"{self._seq:02d}-{name}.log"
        with log.open("wb") as out:
            try:
                popen = subprocess.Popen(
                    list(argv),
                    cwd=cwd,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            except OSError as e:
                raise BenchError(f"cannot start {name}: {argv[0]}: {e}") from e
        child = Child(name, popen, log)
        self._children.append(child)
        return child

    def wait(self, child: Child, timeout: float) -> int:
        """Wait for a short-lived child (a load generator) with a hard bound."""
        try:
            rc = child.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            child.kill_group()
            self.forget(child)
            raise BenchError(
                f"{child.name} did not finish within {timeout:.0f}s"
            ) from None
        self.forget(child)
        return rc

    def stop(self, child: Child) -> None:
        child.kill_group()
        self.forget(child)

    def forget(self, child: Child) -> None:
        if child in self._children:
            self._children.remove(child)

    def close(self) -> None:
        while self._children:
            self._children.pop().kill_group()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def wait_for_banner(
    host: str, port: int, timeout: float, child: Child | None = None
) -> None:
    """Poll until host:port answers with an SMTP 220 greeting.

    Bounded by timeout; fails early (with the child's log) if child exits.
    The probe sends QUIT so it costs the server one short session only.
    """
    deadline = time.monotonic() + timeout
    last_err = "no attempt"
    while time.monotonic() < deadline:
        if child is not None and not child.running():
            raise BenchError(
                f"{child.name} exited with code {child.popen.returncode} before "
                f"answering on {host}:{port}; log tail:\n{child.tail()}"
            )
        try:
            with socket.create_connection((host, port), timeout=2.0) as s:
                s.settimeout(2.0)
                greeting = s.recv(512)
                if greeting.startswith(b"220"):
                    try:
                        s.sendall(b"QUIT\r\n")
                        s.recv(512)
                    except OSError:
                        pass
                    return
                last_err = f"unexpected greeting {greeting[:80]!r}"
        except OSError as e:
            last_err = str(e)
        time.sleep(0.05)
    tail = f"; log tail:\n{child.tail()}" if child is not None else ""
    raise BenchError(
        f"{host}:{port} gave no 220 within {timeout:.0f}s ({last_err}){tail}"
    )
