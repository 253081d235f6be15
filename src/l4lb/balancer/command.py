"""``l4lb run --config FILE``: validate, then run the balancer in the foreground.

Exit codes: 0 stopped cleanly, 1 invalid config (every error listed, as ``l4lb check``),
2 usage, 3 a listener could not bind.
"""

from __future__ import annotations

import argparse
import logging
import sys

from l4lb.balancer.logs import setup_logging
from l4lb.config.loader import ConfigError, load_config

EXIT_OK, EXIT_CONFIG, EXIT_USAGE, EXIT_BIND = 0, 1, 2, 3

log = logging.getLogger("l4lb.run")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="l4lb run", description="Run the load balancer.")
    parser.add_argument("--config", "-c", required=True, metavar="FILE", help="the TOML file")
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return EXIT_OK if exc.code == 0 else EXIT_USAGE
    setup_logging(getattr(logging, args.log_level.upper()))
    try:
        config = load_config(args.config)
    except ConfigError as err:
        print(err, file=sys.stderr)
        return EXIT_CONFIG
    from l4lb.balancer.listener import BindError, ensure_not_listening

    try:
        for listener in config.listeners:
            ensure_not_listening(*listener.bind_addr)
    except BindError as err:
        log.error("event=bind_failed error=%r", err.strerror)
        return EXIT_BIND
    if config.workers > 1:
        try:
            from l4lb.balancer import workers
        except ImportError:
            log.warning(
                "event=workers_unavailable workers=%d detail='running one process'",
                config.workers,
            )
        else:
            code: int = workers.supervise(args.config, config)
            return code
    from l4lb.balancer.runtime import run

    return run(config, args.config)
