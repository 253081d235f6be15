"""``l4lb check --config FILE``: validate a configuration; exit 0, or 1 listing every error."""

from __future__ import annotations

import argparse
import errno
import ipaddress
import socket
import sys

from l4lb.config.loader import ConfigError, ConfigIssue, load_config
from l4lb.config.schema import Config


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="l4lb check", description="Validate an l4lb configuration file."
    )
    parser.add_argument("--config", "-c", metavar="FILE", help="the TOML file")
    parser.add_argument("file", nargs="?", metavar="FILE", help="the same, without --config")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return 0 if exc.code == 0 else 2
    if (args.config is None) == (args.file is None):
        parser.print_usage(sys.stderr)
        print("l4lb check: give the file once: l4lb check FILE or --config FILE", file=sys.stderr)
        return 2
    args.config = args.config or args.file
    warnings: list[ConfigIssue] = []
    try:
        config = load_config(args.config, warnings=warnings, check_files=True)
    except ConfigError as err:
        print(err, file=sys.stderr)
        return 1
    if config.relay == "kernel":  # what it needs; run self-tests it and falls back otherwise
        from l4lb.balancer.kernel_relay import REQUIREMENTS

        warnings.append(ConfigIssue("relay", REQUIREMENTS))
    for warning in warnings + bind_issues(config):
        print(f"{args.config}: warning: {warning}", file=sys.stderr)
    pools = ", ".join(sorted(config.pools))
    print(
        f"{args.config}: OK ({len(config.listeners)} listener(s), pools: {pools}, "
        f"workers: {config.workers})"
    )
    return 0


def bind_issues(config: Config) -> list[ConfigIssue]:
    """Listener binds on addresses this host does not have (now): ``run`` would fail to bind.

    Tried with a bind to port 0 on that address (nothing listens, nothing is kept). A warning,
    not an error: an anycast VIP or a transparent listener may get its address later.
    """
    issues = []
    for i, lc in enumerate(config.listeners):
        host, _ = lc.bind_addr
        ip = ipaddress.ip_address(host)
        if ip.is_unspecified:
            continue
        family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
        try:
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                probe.bind((host, 0))
        except OSError as err:
            if err.errno == errno.EADDRNOTAVAIL:
                what = f"this host has no address {host} (l4lb run will fail to bind it)"
            else:
                what = f"cannot check address {host}: {err.strerror or err}"
            issues.append(ConfigIssue(f"listeners[{i}].bind", what))
    return issues
