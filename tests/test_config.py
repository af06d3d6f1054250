import dataclasses
import ipaddress
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.config import Endpoint, GatewaySettings, PolicyError, load_policy, parse_table

ROOT = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "p.toml"
    path.write_text(text)
    return path


def problems(path: Path) -> list[str]:
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    return [str(p) for p in info.value.problems]


def test_shipped_policies_are_valid() -> None:
    for path in sorted((ROOT / "policies").glob("*.toml")):
        load_policy(path)


def test_default_policy_documents_every_gateway_key() -> None:
    text = (ROOT / "policies" / "default.toml").read_text()
    for field in GatewaySettings.__dataclass_fields__:
        assert f"\n{field} = " in text, field


def plugin_sections(text: str) -> dict[str, str]:
    """``{name: text}`` of each ``[plugins.NAME]`` table, up to the next
    uncommented ``[plugins.OTHER]`` header (its own sub-tables and commented
    examples stay in)."""
    headers = [(m.start(), m.group(1)) for m in re.finditer(r"(?m)^\[plugins\.([A-Za-z0-9_-]+)[].]", text)]
    sections: dict[str, str] = {}
    for i, (start, name) in enumerate(headers):
        if name in sections:
            continue
        end = next((s for s, other in headers[i + 1 :] if other != name), len(text))
        sections[name] = text[start:end]
    return sections


def test_default_policy_documents_every_plugin_option() -> None:
    from gateway.plugins import installed

    sections = plugin_sections((ROOT / "policies" / "default.toml").read_text())
    builtin = {name: ep for name, ep in installed().items() if ep.value.startswith("plugins.")}
    assert builtin, "no built-in plugins installed"
    missing = []
    for name, ep in sorted(builtin.items()):
        section = sections.get(name)
        if section is None:
            missing.append(f"[plugins.{name}]")
            continue
        options = getattr(ep.load(), "Options", None)
        for field in [f.name for f in dataclasses.fields(options)] if options else []:
            # `KEY = ...` (set, or a commented example) or a (commented) sub-table.
            if not re.search(rf"(?m)^(# )?{field} =|\[plugins\.{name}\.{field}[].]", section):
                missing.append(f"plugins.{name}.{field}")
    assert not missing, f"policies/default.toml does not document: {', '.join(missing)}"


def test_unknown_key_names_file_key_and_expectation(tmp_path: Path) -> None:
    path = write(tmp_path, '[gateway]\nhostnme = "x.example"\n')
    (line,) = problems(path)
    assert line.startswith(f"{path}: gateway.hostnme: unknown key (expected one of: ")


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '[gateway]\nmax_message_size = "big"\nlocal_domains = "example.com"\n'
        'trusted_networks = ["10.0.0.0/33"]\nbare_newline = "allow"\n[dns]\nnameservers = ["x"]\n',
    )
    found = problems(path)
    assert f"{path}: gateway.max_message_size: expected an integer, got 'big'" in found
    assert f"{path}: gateway.local_domains: expected a list, got 'example.com'" in found
    assert f"{path}: gateway.bare_newline: expected one of 'reject', 'normalize', got 'allow'" in found
    assert f"{path}: dns.nameservers[0]: expected \"IP\" or \"IP:PORT\", got 'x'" in found


def test_a_wrong_type_does_not_hide_other_keys_value_problems(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '[gateway]\nmax_recipients = "many"\nhostname = "mx"\n'
        'trusted_networks = ["10.0.0.0/33", 7]\nxclient_hosts = ["10.0.0.0/33"]\n',
    )
    assert problems(path) == [
        f"{path}: gateway.max_recipients: expected an integer, got 'many'",
        f"{path}: gateway.trusted_networks: item 1: expected a string, got 7",
        f"{path}: gateway.hostname: expected a fully qualified host name (with a dot, not an address)",
        f"{path}: gateway.xclient_hosts[0]: expected an address or network, got '10.0.0.0/33'",
    ]


def test_proxy_hosts_are_networks_and_need_proxy_protocol(tmp_path: Path) -> None:
    path = write(tmp_path, '[gateway]\nhostname = "mx.example.org"\nproxy_protocol = true\nproxy_hosts = ["lb"]\n')
    assert problems(path) == [f"{path}: gateway.proxy_hosts[0]: expected an address or network, got 'lb'"]
    path.write_text('[gateway]\nhostname = "mx.example.org"\nproxy_hosts = ["10.1.2.3"]\n')
    assert problems(path) == [
        f"{path}: gateway.proxy_hosts: proxy_protocol = true as well (without it no peer is asked for a PROXY header)",
    ]


def test_semantic_checks(tmp_path: Path) -> None:
    path = write(tmp_path, '[gateway]\ntrusted_networks = ["10.0.0.0/33"]\nupstream = "nowhere"\n')
    found = problems(path)
    assert f"{path}: gateway.trusted_networks[0]: expected an address or network, got '10.0.0.0/33'" in found
    assert f"{path}: gateway.upstream: expected HOST:PORT or maildir:DIR ([V6]:PORT for IPv6)" in found


@pytest.mark.parametrize("text,line", [
    ("[gateway]\ncommand_timeout = nan\n", "gateway.command_timeout: expected a finite number, got nan"),
    ("[gateway]\nshutdown_timeout = inf\n", "gateway.shutdown_timeout: expected a finite number, got inf"),
    ("[gateway]\nupstream_keepalive = 0\n", "gateway.upstream_keepalive: expected a positive number of seconds"),
    # The SMTP front reads at most 64 KiB at once: a longer line could not be taken.
    ("[gateway]\nmax_line_length = 100000\n", "gateway.max_line_length: expected 512 (RFC 5321 §4.5.3.1.4) to 65536"),
    ("[scoring]\ntag = 10\ndefer = nan\nreject = 5\n", "scoring.defer: expected a finite number, got nan"),
    # An integer too large for a float ended in an OverflowError traceback.
    ("[gateway]\nhook_timeout = 1" + "0" * 400 + "\n", "gateway.hook_timeout: expected a finite number, got 1" + "0" * 400),
    ("[scoring]\nreject = -1" + "0" * 400 + "\n", "scoring.reject: expected a finite number, got -1" + "0" * 400),
    ("[scoring]\nreject = 0\n", "scoring.reject: a threshold above 0"),
    ("[scoring]\ntag = -1\n", "scoring.tag: a threshold above 0"),
    ('[gateway]\nhostname = "mx"\n', "gateway.hostname: expected a fully qualified host name (with a dot, not an address)"),
    ('[gateway]\nhostname = "192.0.2.1"\n', "gateway.hostname: expected a fully qualified host name (with a dot, not an address)"),
    ('[gateway]\nlisten = "127.0.0.1:2525"\nupstream = "127.0.0.1:2525"\n',
     "gateway.upstream: another address than listen (the gateway would connect to itself)"),
    ('[gateway]\nlisten = "0.0.0.0:25"\nupstream = "localhost:25"\n',
     "gateway.upstream: another address than listen (the gateway would connect to itself)"),
])
def test_values_that_would_break_at_run_time(tmp_path: Path, text: str, line: str) -> None:
    path = write(tmp_path, text)
    assert f"{path}: {line}" in problems(path)


def lint(*paths: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", "lint", *map(str, paths)], capture_output=True, text=True, cwd=ROOT
    )


def test_a_disabled_plugins_table_is_checked_too(tmp_path: Path) -> None:
    path = write(tmp_path, '[plugins.spf]\nenabled = false\ncheck_helo = "maybe"\n')
    run = lint(path)
    assert run.returncode == 2
    assert f"{path}: plugins.spf.check_helo: expected true or false, got 'maybe'" in run.stderr


def test_a_maildir_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    path = write(tmp_path, f'[gateway]\nupstream = "maildir:{tmp_path / "file"}"\n')
    assert problems(path) == [f"{path}: gateway.upstream: maildir:DIR with a directory ({tmp_path / 'file'} is not one)"]


def test_a_policy_that_is_no_text_file(tmp_path: Path) -> None:
    assert problems(tmp_path) == [f"{tmp_path}: (file): a regular file, not a directory"]
    binary = tmp_path / "b.toml"
    binary.write_bytes(b"[gateway]\nhostname = \"\xff\"\n")
    (line,) = problems(binary)
    assert line.startswith(f"{binary}: (syntax): UTF-8 text")


def test_default_hostname_is_fully_qualified(monkeypatch: pytest.MonkeyPatch) -> None:
    from gateway import config

    monkeypatch.setattr(config.socket, "gethostname", lambda: "vm")
    assert config.default_hostname() == "vm.localdomain"
    monkeypatch.setattr(config.socket, "gethostname", lambda: "localhost")
    assert config.default_hostname() == "localhost.localdomain"
    monkeypatch.setattr(config.socket, "gethostname", lambda: "mx.example.org")
    assert config.default_hostname() == "mx.example.org"
    assert not GatewaySettings().check().get("hostname")


def test_default_hostname_is_postfixs_myhostname() -> None:
    from gateway import config

    postconf = subprocess.run(["/usr/sbin/postconf", "-dh", "myhostname"], capture_output=True, text=True, check=True)
    assert config.default_hostname() == postconf.stdout.strip()


def test_toml_syntax_error(tmp_path: Path) -> None:
    (line,) = problems(write(tmp_path, "[gateway\n"))
    assert line.startswith(f"{tmp_path / 'p.toml'}: (syntax): valid TOML")


def test_unknown_plugin(tmp_path: Path) -> None:
    path = write(tmp_path, "[plugins.nosuch]\n")
    run = lint(path)
    assert run.returncode == 2
    assert f"{path}: plugins.nosuch: an installed plugin (installed: " in run.stderr


def test_lint_cli_ok_and_failure(tmp_path: Path) -> None:
    good = ROOT / "policies" / "default.toml"
    bad = write(tmp_path, '[gateway]\nmax_recipients = 0\n')
    run = lint(good, bad)
    assert run.returncode == 2
    assert f"{good}: ok" in run.stdout
    assert f"{bad}: gateway.max_recipients: expected a positive integer" in run.stderr


def test_serve_refuses_a_bad_policy_before_listening(tmp_path: Path) -> None:
    bad = write(tmp_path, '[gateway]\nlisten = "127.0.0.1"\n')
    run = subprocess.run(
        [sys.executable, "-m", "gateway", "serve", "--policy", str(bad)], capture_output=True, text=True, cwd=ROOT, timeout=30
    )
    assert run.returncode == 2
    assert f"{bad}: gateway.listen: expected HOST:PORT" in run.stderr


def test_toml_nested_too_deeply_is_a_policy_error(tmp_path: Path) -> None:
    # tomllib recurses; 2000 nested arrays ended in a RecursionError traceback.
    path = write(tmp_path, "x = " + "[" * 2000 + "]" * 2000 + "\n")
    assert problems(path) == [f"{path}: (syntax): TOML nested less deeply"]



def test_an_integer_longer_than_python_reads_is_a_policy_error(tmp_path: Path) -> None:
    # tomllib raises a plain ValueError past 4300 digits (CPython's limit
    # on converting text to int): a traceback, exit 1.
    path = write(tmp_path, "[gateway]\nmax_recipients = 1" + "0" * 5000 + "\n")
    (line,) = problems(path)
    assert line.startswith(f"{path}: (syntax): valid TOML with numbers Python can read (Exceeds the limit (4300 digits)")

@pytest.mark.parametrize("text", [
    "::1", "::1:25",  # IPv6 without brackets: is ":25" its port or its last group?
    "[[::1]]:25", "::1]:25", "[127.0.0.1]:25", "smtp://x:25", "a b:25", " 127.0.0.1:25",
    "127.0.0.1:\u0661\u0662",  # digits, but not ASCII ones
    "127.0.0.1:\u00b2", "127.0.0.1:0", "127.0.0.1:65536", ":25",
])
def test_an_endpoint_is_host_colon_port_and_nothing_looser(text: str) -> None:
    # Each was taken and failed only at bind or connect time, if at all.
    with pytest.raises(ValueError, match=r"^expected HOST:PORT or maildir:DIR \(\[V6\]:PORT for IPv6\)$"):
        Endpoint.parse(text, maildir_ok=True)


@pytest.mark.parametrize(("text", "host", "port"), [
    ("127.0.0.1:25", "127.0.0.1", 25), ("[::1]:2525", "::1", 2525), ("localhost:10025", "localhost", 10025),
    ("mx.example.com:25", "mx.example.com", 25), ("0.0.0.0:25", "0.0.0.0", 25),
])
def test_endpoints_that_are(text: str, host: str, port: int) -> None:
    assert (Endpoint.parse(text, maildir_ok=False).host, Endpoint.parse(text, maildir_ok=False).port) == (host, port)


@pytest.mark.parametrize(("text", "key"), [
    ('[plugins.spf]\nactions = { softfail = true }\n', "plugins.spf.actions.softfail"),
    ('[plugins.dnsbl.zones.x]\nzone = "a.example"\ncodes = [1]\n', "plugins.dnsbl.zones.x.codes"),
])
def test_a_wrong_value_inside_a_table_option_names_its_own_key(tmp_path: Path, text: str, key: str) -> None:
    # It named the option holding it ("plugins.spf.actions: expected ...").
    path = write(tmp_path, text)
    run = subprocess.run([sys.executable, "-m", "gateway", "lint", str(path)], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parent.parent, timeout=60)
    assert run.returncode == 2
    assert run.stderr.startswith(f"{path}: {key}: "), run.stderr
    assert "expected " in run.stderr


@pytest.mark.parametrize("ns", [
    "127.0.0.1:\uff15\uff13",  # fullwidth "53": int() reads it as 53
    "[::1]:\u0665\u0663",  # Arabic-Indic "53"
    "127.0.0.1:\u00b9",  # superscript one: isdigit() says yes, int() refuses
    "127.0.0.1: 53", "127.0.0.1:+53", "127.0.0.1:5_3",
])
def test_a_nameserver_port_is_ascii_digits(tmp_path: Path, ns: str) -> None:
    path = write(tmp_path, f'[dns]\nnameservers = ["{ns}"]\n')
    assert problems(path) == [f"{path}: dns.nameservers[0]: expected \"IP\" or \"IP:PORT\", got {ns!r}"]



def local_address() -> str:
    """An address of this machine other than loopback (a UDP socket's
    connect picks the source address and sends nothing)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.254", 9))
        except OSError:
            pytest.skip("no route off loopback")
        address = probe.getsockname()[0]
    if ipaddress.ip_address(address).is_loopback:
        pytest.skip("no address off loopback")
    return str(address)


SELF = "gateway.upstream: another address than listen (the gateway would connect to itself)"


@pytest.mark.parametrize(("listen", "upstream", "itself"), [
    # Each loopback address is an address of its own: a socket bound to
    # 127.0.0.2 does not take connections to 127.0.0.1.
    ("127.0.0.2", "127.0.0.1", False), ("127.0.0.1", "127.0.0.2", False), ("[::1]", "127.0.0.1", False),
    ("127.0.0.1", "[::1]", False), ("localhost", "127.0.0.2", False), ("0.0.0.0", "[::1]", False),
    ("0.0.0.0", "192.0.2.254", False), ("127.0.0.1", "mx.example.com", False),
    ("127.0.0.1", "127.0.0.1", True), ("[::1]", "[0:0::1]", True), ("localhost", "127.0.0.1", True),
    ("127.0.0.1", "localhost", True), ("[::1]", "localhost", True), ("mx.example.com", "MX.example.com", True),
    # A wildcard takes every address of the machine; IPv6's takes IPv4 too.
    ("0.0.0.0", "127.0.0.2", True), ("0.0.0.0", "localhost", True), ("[::]", "127.0.0.1", True),
    ("[::]", "[::1]", True), ("0.0.0.0", "LOCAL", True), ("[::]", "LOCAL", True),
    # Connecting to a wildcard address reaches loopback.
    ("127.0.0.1", "0.0.0.0", True), ("[::1]", "[::]", True), ("127.0.0.2", "0.0.0.0", False),
    ("[::ffff:127.0.0.1]", "127.0.0.1", True),
])
def test_the_gateway_as_its_own_next_hop(tmp_path: Path, listen: str, upstream: str, itself: bool) -> None:
    upstream = upstream.replace("LOCAL", local_address()) if "LOCAL" in upstream else upstream
    path = write(tmp_path, f'[gateway]\nhostname = "gw.example.org"\nlisten = "{listen}:2525"\n'
                           f'upstream = "{upstream}:2525"\n')
    if itself:
        assert problems(path) == [f"{path}: {SELF}"]
    else:
        load_policy(path)
        path.write_text(path.read_text().replace(":2525\"\n", ":2526\"\n", 1))  # another port: never itself
        load_policy(path)


@pytest.mark.parametrize(("make", "kind"), [
    (lambda path: os.mkfifo(path), "a named pipe (FIFO)"),  # open() waited for a writer
    (lambda path: os.symlink("/dev/zero", path), "a character device"),  # tomllib read it forever
    (lambda path: os.symlink("/dev/null", path), "a character device"),  # an empty policy: all defaults
])
@pytest.mark.parametrize("command", ["lint", "serve"])
def test_a_policy_that_is_no_regular_file_is_refused_at_once(tmp_path: Path, make, kind: str, command: str) -> None:
    path = tmp_path / "policy.toml"
    make(path)
    args = [str(path)] if command == "lint" else ["--policy", str(path), "--listen", "127.0.0.1:1"]
    run = subprocess.run([sys.executable, "-m", "gateway", command, *args], capture_output=True, text=True,
                         cwd=tmp_path, timeout=10)
    assert run.returncode == 2
    assert run.stderr.splitlines() == [f"{path}: (file): a regular file, not {kind}"]


def test_a_key_of_several_types_says_them_once(tmp_path: Path) -> None:
    # Each type's whole sentence, joined by "or", repeated the value as
    # often as the key has types ("expected a string, got True or expected
    # a finite number, got True").
    path = write(tmp_path, "[scoring]\nreject = \"high\"\n"
                 "[plugins.spf]\nactions = { fail = true }\n"
                 "[plugins.sender]\nactions = { not_found = [1] }\n"
                 "[plugins.helo]\nactions = { bare_ip = { reject = 1 } }\n"
                 "[plugins.dnsbl.zones.x]\nzone = { a = 1 }\n"
                 "[plugins.dnsbl.zones.y]\ndomains = [\"sender\", 2]\n")
    run = lint(path)
    assert run.returncode == 2
    assert run.stderr.replace(f"{path}: ", "").splitlines() == [
        "scoring.reject: expected a finite number, got 'high'",
        "plugins.spf.actions.fail: expected a string or a finite number, got True",
        "plugins.sender.actions.not_found: expected a string or a finite number, got [1]",
        "plugins.helo.actions.bare_ip: expected a string or a finite number, got {'reject': 1}",
        "plugins.dnsbl.zones.x.zone: expected a string, got {'a': 1}",
        "plugins.dnsbl.zones.y.domains: item 1: expected one of 'sender', 'helo', got 2",
    ]


@dataclasses.dataclass(frozen=True)
class _Shaped:
    names: str | tuple[str, ...] = ""
    table: dict[str, int] = dataclasses.field(default_factory=dict)


def test_a_list_where_one_of_the_types_is_a_list_says_which_item_is_wrong() -> None:
    _, found = parse_table(_Shaped, {"names": ["a", 2], "table": {"a.b": "x", "c": 1}}, "plugins.p", "p.toml")
    assert [str(p) for p in found] == [
        "p.toml: plugins.p.names: item 1: expected a string, got 2",
        # A key with a dot, quoted: the path names the table it is about.
        'p.toml: plugins.p.table."a.b": expected an integer, got \'x\'',
    ]
