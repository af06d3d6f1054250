"""The command line's own logic (serving is tested in tests/e2e/test_cli.py)."""

import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def smtpgate(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", *args], capture_output=True, text=True, cwd=ROOT, timeout=30)


def policy_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "policy.toml"
    path.write_text(text)
    return path


def lint_warnings(policy: Path) -> list[str]:
    """What ``lint`` warns of a policy it finds valid, without the file name."""
    run = smtpgate("lint", str(policy))
    assert run.returncode == 0 and run.stdout == f"{policy}: ok\n"  # valid, but said
    prefix = f"{policy}: warning: "
    assert all(line.startswith(prefix) for line in run.stderr.splitlines()), run.stderr
    return [line[len(prefix):] for line in run.stderr.splitlines()]


def test_version_is_the_installed_distributions() -> None:
    run = smtpgate("--version")
    assert run.returncode == 0
    assert run.stdout == f"smtpgate {importlib.metadata.version('smtpgate')}\n"


def test_lint_warns_of_settings_that_open_the_relay(tmp_path: Path) -> None:
    policy = policy_file(tmp_path, '[gateway]\nhostname = "gw.example.org"\n'
                         'trusted_networks = ["192.0.2.0/24", "::/0"]\n[plugins.relay]\nenabled = false\n')
    assert lint_warnings(policy) == [
        "plugins.relay is disabled: the next hop must refuse relaying itself",
        "gateway.trusted_networks[1] (::/0) trusts every client to relay",
    ]


def test_lint_warns_of_xclient_from_anyone(tmp_path: Path) -> None:
    # Any client may then say XCLIENT ADDR=192.0.2.1 and relay.
    policy = policy_file(tmp_path, '[gateway]\nhostname = "gw.example.org"\n'
                         'trusted_networks = ["192.0.2.0/24"]\nxclient_hosts = ["127.0.0.1", "::/0"]\n')
    assert lint_warnings(policy) == [
        "gateway.xclient_hosts[1] (::/0) lets every client claim any address with XCLIENT, and pass the "
        "checks that judge it (DNS block and allow lists, SPF); an address in trusted_networks, and relay",
    ]
    # Trusting nobody, a claimed address still passes the DNS lists and SPF:
    # a spammer names an address its forged sender's SPF record allows.
    policy.write_text('[gateway]\nhostname = "gw.example.org"\nxclient_hosts = ["0.0.0.0/0"]\n')
    assert lint_warnings(policy) == [
        "gateway.xclient_hosts[0] (0.0.0.0/0) lets every client claim any address with XCLIENT, and pass the "
        "checks that judge it (DNS block and allow lists, SPF)",
    ]


@pytest.mark.parametrize("trusted", ["", 'trusted_networks = ["192.0.2.0/24"]\n'])
def test_lint_warns_of_proxy_headers_from_anyone(tmp_path: Path, trusted: str) -> None:
    # A client that reaches the port directly names itself in the header:
    # an address on a DNS allow list, or one the SPF record of the sender
    # it forges allows, whether or not some addresses may relay.
    relay = "; an address in trusted_networks, and relay" if trusted else ""
    policy = policy_file(tmp_path, f'[gateway]\nhostname = "gw.example.org"\n{trusted}proxy_protocol = true\n')
    assert lint_warnings(policy) == [
        "gateway.proxy_protocol takes a PROXY header from every peer: a client that reaches this port directly "
        "can claim any address, and pass the checks that judge it (DNS block and allow lists, SPF)"
        f"{relay} (gateway.proxy_hosts names the balancers)",
    ]
    policy.write_text(policy.read_text() + 'proxy_hosts = ["10.1.2.3", "0.0.0.0/0"]\n')
    assert lint_warnings(policy) == [
        "gateway.proxy_hosts[1] (0.0.0.0/0) lets every client claim any address with a PROXY header, and pass "
        f"the checks that judge it (DNS block and allow lists, SPF){relay}",
    ]
    policy.write_text(policy.read_text().replace(', "0.0.0.0/0"', ""))
    assert lint_warnings(policy) == []


def test_lint_warns_of_command_lines_longer_than_postfix_takes(tmp_path: Path) -> None:
    policy = policy_file(tmp_path, '[gateway]\nhostname = "gw.example.org"\nupstream = "127.0.0.1:10025"\n'
                         'max_line_length = 4096\n')
    assert lint_warnings(policy) == [
        "gateway.max_line_length (4096) is over 2048, Postfix's default "
        "line_length_limit: a longer command reaches Postfix cut short and loses its last parameters "
        "(raise line_length_limit in its main.cf to match)",
    ]
    # Delivering into a Maildir, no MTA reads the commands.
    policy.write_text(policy.read_text().replace('"127.0.0.1:10025"', '"maildir:mail"'))
    assert lint_warnings(policy) == []


def test_shipped_policies_give_no_warning() -> None:
    run = smtpgate("lint", *sorted(map(str, (ROOT / "policies").glob("*.toml"))))
    assert run.returncode == 0 and run.stderr == ""


def test_lint_reports_core_and_plugin_problems_in_one_round(tmp_path: Path) -> None:
    policy = policy_file(tmp_path, '[gateway]\nmax_recipients = 0\n[scoring]\nreject = -1\n'
                         '[plugins.spf]\ncheck_helo = "maybe"\n[plugins.dnsbl]\nenabled = false\ntimeout = "x"\n')
    run = smtpgate("lint", str(policy))
    assert run.returncode == 2
    assert run.stderr.splitlines() == [
        f"{policy}: gateway.max_recipients: expected a positive integer",
        f"{policy}: scoring.reject: a threshold above 0",
        f"{policy}: plugins.spf.check_helo: expected true or false, got 'maybe'",
        f"{policy}: plugins.dnsbl.timeout: expected a finite number, got 'x'",
    ]


def test_serve_with_json_logs_reports_a_bad_policy_as_json(tmp_path: Path) -> None:
    policy = policy_file(tmp_path, "[gateway]\nmax_recipients = 0\n")
    run = smtpgate("serve", "--policy", str(policy), "--log-format", "json")
    assert run.returncode == 2
    (record,) = [json.loads(line) for line in run.stderr.splitlines()]
    assert (record["level"], record["message"]) == ("error", f"{policy}: gateway.max_recipients: expected a positive integer")


def test_workers_are_ascii_digits(tmp_path: Path) -> None:
    # int() read it as 2.  No policy file: should the count be taken, serve stops there.
    run = smtpgate("serve", "--workers", "\uff12", "--policy", str(tmp_path / "none.toml"))
    assert run.returncode == 2
    assert "--workers: expected a positive integer, got '\uff12'" in run.stderr
