"""One smtpgate worker in this very process, with no supervising parent.

    python3 -m bench.worker --policy P --listen HOST:PORT --upstream HOST:PORT

``smtpgate serve`` forks its workers from a parent that only watches them,
so a profiler or ``valgrind --tool=callgrind`` started on it would follow
the idle parent.  This runs the worker's own code (gateway.server.run_worker)
here instead; SIGTERM stops it, as it stops a worker.  For measuring only:
nothing replaces it if it dies, and SIGHUP re-applies the same policy.
Its log is set up as ``smtpgate serve``'s is by default (text, info, on
stderr): a decision line per message is part of what a message costs.
"""

from __future__ import annotations

import argparse
import sys

from gateway import log
from gateway.config import load_policy
from gateway.limits import SharedCounts
from gateway.server import bind, run_worker


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m bench.worker", description=__doc__.splitlines()[0])
    parser.add_argument("--policy", required=True)
    parser.add_argument("--listen", required=True)
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--log-format", choices=("text", "json"), default="text")
    parser.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info")
    args = parser.parse_args(argv)
    log.configure(args.log_format, args.log_level)
    policy = load_policy(args.policy).with_overrides(listen=args.listen, upstream=args.upstream)
    endpoint = policy.gateway.listen_endpoint
    sock = bind(endpoint.host, endpoint.port, reuse_port=False)
    run_worker(policy, sock, SharedCounts(1).row(0), set(), lambda: policy)
    return 0


if __name__ == "__main__":
    sys.exit(main())
