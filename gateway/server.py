"""A worker process: its listener, its Gateway, graceful shutdown and reload."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import ipaddress
import logging
import signal
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from . import __version__, replies
from .address import client_address
from .config import Policy, PolicyError, ip_in
from .deadline import Deadline, tick_for
from .dns import Resolver
from .limits import Counts, SharedCounts
from .plugin import Context
from .plugins import load_plugins
from .replies import Reply
from .smtp import SMTPSession
from .supervisor import Reporter, Supervisor, policy_for_reload
from .upstream import NextHopMemory, Upstream, make_upstream

if TYPE_CHECKING:
    from .session import IPAddress

__all__ = ["ClientAddress", "Gateway", "Service", "serve", "reload", "run", "run_worker", "bind"]

log = logging.getLogger("smtpgate.server")

#: Seconds the event loop may fall behind before that is reported.
_BLOCKED = 1.0
#: Client addresses a Gateway keeps what it made of (Gateway.client).
_CLIENTS_KEPT = 4096


@dataclass(frozen=True, slots=True)
class ClientAddress:
    """An address a client connects from, and what the policy makes of it."""

    #: As the connection reports it.
    peer: IPAddress
    #: As every check takes it (IPv4-mapped IPv6 unmapped).
    ip: IPAddress
    #: ``str(ip)``.
    text: str
    trusted: bool
    xclient: bool
    loopback: bool


class Gateway:
    """What every session of one process shares: settings, plugins,
    connection counts, and the set of open sessions for shutdown."""

    def __init__(
        self,
        policy: Policy,
        extra: Mapping[str, type] | None = None,
        counts: Counts | None = None,
        resolver: Resolver | None = None,
    ):
        self.policy = policy
        self.settings = policy.gateway
        # One resolver per process: every plugin shares its cache (and a
        # reload that leaves [dns] alone passes it on, cache and all).
        self.resolver = resolver or Resolver(policy.dns.nameservers, policy.dns.timeout)
        self.context = Context(policy.gateway, self.resolver)
        self.registry = load_plugins(policy, self.context, extra=extra)
        self.context = self.registry.context
        self._trusted = self.settings.trusted
        self._xclient = self.settings.xclient
        self._proxy = self.settings.proxy
        # Shared with the other workers (gateway/limits.py); alone, our own.
        self.counts = counts if counts is not None else SharedCounts(1).row(0)
        self.sessions: set[SMTPSession] = set()
        self.closing = False
        #: Replaced by a reload: takes no new connections, and its watch
        #: ends with its last session.
        self.retired = False
        self._next_hop = NextHopMemory()
        self._upstream = self.settings.upstream_endpoint  # parsed once, not per session
        #: Fields a client's message may not bring: ours are written below
        #: them and a reader would take theirs (smtp.py, at DATA).
        self.forgeable_fields = ("Authentication-Results", "Received-SPF", replies.TAG_FIELD) + (
            ("X-Spam-Score", "X-Spam-Status") if policy.scoring.headers else ()
        )
        #: The 220 every accepted connection gets, made once.
        self.greeting = replies.GREETING.format(hostname=self.settings.hostname)
        self._clients: dict[str, ClientAddress] = {}

    def new_upstream(self, deadline: Deadline | None = None) -> Upstream:
        return make_upstream(self.settings, self._next_hop, deadline, self._upstream)

    async def watch(self) -> None:
        """Enforce every session's time limits (gateway/deadline.py), until
        cancelled or, once retired, until the last session has ended."""
        s = self.settings
        tick = tick_for(s.command_timeout, s.data_timeout, s.upstream_timeout, s.upstream_data_timeout,
                        s.upstream_keepalive)
        loop = asyncio.get_running_loop()
        last = loop.time()
        while not (self.retired and not self.sessions):
            await asyncio.sleep(tick)
            now = loop.time()
            # Woken this late, the loop ran nothing else meanwhile: some code
            # blocked it (pipeline.py names plain hooks; this catches the rest).
            late = now - last - tick
            if late > _BLOCKED and not self.retired:
                log.warning("the event loop was blocked for about %.1fs: every session of this worker waited "
                            "(blocking work in a plugin?)", late)
            last = now
            for session in list(self.sessions):
                for deadline in session.deadlines:
                    deadline.check(now)

    def protocol(self) -> SMTPSession:
        session = SMTPSession(self)
        self.sessions.add(session)
        return session

    def forget(self, session: SMTPSession) -> None:
        self.sessions.discard(session)

    def client(self, host: str) -> ClientAddress:
        """The address ``host`` (text) and what this policy makes of it.

        Worked out once per address: parsing it, formatting it back and
        looking it up in the policy's networks cost more instructions than
        anything else a connection does before its greeting, and most mail
        comes from addresses seen before.  Raises ValueError as
        ipaddress does, and for a scoped address.
        """
        known = self._clients.get(host)
        if known is None:
            peer = ipaddress.ip_address(host)
            ip = client_address(peer)
            known = ClientAddress(peer, ip, str(ip), self.is_trusted(ip), self.may_xclient(ip), ip.is_loopback)
            if len(self._clients) >= _CLIENTS_KEPT:
                self._clients.clear()  # simpler than least-recently-used, and rare
            self._clients[host] = known
        return known

    def is_trusted(self, ip: IPAddress) -> bool:
        return ip_in(ip, self._trusted)

    def may_xclient(self, ip: IPAddress | None) -> bool:
        return ip is not None and ip_in(ip, self._xclient)

    def expects_proxy(self, peer: IPAddress) -> bool:
        """Whether a connection from ``peer`` must begin with a PROXY header."""
        return self.settings.proxy_protocol and (not self._proxy or ip_in(peer, self._proxy))

    async def admit(self, ip: str | None) -> Reply | None:
        """Count a new client; the reply to refuse it with if over a limit.
        With ``ip`` None it counts against ``max_connections`` only: a
        connection whose client is not known yet (it is to send a PROXY
        header), or a front proxy in ``xclient_hosts``.

        The limits hold for all workers together (gateway/limits.py).
        """
        if self.closing:
            return replies.SERVICE_BUSY.format(hostname=self.settings.hostname)
        counts, settings = self.counts, self.settings
        bucket = None if ip is None else counts.bucket(ip)
        full = await counts.admit(bucket, settings.max_connections, settings.max_connections_per_ip)
        if full == "total":
            return replies.SERVICE_BUSY.format(hostname=settings.hostname)
        if full == "address":
            return replies.TOO_MANY_CONNECTIONS.format(hostname=settings.hostname, ip=ip)
        return None

    def release(self, ip: str | None) -> None:
        """Stop counting a connection :meth:`admit` counted under ``ip``."""
        if ip is None:
            self.counts.add_unnamed(-1)
        else:
            self.counts.add(self.counts.bucket(ip), -1)

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
        if self.sessions:
            # Their clients keep the mail and retry; the administrator
            # should know that a longer shutdown_timeout would have spared it.
            log.warning("shutdown_timeout (%gs) is over: %d session(s) closed with 421",
                        self.settings.shutdown_timeout, len(self.sessions))
        for session in list(self.sessions):
            session.hang_up(replies.SHUTTING_DOWN.format(hostname=self.settings.hostname))


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


class Service:
    """A worker's listener side: the Gateway its new connections go to.

    :meth:`replace` (a reload) puts a Gateway for a new policy in place:
    connections accepted from then on get it, while sessions already open
    finish under the policy they started with, as a Postfix smtpd process
    keeps its configuration until it exits.  Nobody is cut off by a reload.
    """

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self._watches: dict[Gateway, asyncio.Task[None]] = {}

    def protocol(self) -> SMTPSession:
        return self.gateway.protocol()

    def start(self) -> None:
        if self.gateway not in self._watches:  # a reload may have come first
            self._watch(self.gateway)

    def _watch(self, gateway: Gateway) -> None:
        task = asyncio.get_running_loop().create_task(gateway.watch())
        self._watches[gateway] = task
        task.add_done_callback(lambda _: self._watches.pop(gateway, None))

    def replace(self, gateway: Gateway) -> None:
        old, self.gateway = self.gateway, gateway
        old.retired = True
        self._watch(gateway)

    @property
    def gateways(self) -> list[Gateway]:
        """The current Gateway and the retired ones with sessions left."""
        return [self.gateway, *(g for g in self._watches if g is not self.gateway)]

    async def stop(self) -> None:
        """Let every open session finish (bounded), then stop watching."""
        await asyncio.gather(*(g.drain() for g in self.gateways))
        for task in list(self._watches.values()):
            task.cancel()


async def serve(
    service: Service, sock: socket.socket, stop: asyncio.Event, ready: Callable[[], None] | None = None,
) -> None:
    """Serve on ``sock`` until ``stop`` is set, then shut down gracefully.
    ``ready`` is called once connections are taken."""
    loop = asyncio.get_running_loop()
    # create_server calls listen() again (default 100): keep bind()'s deeper
    # queue, so a burst of connections waits in the kernel rather than being
    # refused.  It costs nothing per message (0.67 against 0.68 ms of CPU in
    # bench/results/2026-12-02-backlog-ab-malloc.txt; an earlier bisect that
    # blamed it for 15 % had met the malloc effect _steady_malloc prevents).
    server = await loop.create_server(service.protocol, sock=sock, backlog=1024)
    service.start()
    if ready is not None:
        ready()
    try:
        await stop.wait()
    finally:
        server.close()  # stop accepting first, then let sessions finish
        await service.stop()
        await server.wait_closed()


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


def run_worker(
    policy: Policy, sock: socket.socket, counts: Counts, early: set[int], load: Callable[[], Policy],
    ready: Callable[[], None] | None = None, reloaded: Callable[[Policy | None], None] | None = None,
) -> None:
    """A worker's life: serve until SIGTERM or SIGINT; reload on SIGHUP.

    The supervisor runs it in each child; bench/worker.py runs it alone,
    in one process that a profiler or callgrind can follow.

    :param early: signals that arrived before the event loop took over.
    :param load: reads and checks the policy file again (for SIGHUP).
    :param ready: called once the worker serves (the supervisor's sign
        that its start-up went well).
    :param reloaded: called after each SIGHUP with what :func:`reload`
        returned (so the supervisor knows which policy its workers run).
    """
    _steady_malloc()

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        service = Service(Gateway(policy, counts=counts))
        # What start-up built (modules, the policy, the plugins and their
        # tables) lives as long as the worker: frozen, the collector's full
        # collections stop walking it again and again (about 1 % of a
        # message with every check on).  reload() thaws it.
        gc.freeze()

        def on_hup() -> None:
            if not stop.is_set():
                policy = reload(service, load)
                if reloaded is not None:
                    reloaded(policy)

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, on_hup)
        if early & {signal.SIGTERM, signal.SIGINT}:
            stop.set()
        elif signal.SIGHUP in early:
            on_hup()
        await serve(service, sock, stop, ready)
        # A second SIGTERM (a process-group kill on top of the parent's
        # forwarded one) must not hit a closed loop's wakeup fd while we exit.
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
            signal.signal(sig, signal.SIG_IGN)

    asyncio.run(main())


def reload(
    service: Service, load: Callable[[], Policy], extra: Mapping[str, type] | None = None,
) -> Policy | None:
    """Put the policy file's current content in force for new connections
    and return it, or log why not, keep the running policy and return None."""
    policy = policy_for_reload(load, service.gateway.policy)
    if policy is None:
        return None
    # Collectable again, so the running policy's objects go once its
    # sessions end (what is frozen never is).
    gc.unfreeze()
    try:
        # Plugins are built here, with the new options, before anything
        # changes; the DNS cache stays warm unless [dns] itself changed.
        running = service.gateway
        resolver = running.resolver if policy.dns == running.policy.dns else None
        gateway = Gateway(policy, extra, counts=running.counts, resolver=resolver)
    except PolicyError as exc:
        # Named problems (a plugin that cannot start has had its traceback
        # logged by the loader): said as the supervisor says them.
        for problem in exc.problems:
            log.error("reload refused, the running policy stays: %s", problem)
        return None
    except Exception:
        log.exception("reload failed, the running policy stays")
        return None
    service.replace(gateway)
    log.info("policy %s in force for new connections", policy.source)
    return policy


def run(policy: Policy, workers: int, load: Callable[[bool], Policy]) -> int:
    """Serve ``policy`` with ``workers`` processes under a supervising
    parent (gateway/supervisor.py); returns the exit code.

    :param policy: checked as ``load`` checks it (plugins built once), so a
        broken policy has failed before anything listens.
    :param load: reads and checks the policy file again for a reload;
        ``load(True)`` also warns of risky settings (the parent's check).
    """
    endpoint = policy.gateway.listen_endpoint
    # Bound here, so a port in use is reported once, early.  The first bind
    # is exclusive: a second smtpgate on the same port (SO_REUSEPORT would
    # let it share the port with us) fails here too.
    first = bind(endpoint.host, endpoint.port, reuse_port=False)
    socks = [first]
    if workers > 1:
        port = first.getsockname()[1]  # also when the policy says port 0
        first.close()
        socks = [bind(endpoint.host, port, reuse_port=True) for _ in range(workers)]
    log.info("smtpgate %s listening on %s, next hop %s, %d worker(s)",
             __version__, endpoint, policy.gateway.upstream_endpoint, workers)

    def work(policy: Policy, sock: socket.socket, counts: Counts, early: set[int], report: Reporter) -> None:
        run_worker(policy, sock, counts, early, lambda: load(False), report.serving, report.reloaded)

    return Supervisor(policy, socks, work, lambda: load(True)).run()
