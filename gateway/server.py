"""Listeners, worker processes, signals and graceful shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import socket
from collections.abc import Mapping
from typing import TYPE_CHECKING

from . import replies
from .config import Policy, ip_in
from .deadline import Deadline, tick_for
from .dns import Resolver
from .limits import Counts, SharedCounts
from .plugin import Context
from .plugins import load_plugins
from .replies import Reply
from .smtp import SMTPSession
from .upstream import NextHopMemory, Upstream, make_upstream

if TYPE_CHECKING:
    from .session import IPAddress

__all__ = ["Gateway", "serve", "run", "bind"]

log = logging.getLogger("smtpgate.server")


class Gateway:
    """What every session of one process shares: settings, plugins,
    connection counts, and the set of open sessions for shutdown."""

    def __init__(self, policy: Policy, extra: Mapping[str, type] | None = None, counts: Counts | None = None):
        self.policy = policy
        self.settings = policy.gateway
        # One resolver per process: every plugin shares its cache.
        self.context = Context(policy.gateway, Resolver(policy.dns.nameservers, policy.dns.timeout))
        self.registry = load_plugins(policy, self.context, extra=extra)
        self.context = self.registry.context
        self._trusted = self.settings.trusted
        self._xclient = self.settings.xclient
        # Shared with the other workers (gateway/limits.py); alone, our own.
        self._counts = counts if counts is not None else SharedCounts(1).row(0)
        self.sessions: set[SMTPSession] = set()
        self.closing = False
        self._next_hop = NextHopMemory()
        self._upstream = self.settings.upstream_endpoint  # parsed once, not per session
        #: Fields a client's message may not bring: ours are written below
        #: them and a reader would take theirs (smtp.py, at DATA).
        self.forgeable_fields = ("Authentication-Results",) + (
            ("X-Spam-Score", "X-Spam-Status") if policy.scoring.headers else ()
        )
        #: The 220 every accepted connection gets, made once.
        self.greeting = replies.GREETING.format(hostname=self.settings.hostname)

    def new_upstream(self, deadline: Deadline | None = None) -> Upstream:
        return make_upstream(self.settings, self._next_hop, deadline, self._upstream)

    async def watch(self) -> None:
        """Enforce every session's time limits (gateway/deadline.py), until cancelled."""
        s = self.settings
        tick = tick_for(s.command_timeout, s.data_timeout, s.upstream_timeout, s.upstream_data_timeout)
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(tick)
            now = loop.time()
            for session in list(self.sessions):
                for deadline in session.deadlines:
                    deadline.check(now)

    def protocol(self) -> SMTPSession:
        session = SMTPSession(self)
        self.sessions.add(session)
        return session

    def forget(self, session: SMTPSession) -> None:
        self.sessions.discard(session)

    def is_trusted(self, ip: IPAddress) -> bool:
        return ip_in(ip, self._trusted)

    def may_xclient(self, ip: IPAddress | None) -> bool:
        return ip is not None and ip_in(ip, self._xclient)

    def admit(self, ip: str) -> Reply | None:
        """Count a new client; the reply to refuse it with if over a limit.

        The limits hold for all workers together (gateway/limits.py).
        """
        counts = self._counts
        if counts.total() >= self.settings.max_connections or self.closing:
            return replies.SERVICE_BUSY.format(hostname=self.settings.hostname)
        bucket = counts.bucket(ip)
        if counts.of(bucket) >= self.settings.max_connections_per_ip:
            return replies.TOO_MANY_CONNECTIONS.format(hostname=self.settings.hostname, ip=ip)
        counts.add(bucket, 1)
        return None

    def admit_unnamed(self) -> Reply | None:
        """Count a connection whose client is not known yet (it is to send
        a PROXY header) against ``max_connections``; ``release_unnamed``
        once the header is in or the wait is over."""
        if self._counts.total() >= self.settings.max_connections or self.closing:
            return replies.SERVICE_BUSY.format(hostname=self.settings.hostname)
        self._counts.add_unnamed(1)
        return None

    def release_unnamed(self) -> None:
        self._counts.add_unnamed(-1)

    def release(self, ip: str) -> None:
        self._counts.add(self._counts.bucket(ip), -1)

    async def drain(self) -> None:
        """Let open sessions finish, within ``shutdown_timeout``."""
        self.closing = True
        for session in list(self.sessions):
            session.close_idle()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.shutdown_timeout
        while self.sessions and loop.time() < deadline:
            await asyncio.sleep(0.05)
            for session in list(self.sessions):
                session.close_idle()
        for session in list(self.sessions):
            if session.transport is not None:
                session.transport.write(replies.SHUTTING_DOWN.format(hostname=self.settings.hostname).wire())
                session.transport.close()


def bind(host: str, port: int, *, reuse_port: bool) -> socket.socket:
    """A listening socket; with ``reuse_port`` every worker binds its own
    and the kernel spreads connections over them (SO_REUSEPORT)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(1024)
    sock.setblocking(False)
    return sock


async def serve(gateway: Gateway, sock: socket.socket, stop: asyncio.Event) -> None:
    """Serve on ``sock`` until ``stop`` is set, then shut down gracefully."""
    loop = asyncio.get_running_loop()
    # create_server calls listen() again (default 100): keep bind()'s deeper
    # queue, so a burst of connections waits in the kernel rather than being
    # refused.  It costs nothing per message (0.67 against 0.68 ms of CPU in
    # bench/results/2026-12-02-backlog-ab-malloc.txt; an earlier bisect that
    # blamed it for 15 % had met the malloc effect _steady_malloc prevents).
    server = await loop.create_server(gateway.protocol, sock=sock, backlog=1024)
    watch = loop.create_task(gateway.watch())
    try:
        await stop.wait()
    finally:
        server.close()  # stop accepting first, then let sessions finish
        await gateway.drain()
        await server.wait_closed()
        watch.cancel()


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


#: mallopt(3) option: allocations from this size up are mmap'ed.
_M_MMAP_THRESHOLD = -3


def _steady_malloc() -> None:
    """asyncio reads sockets into 256 KiB buffers and shrinks them to what
    arrived.  Above glibc's mmap threshold (128 KiB until it adapts) each
    read is then an mmap, an mremap and an munmap: 36 system calls per
    message, a fifth of a worker's CPU.  Whether glibc adapts depends on the
    process's history, which made benchmarks bimodal.  A fixed threshold of
    1 MiB keeps such buffers on the heap; elsewhere this does nothing."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).mallopt(_M_MMAP_THRESHOLD, 1 << 20)


def _worker(policy: Policy, sock: socket.socket, counts: Counts | None = None) -> None:
    _steady_malloc()

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        gateway = Gateway(policy, counts=counts)
        await serve(gateway, sock, stop)
        # A second SIGTERM (a process-group kill on top of the parent's
        # forwarded one) must not hit a closed loop's wakeup fd while we exit.
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
            signal.signal(sig, signal.SIG_IGN)

    asyncio.run(main())


def run(policy: Policy, workers: int) -> int:
    """Serve ``policy`` with ``workers`` processes; returns the exit code."""
    # Plugins are loaded once here so a broken policy fails before listening.
    load_plugins(policy, Context(policy.gateway))
    endpoint = policy.gateway.listen_endpoint

    def listening() -> None:  # once the socket is bound: a port in use is reported instead
        log.info("listening on %s, next hop %s, %d worker(s)", endpoint, policy.gateway.upstream_endpoint, workers)

    if workers <= 1:
        sock = bind(endpoint.host, endpoint.port, reuse_port=False)
        listening()
        _worker(policy, sock)
        return 0
    # Bind once in the parent first, so a port in use is reported once, early.
    probe = bind(endpoint.host, endpoint.port, reuse_port=True)
    listening()
    shared = SharedCounts(workers)  # before forking: every worker maps it
    children: dict[int, int] = {}
    parent = os.getpid()
    for index in range(workers):
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                _die_with(parent)
                sock = probe
                if index:
                    probe.close()
                    sock = bind(endpoint.host, endpoint.port, reuse_port=True)
                _worker(policy, sock, shared.row(index))
            except BaseException:
                log.exception("worker failed")
                code = 1
            finally:
                os._exit(code)
        children[pid] = index
    probe.close()

    def forward(signum: int, _frame: object) -> None:
        for child in list(children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    status = 0
    while children:
        try:
            pid, code = os.wait()
        except InterruptedError:
            continue
        except ChildProcessError:
            break
        if pid not in children:
            continue
        index = children.pop(pid)
        # Its connections died with it; the other workers must not count them.
        shared.clear(index)
        if os.waitstatus_to_exitcode(code) != 0:
            status = 1
    return status
