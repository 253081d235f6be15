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
import tomllib
from dataclasses import dataclass
from pathlib import Path

import msgspec

from l4lb.balancer.logs import events_to, setup_logging
from l4lb.config.loader import ConfigError, ConfigIssue, Severity, load_config
from l4lb.config.schema import Config, ListenerConfig

EXIT_OK, EXIT_CONFIG, EXIT_USAGE, EXIT_BIND = 0, 1, 2, 3

log = logging.getLogger("l4lb.run")

DEFAULT_MAX_CONNS: int = next(
    f.default for f in msgspec.structs.fields(ListenerConfig) if f.name == "max_conns"
)


FDS_PER_CONNECTION = 2
"""A relayed connection holds the client's socket and the backend's; these must fit."""
PIPE_FDS_PER_CONNECTION = 4
"""With ``relay = "splice"``, a pipe (two descriptors) for each direction while bytes are in
flight in it. Pipes are taken lazily from a pool that only makes one when none is free, and a
direction that cannot get one copies through userspace instead (``event=pipe_unavailable``):
wanted for full speed at full load, never needed to serve."""
FDS_SPARE = 64
"""The process's own: standard streams, epoll, the self-pipe, log files, the supervisor's
channel, and up to :data:`LISTENERS_IN_SPARE` listening sockets (one worker with one listener
and no connection holds about 15)."""
LISTENERS_IN_SPARE = 16
FDS_ADMIN = 67
"""The admin API: its listening socket, a worker's private socket, and 64 client slots."""


@dataclass(frozen=True, slots=True)
class FdBudget:
    """The descriptors one process (a worker) may hold at once with every listener full.

    ``max_conns`` counts per worker (each worker enforces it), so this is per process too.
    """

    own: int
    """Not per connection: the process's spare, listeners beyond the spare, admin, checks."""
    conns: int
    """The listeners' ``max_conns``, summed."""
    pipes_per_conn: int
    """Pipe descriptors a connection may hold (0 for the stream relay)."""

    @property
    def needed(self) -> int:
        """What serving every connection needs: their sockets and the process's own."""
        return self.own + FDS_PER_CONNECTION * self.conns

    @property
    def wanted(self) -> int:
        """:attr:`needed`, and a pipe for every direction of every connection (splice)."""
        return self.needed + self.pipes_per_conn * self.conns

    def connections_fit(self, limit: int) -> int:
        """How many relayed connections a descriptor limit of ``limit`` holds."""
        return max(0, (limit - self.own) // FDS_PER_CONNECTION)

    def pipes_fit(self, limit: int) -> int:
        """How many splice pipes (one a busy direction) fit beside every connection's sockets."""
        return max(0, (limit - self.needed) // 2)


def fd_budget(config: Config) -> FdBudget:
    checks = sum(len(p.backends) for p in config.pools.values() if p.health is not None)
    admin = FDS_ADMIN if config.admin is not None else 0
    listeners = max(0, len(config.listeners) - LISTENERS_IN_SPARE)
    return FdBudget(
        own=FDS_SPARE + listeners + admin + checks,
        conns=sum(lc.max_conns for lc in config.listeners),
        pipes_per_conn=PIPE_FDS_PER_CONNECTION if config.relay in ("splice", "kernel") else 0,
    )


def sets_max_conns(path: str) -> bool:
    """Whether the config file sets a listener's ``max_conns`` (else every listener has the
    default); True when the file cannot be read again (it was read a moment ago)."""
    try:
        raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return True
    listeners = raw.get("listeners")
    if not isinstance(listeners, list):
        return False
    return any(isinstance(lc, dict) and "max_conns" in lc for lc in listeners)


def raise_fd_limit(config: Config, max_conns_set: bool = True) -> None:
    """Raise the soft RLIMIT_NOFILE towards what the listeners' ``max_conns`` can use, and say
    once what does not fit.

    Distributions often start services with a soft limit of 1024 (and a far higher hard limit):
    the default ``max_conns = 10000`` would then fail connects with 'Too many open files' long
    before the listener is full. The soft limit goes up to what full load wants (with splice,
    pipes included), at most the hard limit. What is still short is said on one line:

    - only splice pipes short: every connection is served, some directions copy at full load
      (info: nothing for an operator to fix);
    - connections short: how many fit. A warning when the file sets ``max_conns``; when every
      listener has the default, an info line (as HAProxy sizes its default maxconn from the
      limit without a word), with the figures and what to set.
    """
    budget = fd_budget(config)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < budget.wanted:
        target = budget.wanted if hard == resource.RLIM_INFINITY else min(budget.wanted, hard)
        if target > soft:
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            except (OSError, ValueError) as err:
                log.warning("event=fd_limit error=%r", str(err))
            else:
                log.info(
                    "event=fd_limit raised_from=%d to=%d needed=%d wanted=%d",
                    soft,
                    target,
                    budget.needed,
                    budget.wanted,
                )
                soft = target
    if soft == resource.RLIM_INFINITY or soft >= budget.wanted:
        return
    if soft >= budget.needed:
        pipes = budget.pipes_fit(soft)
        log.info(
            "event=fd_limit limit=%d needed=%d wanted=%d splice_pipes=%d detail='every "
            "connection fits; a busy splice direction holds a pipe (2 descriptors) while bytes "
            "are in flight: %d fit at once, beyond that a direction copies through userspace'",
            soft,
            budget.needed,
            budget.wanted,
            pipes,
            pipes,
        )
        return
    fit = budget.connections_fit(soft)
    if max_conns_set:
        log.warning(
            "event=fd_limit limit=%d needed=%d connections_fit=%d max_conns=%d detail='the "
            "listeners' max_conns (per worker) need about %d file descriptors, %d connections "
            "fit: raise the hard limit (ulimit -Hn, systemd LimitNOFILE=) or lower max_conns, "
            "or connections past it will fail with Too many open files'",
            soft,
            budget.needed,
            fit,
            budget.conns,
            budget.needed,
            fit,
        )
    else:
        log.info(
            "event=fd_limit limit=%d needed=%d connections_fit=%d max_conns=%d detail='max_conns "
            "is the default (%d per listener): %d connections fit in the descriptor limit, "
            "connections past it fail with Too many open files; set max_conns, or raise the "
            "hard limit (ulimit -Hn, systemd LimitNOFILE=)'",
            soft,
            budget.needed,
            fit,
            budget.conns,
            DEFAULT_MAX_CONNS,
            fit,
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
        # check_files: what `l4lb check` checks on this machine, refused with the same messages
        config = load_config(args.config, warnings=warnings, check_files=True)
    except ConfigError as err:
        print(err, file=sys.stderr)
        return EXIT_CONFIG
    for warning in warnings:
        if warning.severity is Severity.NOTE:
            log.info("event=config_note detail=%r", str(warning))
        else:
            log.warning("event=config_warning detail=%r", str(warning))
    events_to(config.log.events, config.log.facility, config.log.tag)  # [log] events
    raise_fd_limit(config, sets_max_conns(args.config))
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
