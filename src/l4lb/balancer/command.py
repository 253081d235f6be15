"""``l4lb run --config FILE``: validate, then run the balancer in the foreground.

Exit codes: 0 stopped cleanly, 1 invalid config (every error listed, as ``l4lb check``),
2 usage, 3 a listener could not bind.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import resource
import sys

from l4lb.balancer.logs import events_to, setup_logging
from l4lb.config.loader import ConfigError, ConfigIssue, load_config
from l4lb.config.schema import Config

EXIT_OK, EXIT_CONFIG, EXIT_USAGE, EXIT_BIND = 0, 1, 2, 3

log = logging.getLogger("l4lb.run")


FDS_PER_CONNECTION = 2
"""A relayed connection holds the client's socket and the backend's (the stream relay; the
splice relay's own figures, pipes included, are ``splice.FDS_PER_CONNECTION`` and
``splice.FDS_SPARE``)."""
FDS_SPARE = 64
"""The process's own: standard streams, epoll, the self-pipe, log files, the supervisor's
channel, and up to :data:`LISTENERS_IN_SPARE` listening sockets (one worker with one listener
and no connection holds about 15)."""
LISTENERS_IN_SPARE = 16
FDS_ADMIN = 67
"""The admin API: its listening socket, a worker's private socket, and 64 client slots."""


def fds_needed(config: Config) -> int:
    """Descriptors one process (a worker) may hold at once with every listener full.

    ``max_conns`` counts per worker (each worker enforces it), so this is per process too.
    """
    per_conn, spare = FDS_PER_CONNECTION, FDS_SPARE
    if config.relay == "splice":  # and a pipe for each busy direction, spare pipes kept
        from l4lb.balancer import splice

        per_conn, spare = splice.FDS_PER_CONNECTION, spare + splice.FDS_SPARE
    conns = sum(lc.max_conns for lc in config.listeners)
    checks = sum(len(p.backends) for p in config.pools.values() if p.health is not None)
    admin = FDS_ADMIN if config.admin is not None else 0
    listeners = max(0, len(config.listeners) - LISTENERS_IN_SPARE)
    return spare + listeners + admin + checks + per_conn * conns


def raise_fd_limit(config: Config) -> None:
    """Raise the soft RLIMIT_NOFILE towards what the listeners' ``max_conns`` can use.

    Distributions often start services with a soft limit of 1024 (and a far higher hard limit):
    the default ``max_conns = 10000`` would then fail connects with 'Too many open files' long
    before the listener is full. With ``relay = "splice"`` each busy direction also holds a
    pipe (two descriptors). Warn when even the hard limit is too low.
    """
    need = fds_needed(config)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        target = need if hard == resource.RLIM_INFINITY else min(need, hard)
        if target > soft:
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            except (OSError, ValueError) as err:
                log.warning("event=fd_limit error=%r", str(err))
            else:
                log.info("event=fd_limit raised_from=%d to=%d needed=%d", soft, target, need)
                soft = target
    if soft != resource.RLIM_INFINITY and soft < need:
        log.warning(
            "event=fd_limit limit=%d needed=%d detail='the listeners' max_conns (per worker) need "
            "about %d file descriptors: raise the hard limit (ulimit -Hn, systemd LimitNOFILE=) "
            "or lower max_conns, or connections will fail with Too many open files'",
            soft,
            need,
            need,
        )


def keep_standard_fds() -> None:
    """Put ``/dev/null`` on a closed stdin, stdout or stderr.

    Started with one of them closed (``>&-``, some supervisors), the next socket would take its
    number, and access-log or log lines written to "stdout" or "stderr" would go into a client's
    connection.
    """
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)


def warn_unprotected_admin(config: Config) -> None:
    """Say so when the admin API's POSTs (drain, disable, reload) are open beyond loopback."""
    if config.admin is None or config.admin.token:
        return
    host = config.admin.bind_addr[0]
    if not ipaddress.ip_address(host).is_loopback:
        log.warning(
            "event=admin_unprotected bind=%s detail='the admin API listens beyond loopback with "
            "no token: anyone who reaches it can drain, disable and reload; set [admin] token'",
            config.admin.bind,
        )


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
    keep_standard_fds()
    setup_logging(getattr(logging, args.log_level.upper()))
    warnings: list[ConfigIssue] = []
    try:
        config = load_config(args.config, warnings=warnings)
    except ConfigError as err:
        print(err, file=sys.stderr)
        return EXIT_CONFIG
    for warning in warnings:
        log.warning("event=config_warning detail=%r", str(warning))
    events_to(config.log.events, config.log.facility, config.log.tag)  # [log] events
    raise_fd_limit(config)
    warn_unprotected_admin(config)
    from l4lb.balancer.listener import BindError, ensure_not_listening

    for i, listener in enumerate(config.listeners):
        try:
            ensure_not_listening(*listener.bind_addr)
        except BindError as err:
            log.error(
                "event=bind_failed listener=%s error=%r",
                listener.name,
                f"listeners[{i}].bind: {err.strerror}",
            )
            return EXIT_BIND
    if config.workers > 1:
        from l4lb.balancer import transparent, workers

        try:  # refuse once here, not in every worker the supervisor would restart
            transparent.prepare(config, None)
        except transparent.TransparentError as err:
            transparent.log_problems(err, "start_failed")
            return EXIT_CONFIG

        code: int = workers.supervise(args.config, config)
        return code
    from l4lb.balancer.runtime import run

    return run(config, args.config)
