"""Policy files: TOML in, typed and validated settings out.

Every table is described once, by a frozen dataclass with defaults; a table
is checked against it (unknown keys, wrong types, bad values) and every
problem is reported as ``FILE: key.path: what was expected``, all of them at
once, before anything listens.  Plugins' tables use the same machinery with
each plugin's own ``Options`` dataclass (see :mod:`gateway.plugins`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
import math
import os
import re
import socket
import stat
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .address import is_domain, is_hostname

__all__ = [
    "PolicyError",
    "Problem",
    "Policy",
    "GatewaySettings",
    "DNSSettings",
    "ScoringSettings",
    "Endpoint",
    "load_policy",
    "ip_in",
    "parse_table",
    "toml_key",
    "ascii_int",
]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def ip_in(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, networks: tuple[Network, ...]) -> bool:
    """Whether ``ip`` is in any of ``networks`` (IPv4-mapped IPv6 included)."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in net for net in networks)


def ascii_int(text: str) -> int:
    """``text`` as a number written in ASCII digits only; ValueError else.

    int() also reads other scripts' digits ("\uff15\uff13" is 53), a sign,
    spaces and underscores: a port or a count written so is a typo, or a
    value meant to look like another than it is, never what was meant.
    """
    if not (text.isascii() and text.isdigit()):
        raise ValueError(f"expected ASCII digits, got {text!r}")
    return int(text)


@dataclass(frozen=True)
class Problem:
    file: str
    key: str
    expected: str

    def __str__(self) -> str:
        return f"{self.file}: {self.key}: {self.expected}"


class PolicyError(Exception):
    """A policy file is wrong; ``problems`` lists every finding.

    ``plugins`` holds the file's plugin tables when the core tables were
    wrong, so a caller that can load plugins may check those too and report
    everything at once.
    """

    def __init__(self, problems: list[Problem], plugins: Mapping[str, Any] | None = None):
        self.problems = problems
        self.plugins = plugins
        super().__init__("\n".join(map(str, problems)))


@dataclass(frozen=True)
class Endpoint:
    """Where to listen or forward: ``host:port``, or ``maildir:DIR``."""

    host: str = ""
    port: int = 0
    maildir: Path | None = None

    @classmethod
    def parse(cls, text: str, *, maildir_ok: bool) -> Endpoint:
        if text.startswith("maildir:"):
            if not maildir_ok:
                raise ValueError("expected HOST:PORT")
            if not text[len("maildir:") :]:
                raise ValueError("expected maildir:DIR with a directory")
            return cls(maildir=Path(text[len("maildir:") :]))
        host, sep, port = text.rpartition(":")
        bracketed = host.startswith("[") and host.endswith("]")
        if bracketed:
            host = host[1:-1]
        number = _port(port)
        if not (sep and number and _endpoint_host(host, bracketed)):
            raise ValueError(
                "expected HOST:PORT" + (" or maildir:DIR" if maildir_ok else "") + " ([V6]:PORT for IPv6)"
            )
        return cls(host=host, port=number)

    def __str__(self) -> str:
        if self.maildir is not None:
            return f"maildir:{self.maildir}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def _port(text: str) -> int:
    """``text`` as a TCP or UDP port (1 to 65535), or 0 if it is none."""
    try:
        number = ascii_int(text)
    except ValueError:
        return 0
    return number if 0 < number < 65536 else 0


def _endpoint_host(host: str, bracketed: bool) -> bool:
    """An address, in brackets exactly when IPv6 (``::1:25`` reads two
    ways), or a host name; nothing else (``smtp://x``, ``a b``) is left to
    fail later."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return not bracketed and is_hostname(host)
    return bracketed == (address.version == 6)


def _is_fqdn(name: str) -> bool:
    """A host name with a dot, not an address (RFC 5321 §2.3.5)."""
    try:
        ipaddress.ip_address(name)
        return False
    except ValueError:
        return is_domain(name) and not name.startswith("[") and "." in name.strip(".")


#: The SMTP front's read buffer, so the longest command line it can take.
READ_BUFFER = 64 * 1024


def default_hostname() -> str:
    """Postfix's default ``myhostname``: the kernel's host name if it is
    fully qualified, else that name under ``.localdomain``.  Not a resolver
    lookup (``getfqdn``): /etc/hosts often names 127.0.0.1 ``localhost``
    first, and a greeting as ``localhost`` is what HELO checks refuse."""
    name = socket.gethostname()
    return name if _is_fqdn(name) else f"{name.split('.')[0] or 'localhost'}.localdomain"


_IP = ipaddress.IPv4Address | ipaddress.IPv6Address
_LOOPBACK4, _LOOPBACK6 = ipaddress.IPv4Address("127.0.0.1"), ipaddress.IPv6Address("::1")


def _address(host: str) -> _IP | None:
    """``host`` as an address (an IPv4-mapped one as IPv4: a dual-stack
    socket takes both alike), None for a name."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _is_local(ip: _IP) -> bool:
    """Whether ``ip`` is an address of this machine: one a socket can be
    bound to (nothing is sent)."""
    if ip.is_loopback:
        return True
    family = socket.AF_INET if ip.version == 4 else socket.AF_INET6
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind((str(ip), 0))
    except OSError:
        return False
    return True


def connects_to_itself(listen: Endpoint, upstream: Endpoint) -> bool:
    """Whether connecting to ``upstream`` reaches the socket ``listen``
    binds: the gateway would relay to itself, each connection opening
    another.  Names other than ``localhost`` are not looked up: only the
    same name counts."""
    if upstream.maildir is not None or upstream.port != listen.port:
        return False
    # bind() takes "localhost" as 127.0.0.1 (server.bind: IPv4 for a name);
    # connect() may take either loopback address for it, and takes a
    # wildcard address for loopback (Linux's ip_route_connect).
    bound = _LOOPBACK4 if listen.host == "localhost" else _address(listen.host)
    if upstream.host == "localhost":
        targets: set[_IP] = {_LOOPBACK4, _LOOPBACK6}
    elif (target := _address(upstream.host)) is not None:
        targets = {(_LOOPBACK4 if target.version == 4 else _LOOPBACK6) if target.is_unspecified else target}
    else:
        targets = set()
    if bound is None or not targets:
        return listen.host.lower() == upstream.host.lower()
    if bound.is_unspecified:
        # IPv6's wildcard takes IPv4 connections too (dual stack, as
        # server.bind leaves IPV6_V6ONLY to the system, off by default).
        return any((bound.version == 6 or target.version == 4) and _is_local(target) for target in targets)
    return bound in targets


def parse_nameserver(text: str) -> tuple[str, int]:
    """``IP``, ``IP:PORT``, ``[V6]`` or ``[V6]:PORT`` (a bare v6 has no
    port) as (address, port); ValueError otherwise."""
    host, port = text, "53"
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"bad nameserver {text!r}")
            port = rest[1:]
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
    ipaddress.ip_address(host)  # ValueError for a name or garbage
    number = _port(port)
    if not number:
        raise ValueError(f"bad port in nameserver {text!r}")
    return host, number


@dataclass(frozen=True)
class GatewaySettings:
    """The ``[gateway]`` table.  Key names are the public contract."""

    #: Name in the greeting, the EHLO reply and our headers.
    hostname: str = field(default_factory=default_hostname)
    listen: str = "127.0.0.1:2525"
    #: The next hop: ``HOST:PORT`` of an MTA, or ``maildir:DIR``.
    upstream: str = "maildir:maildir"
    local_domains: tuple[str, ...] = ()
    #: Clients that may relay anywhere.  None by default: an inbound gateway
    #: on port 25 relays for nobody; outbound mail goes through submission.
    trusted_networks: tuple[str, ...] = ()
    #: Hosts allowed to send XCLIENT to us (e.g. a front proxy, tests).
    xclient_hosts: tuple[str, ...] = ()
    proxy_protocol: bool = False
    #: With ``proxy_protocol``, the balancers whose connections begin with a
    #: PROXY header; other peers are ordinary clients.  Empty: every peer
    #: must send one (as Postfix's smtpd_upstream_proxy_protocol).
    proxy_hosts: tuple[str, ...] = ()
    #: Seconds to wait for the PROXY header (Postfix's
    #: smtpd_upstream_proxy_timeout); a balancer sends it at once.
    proxy_timeout: float = 5.0
    max_message_size: int = 10_240_000
    max_recipients: int = 1000
    max_line_length: int = 2048
    max_connections: int = 1000
    max_connections_per_ip: int = 50
    max_errors: int = 20
    max_junk_commands: int = 100
    command_timeout: float = 300.0
    data_timeout: float = 300.0
    upstream_timeout: float = 120.0
    #: The next hop's reply to a whole message (RFC 5321 §4.5.3.2.6 allows
    #: 10 minutes: content filters, milters); giving up earlier makes the
    #: client retry a message the next hop may still queue, a duplicate.
    upstream_data_timeout: float = 600.0
    upstream_connect_timeout: float = 10.0
    #: While a client's message arrives and is judged, the next hop's idle
    #: session gets a NOOP this often: well within Postfix's smtpd_timeout
    #: (300 s), and seldom, since Postfix counts NOOPs as junk commands
    #: (smtpd_junk_command_limit 100; under stress 1, so no keepalive helps
    #: against its 10 s stress timeout).
    upstream_keepalive: float = 120.0
    hook_timeout: float = 30.0
    shutdown_timeout: float = 30.0
    bare_newline: Literal["reject", "normalize"] = "reject"
    #: Look up each client's name (PTR, then forward-confirmed), as
    #: Postfix's smtpd_peername_lookup: plugins and, through XCLIENT, the
    #: next hop's own restrictions and Received header use it.
    peername_lookup: bool = True
    #: Trial mode: log what plugins would have refused, refuse nothing but
    #: what guarding plugins (relay, commands) refuse.
    monitor: bool = False

    def check(self) -> dict[str, str]:
        """Checks beyond types; returns ``{key: expected}`` for each problem."""
        bad: dict[str, str] = {}
        if not _is_fqdn(self.hostname):
            bad["hostname"] = "expected a fully qualified host name (with a dot, not an address)"
        endpoints: dict[str, Endpoint] = {}
        for key, maildir_ok in (("listen", False), ("upstream", True)):
            try:
                endpoints[key] = Endpoint.parse(getattr(self, key), maildir_ok=maildir_ok)
            except ValueError as exc:
                bad[key] = str(exc)
        listen, upstream = endpoints.get("listen"), endpoints.get("upstream")
        if listen is not None and upstream is not None and connects_to_itself(listen, upstream):
            bad["upstream"] = "another address than listen (the gateway would connect to itself)"
        if upstream is not None and upstream.maildir is not None and upstream.maildir.exists() and not upstream.maildir.is_dir():
            bad["upstream"] = f"maildir:DIR with a directory ({upstream.maildir} is not one)"
        for i, domain in enumerate(self.local_domains):
            if not is_domain(domain) or domain.startswith("["):
                bad[f"local_domains[{i}]"] = f"expected a domain name, got {domain!r}"
        for key in ("trusted_networks", "xclient_hosts", "proxy_hosts"):
            for i, net in enumerate(getattr(self, key)):
                try:
                    ipaddress.ip_network(net, strict=False)
                except ValueError:
                    bad[f"{key}[{i}]"] = f"expected an address or network, got {net!r}"
        if self.proxy_hosts and not self.proxy_protocol and "proxy_hosts" not in bad:
            bad["proxy_hosts"] = "proxy_protocol = true as well (without it no peer is asked for a PROXY header)"
        for key in (
            "max_message_size",
            "max_recipients",
            "max_line_length",
            "max_connections",
            "max_connections_per_ip",
            "max_errors",
        ):
            if getattr(self, key) < 1:
                bad[key] = "expected a positive integer"
        if self.max_junk_commands < 0:
            bad["max_junk_commands"] = "expected 0 or more"
        if not 512 <= self.max_line_length <= READ_BUFFER:
            bad["max_line_length"] = f"expected 512 (RFC 5321 §4.5.3.1.4) to {READ_BUFFER}"
        for f in dataclasses.fields(self):
            if f.name.endswith(("_timeout", "_keepalive")) and getattr(self, f.name) <= 0:
                bad[f.name] = "expected a positive number of seconds"
        return bad

    @property
    def listen_endpoint(self) -> Endpoint:
        return Endpoint.parse(self.listen, maildir_ok=False)

    @property
    def upstream_endpoint(self) -> Endpoint:
        return Endpoint.parse(self.upstream, maildir_ok=True)

    @property
    def trusted(self) -> tuple[Network, ...]:
        return tuple(ipaddress.ip_network(n, strict=False) for n in self.trusted_networks)

    @property
    def xclient(self) -> tuple[Network, ...]:
        return tuple(ipaddress.ip_network(n, strict=False) for n in self.xclient_hosts)

    @property
    def proxy(self) -> tuple[Network, ...]:
        return tuple(ipaddress.ip_network(n, strict=False) for n in self.proxy_hosts)

    @property
    def local_domain_set(self) -> frozenset[str]:
        return frozenset(d.lower() for d in self.local_domains)


@dataclass(frozen=True)
class DNSSettings:
    """The ``[dns]`` table, shared by every DNS-using plugin."""

    #: ``"IP"`` or ``"IP:PORT"``; empty means the system resolver
    #: (127.0.0.1 where /etc/resolv.conf names none).
    nameservers: tuple[str, ...] = ()
    timeout: float = 5.0

    def check(self) -> dict[str, str]:
        bad: dict[str, str] = {}
        for i, ns in enumerate(self.nameservers):
            try:
                parse_nameserver(ns)
            except ValueError:
                bad[f"nameservers[{i}]"] = f"expected \"IP\" or \"IP:PORT\", got {ns!r}"
        if self.timeout <= 0:
            bad["timeout"] = "expected a positive number of seconds"
        return bad


@dataclass(frozen=True)
class ScoringSettings:
    """The ``[scoring]`` table: plugin scores summed per transaction and
    compared with thresholds, like rspamd's actions.  No thresholds: scores
    are only recorded in the headers."""

    reject: float | None = None
    defer: float | None = None
    tag: float | None = None
    #: Where the sum is judged: at each RCPT (before the message is sent)
    #: or at the end of DATA (content checks included).
    stage: Literal["rcpt", "data"] = "data"
    #: Add X-Spam-Score / X-Spam-Status to every message that has a score.
    headers: bool = True

    def check(self) -> dict[str, str]:
        order = [(k, getattr(self, k)) for k in ("tag", "defer", "reject") if getattr(self, k) is not None]
        # A threshold at or below 0 would judge mail no plugin scored at all.
        bad = {k: "a threshold above 0" for k, v in order if v <= 0}
        values = [v for _, v in order]
        if not bad and values != sorted(values):
            bad["reject"] = "thresholds with tag <= defer <= reject"
        return bad

    @property
    def enabled(self) -> bool:
        return any(v is not None for v in (self.reject, self.defer, self.tag))


#: Bytes of :attr:`Policy.digest`.
DIGEST_SIZE = hashlib.sha256().digest_size


@dataclass(frozen=True)
class Policy:
    """A loaded policy: core settings plus the raw plugin tables, in order."""

    source: str
    gateway: GatewaySettings = field(default_factory=GatewaySettings)
    dns: DNSSettings = field(default_factory=DNSSettings)
    scoring: ScoringSettings = field(default_factory=ScoringSettings)
    #: ``{name: table}`` in the order the file lists them.
    plugins: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    #: SHA-256 of the file's bytes: a worker tells the parent which content
    #: of the file it put in force by it (gateway/supervisor.py).
    digest: bytes = field(default=bytes(DIGEST_SIZE), compare=False, repr=False)

    def with_overrides(self, **gateway: Any) -> Policy:
        """A copy with some ``[gateway]`` keys replaced (command-line flags)."""
        values = {k: v for k, v in gateway.items() if v is not None}
        if not values:
            return self
        new = dataclasses.replace(self.gateway, **values)
        _raise_if(
            [Problem(f"--{k}", f"gateway.{k}", e) for k, e in new.check().items()]
        )
        return dataclasses.replace(self, gateway=new)


_TOP = {"gateway", "dns", "scoring", "plugins"}


class _NotRegular(OSError):
    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind


_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a named pipe (FIFO)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def _open_regular(path: str | Path) -> typing.BinaryIO:
    """``path`` opened for reading if it is a regular file (a link to one
    too); :class:`_NotRegular` otherwise.  Opened without waiting, then
    judged: a FIFO's open would wait for a writer, /dev/zero would be read
    until memory ran out, and /dev/null would pass for an empty policy."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise _NotRegular(next((kind for test, kind in _KINDS if test(mode)), "a special file"))
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def load_policy(path: str | Path) -> Policy:
    """Read and validate a policy file; raises :class:`PolicyError`."""
    name = str(path)
    try:
        with _open_regular(path) as fh:
            raw = fh.read()
        data = tomllib.loads(raw.decode())
    except FileNotFoundError:
        raise PolicyError([Problem(name, "(file)", "no such file")]) from None
    except _NotRegular as exc:
        raise PolicyError([Problem(name, "(file)", f"a regular file, not {exc.kind}")]) from None
    except OSError as exc:  # no permission
        raise PolicyError([Problem(name, "(file)", f"a readable file ({exc.strerror})")]) from None
    except UnicodeDecodeError as exc:
        raise PolicyError([Problem(name, "(syntax)", f"UTF-8 text (byte {exc.start}: {exc.reason})")]) from None
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError([Problem(name, "(syntax)", f"valid TOML: {exc}")]) from None
    except ValueError as exc:  # an integer of more digits than int() takes (4300)
        raise PolicyError([Problem(name, "(syntax)", f"valid TOML with numbers Python can read ({exc})")]) from None
    except RecursionError:  # tomllib parses nested arrays and tables recursively
        raise PolicyError([Problem(name, "(syntax)", "TOML nested less deeply")]) from None
    return dataclasses.replace(policy_from_dict(data, name), digest=hashlib.sha256(raw).digest())


def policy_from_dict(data: Mapping[str, Any], source: str) -> Policy:
    problems = [
        Problem(source, key, f"unknown table or key (expected one of: {', '.join(sorted(_TOP))})")
        for key in data
        if key not in _TOP
    ]
    gateway, p1 = parse_table(GatewaySettings, data.get("gateway", {}), "gateway", source)
    dns, p2 = parse_table(DNSSettings, data.get("dns", {}), "dns", source)
    scoring, p3 = parse_table(ScoringSettings, data.get("scoring", {}), "scoring", source)
    problems += p1 + p2 + p3
    plugins = data.get("plugins", {})
    if not isinstance(plugins, dict):
        problems.append(Problem(source, "plugins", "expected a table of [plugins.NAME] tables"))
        plugins = {}
    for name, table in plugins.items():
        if not isinstance(table, dict):
            problems.append(Problem(source, f"plugins.{name}", "expected a table"))
    if problems:
        tables = {name: table for name, table in plugins.items() if isinstance(table, dict)}
        raise PolicyError(problems, plugins=tables)
    assert gateway is not None and dns is not None and scoring is not None
    return Policy(source, gateway, dns, scoring, plugins)


def _raise_if(problems: list[Problem]) -> None:
    if problems:
        raise PolicyError(problems)


T = typing.TypeVar("T")


def parse_table(
    cls: type[T], table: Any, prefix: str, source: str, *, extra: frozenset[str] = frozenset(),
    complete: bool = True,
) -> tuple[T | None, list[Problem]]:
    """Build dataclass ``cls`` from a TOML table, collecting every problem.

    Keys in ``extra`` are allowed and skipped (``enabled`` in plugin tables).
    A class may define ``check() -> {key: expected}`` for checks beyond types.
    A field without a default must be in the table, and a ``ValueError`` or
    ``TypeError`` from the class's ``__post_init__`` is a problem too, unless
    ``complete`` is false (a disabled plugin's table: only what it says is
    checked).
    """
    if not isinstance(table, dict):
        return None, [Problem(source, prefix, "expected a table")]
    try:
        fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        hints = typing.get_type_hints(cls)
    except Exception as exc:
        # A plugin's Options that is no dataclass, or whose annotations name
        # what its module imports only for type checkers: said as a problem
        # of the plugin's table, not as a traceback.
        return None, [Problem(source, prefix, f"an Options dataclass the loader can read ({exc!r}) (a bug in the plugin)")]
    # A plugin author's mistake, said whether or not this policy sets the
    # key: a later policy that did would be refused out of the blue.
    untyped = {name for name in fields if not _supported(hints[name])}
    problems = [
        Problem(source, f"{prefix}.{name}", f"an option type the loader takes, not {hints[name]!r} (a bug in the plugin)")
        for name in sorted(untyped)
    ]
    values: dict[str, Any] = {}
    for key, value in table.items():
        path = f"{prefix}.{key}"
        if key in extra or key in untyped:
            continue
        if key not in fields:
            known = ", ".join(sorted(fields)) or "no keys"
            problems.append(Problem(source, path, f"unknown key (expected one of: {known})"))
            continue
        try:
            values[key] = _coerce(value, hints[key])
        except _Inner as exc:
            problems += [Problem(source, f"{path}.{inner}", why) for inner, why in exc.found]
        except TypeError as exc:
            problems.append(Problem(source, path, str(exc)))
    # A key without a default that the table leaves out would otherwise
    # fail the construction below with no problem to show: the plugin
    # would be dropped while lint says ok.
    problems += [
        Problem(source, f"{prefix}.{name}", "a value (this key has no default)")
        for name, f in fields.items()
        if complete and name not in table and f.init
        and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    # The other keys' values are still checked, with defaults standing in
    # for the wrong ones, so one round of lint shows every problem.
    try:
        obj = cls(**values)
    except (TypeError, ValueError) as exc:
        if not problems and complete:
            # The class's own __post_init__ refused the values: as silent
            # as a missing key, unless said here.
            problems.append(Problem(source, prefix, f"valid options ({exc})"))
        return None, problems
    check = getattr(obj, "check", None)
    if check is not None:
        wrong = {p.key.removeprefix(f"{prefix}.") for p in problems}
        problems += [
            Problem(source, f"{prefix}.{k}", e) for k, e in check().items() if re.split(r"[\[.]", k, maxsplit=1)[0] not in wrong
        ]
    return (None if problems else obj), problems


class _Inner(TypeError):
    """Wrong values inside a table option: for each, where (``softfail``,
    or ``x.codes`` for a table of tables) and what was expected, so each
    problem names the key itself, not the option that holds it, and one
    round of lint shows every one of them."""

    def __init__(self, found: list[tuple[str, str]]) -> None:
        super().__init__("; ".join(f"{path}: {why}" for path, why in found))
        self.found = found


def toml_key(name: object) -> str:
    """``name`` as one key of a dotted key path: quoted unless bare, so
    ``zones."zen.spamhaus.org".zone`` names the table it is about."""
    text = str(name)
    if _BARE_KEY.fullmatch(text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _supported(hint: Any) -> bool:
    """Whether :func:`_coerce` can check values of ``hint``."""
    if hint in (bool, int, float, str, Any):
        return True
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return True
    if origin is tuple:
        return len(args) == 2 and args[1] is Ellipsis and _supported(args[0])
    if origin is dict:
        return len(args) == 2 and args[0] is str and _supported(args[1])
    if origin in (typing.Union, types.UnionType):
        return all(arg is type(None) or _supported(arg) for arg in args)
    return False


def _finite(number: int | float) -> bool:
    try:
        return math.isfinite(number)
    except OverflowError:  # an int too large for a float
        return False


_WHAT = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string"}


def _expected(hint: Any) -> str:
    """What a value of ``hint`` is, in the words of the problems."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        return f"one of {', '.join(map(repr, typing.get_args(hint)))}"
    if origin is tuple:
        return "a list"
    if origin is dict:
        return "a table"
    if origin in (typing.Union, types.UnionType):
        words = [_expected(arg) for arg in typing.get_args(hint) if arg is not type(None)]
        return " or ".join(filter(None, (", ".join(words[:-1]), words[-1])))
    return _WHAT[hint]


def _coerce(value: Any, hint: Any) -> Any:
    """Check ``value`` against a type hint; lists become tuples."""
    if hint is Any:
        # The plugin checks it itself, with types of its own for each key
        # (dnsbl's zone tables): a check here could only say every type
        # its keys may have, and hide the plugin's messages.
        return value
    origin = typing.get_origin(hint)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise TypeError(f"expected {_expected(hint)}, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise TypeError(f"expected {_expected(hint)}, got {value!r}")
    if hint is float:
        # TOML has nan and inf; no setting means either (a nan timeout
        # fires at once, a nan threshold compares false with everything).
        # An integer beyond a float's range (TOML integers have no bound)
        # is no finite number either.
        if isinstance(value, (int, float)) and not isinstance(value, bool) and _finite(value):
            return float(value)
        raise TypeError(f"expected {_expected(hint)}, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise TypeError(f"expected {_expected(hint)}, got {value!r}")
    if origin is Literal:
        if value in typing.get_args(hint):
            return value
        raise TypeError(f"expected {_expected(hint)}, got {value!r}")
    if origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"expected {_expected(hint)}, got {value!r}")
        item = args[0]
        out = []
        for i, v in enumerate(value):
            try:
                out.append(_coerce(v, item))
            except TypeError as exc:
                raise TypeError(f"item {i}: {exc}") from None
        return tuple(out)
    if origin is dict:
        key_t, val_t = typing.get_args(hint)
        if not isinstance(value, dict):
            raise TypeError(f"expected {_expected(hint)}, got {value!r}")
        out_d = {}
        found: list[tuple[str, str]] = []
        for k, v in value.items():
            try:
                out_d[_coerce(k, key_t)] = _coerce(v, val_t)
            except _Inner as exc:
                found += [(f"{toml_key(k)}.{path}", why) for path, why in exc.found]
            except TypeError as exc:
                found.append((toml_key(k), str(exc)))
        if found:
            raise _Inner(found)
        return out_d
    if origin in (typing.Union, types.UnionType):
        arms = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        for arg in arms:
            try:
                return _coerce(value, arg)
            except TypeError:
                pass
        # A list (or table) where one of the types is a list (a table): its
        # own problem says which item is wrong.  Otherwise every type once,
        # and the value once.
        shape = tuple if isinstance(value, list) else dict if isinstance(value, dict) else None
        shaped = [arg for arg in arms if shape is not None and typing.get_origin(arg) is shape]
        if len(shaped) == 1:
            return _coerce(value, shaped[0])
        raise TypeError(f"expected {_expected(hint)}, got {value!r}")
    raise TypeError(f"unsupported option type {hint!r}")  # a plugin author's bug
