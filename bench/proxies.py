"""The proxy under test: how to start it and know it is ready.

--gateway-cmd takes a preset name or a command template, so the same
harness can benchmark smtpgate, the minimal baseline, or any other proxy.
Template placeholders: {python} {listen} {listen_host} {listen_port}
{upstream} {upstream_host} {upstream_port} {workers} {policy}, and with
--checks {checks_policy} (the all-checks policy, to compare two versions of
the gateway with every check on).
"""

from __future__ import annotations

import os
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from bench.procs import BenchError, Child, Children, free_port, wait_for_banner

PRESETS: dict[str, str] = {
    "gateway": (
        "{python} -m gateway serve --policy {policy} --listen {listen} "
        "--upstream {upstream} --workers {workers}"
    ),
    "minimal": (
        "{python} -m bench.minimal_proxy --listen {listen} --upstream {upstream} "
        "--workers {workers}"
    ),
    # One worker in one process (no supervising parent): what callgrind and
    # profilers must follow (bench/worker.py).
    "worker": "{python} -m bench.worker --policy {policy} --listen {listen} --upstream {upstream}",
}
LABELS = {"gateway": "smtpgate", "minimal": "minimal proxy", "worker": "smtpgate"}


@dataclass(frozen=True)
class ProxySpec:
    label: str
    template: str
    #: {policy} for this proxy; None = the bench's --policy.
    policy: Path | None = None


def parse_proxy(arg: str) -> ProxySpec:
    """'gateway' | 'minimal' | 'LABEL=COMMAND TEMPLATE' | 'COMMAND TEMPLATE'."""
    if arg in PRESETS:
        return ProxySpec(LABELS[arg], PRESETS[arg])
    label, sep, rest = arg.partition("=")
    if sep and label and " " not in label and "{" not in label:
        return ProxySpec(label, rest)
    return ProxySpec(Path(shlex.split(arg)[0]).name, arg)


@dataclass
class RunningProxy:
    spec: ProxySpec
    host: str
    port: int
    child: Child


def start_proxy(
    children: Children,
    spec: ProxySpec,
    *,
    upstream_host: str,
    upstream_port: int,
    workers: int,
    policy: Path,
    cwd: Path,
    ready_timeout: float,
    host: str = "127.0.0.1",
    checks_policy: Path | None = None,
) -> RunningProxy:
    port = free_port(host)
    values = {
        "python": sys.executable,
        "listen": f"{host}:{port}",
        "listen_host": host,
        "listen_port": str(port),
        "upstream": f"{upstream_host}:{upstream_port}",
        "upstream_host": upstream_host,
        "upstream_port": str(upstream_port),
        "workers": str(workers),
        "policy": str(spec.policy or policy),
    }
    if checks_policy is not None:
        values["checks_policy"] = str(checks_policy)
    try:
        argv = [part.format(**values) for part in shlex.split(spec.template)]
    except KeyError as exc:
        raise BenchError(f"--gateway-cmd {spec.label}: {{{exc.args[0]}}} is unknown here (checks_policy needs --checks)") from exc
    env = dict(os.environ)
    # So "-m gateway" / "-m bench..." resolve from the repo whatever the caller's cwd.
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(cwd), env.get("PYTHONPATH", "")])
    )
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", spec.label).strip("-") or "proxy"
    child = children.spawn(name, argv, cwd=cwd, env=env)
    wait_for_banner(host, port, timeout=ready_timeout, child=child)
    return RunningProxy(spec, host, port, child)
