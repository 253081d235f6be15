"""``l4lb check --config FILE``: validate a configuration; exit 0, or 1 listing every error."""

from __future__ import annotations

import argparse
import sys

from l4lb.config.loader import ConfigError, ConfigIssue, load_config


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="l4lb check", description="Validate an l4lb configuration file."
    )
    parser.add_argument("--config", "-c", required=True, metavar="FILE", help="the TOML file")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return 0 if exc.code == 0 else 2
    warnings: list[ConfigIssue] = []
    try:
        config = load_config(args.config, warnings=warnings, check_files=True)
    except ConfigError as err:
        print(err, file=sys.stderr)
        return 1
    for warning in warnings:
        print(f"{args.config}: warning: {warning}", file=sys.stderr)
    pools = ", ".join(sorted(config.pools))
    print(
        f"{args.config}: OK ({len(config.listeners)} listener(s), pools: {pools}, "
        f"workers: {config.workers})"
    )
    return 0
