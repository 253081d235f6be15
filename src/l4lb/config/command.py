"""``l4lb check FILE`` (or ``--config FILE``): validate a configuration and what ``run`` will
need from this machine, in one pass.

Exit 0: the file is valid (warnings and notes, if any, are printed on stderr and do not fail it).
Exit 1: every error is listed in file order, each with its key path and line; ``l4lb run``
refuses the same file with the same messages. Exit 2: a usage error.
"""

from __future__ import annotations

import argparse
import sys

from l4lb.config.issues import ConfigIssue, Severity
from l4lb.config.loader import ConfigError, load_config


def _print_notes(source: str, notes: list[ConfigIssue]) -> None:
    for note in notes:
        label = "warning" if note.severity is Severity.WARNING else "note"
        print(f"{source}: {label}: {note}", file=sys.stderr)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="l4lb check",
        description="Validate an l4lb configuration file and what l4lb run will need from this "
        "machine. Exit 0 valid (warnings are printed), 1 errors (all listed), 2 usage.",
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
    source = args.config or args.file
    notes: list[ConfigIssue] = []
    try:
        config = load_config(source, warnings=notes, check_files=True)
    except ConfigError as err:
        print(err, file=sys.stderr)
        _print_notes(source, notes)
        return 1
    if config.relay == "kernel":  # what it needs; run self-tests it and falls back otherwise
        from l4lb.balancer.kernel_relay import REQUIREMENTS

        notes.append(ConfigIssue("relay", REQUIREMENTS, severity=Severity.NOTE))
    _print_notes(source, notes)
    pools = ", ".join(sorted(config.pools))
    print(
        f"{source}: OK ({len(config.listeners)} listener(s), pools: {pools}, "
        f"workers: {config.workers})"
    )
    return 0
