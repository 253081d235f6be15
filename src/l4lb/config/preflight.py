"""What ``l4lb run`` will need from this machine, checked without changing anything.

- Files it reads (deny files, CA bundles) exist, are regular files, can be read and parse; a bad
  line is reported as ``file:line``.
- Files it writes (the access log, ``state_file``) can be opened, or created in their directory,
  by this user: checked with ``os.access`` on the file or its directory, so nothing is created or
  truncated by a check.
- Listener and admin binds are addresses this host has (unless ``ip_nonlocal_bind`` lets any
  address be bound), and ports below the unprivileged range have ``CAP_NET_BIND_SERVICE``.

Each finding is a :class:`~l4lb.config.issues.ConfigIssue`: an error is what makes ``run`` fail
(and ``run`` refuses the file with the same message); a warning is what may fail under another
user or once started; a note is what could not be checked from here.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import pwd
import socket
import ssl
import stat
from pathlib import Path

from l4lb.config.issues import ConfigIssue, Severity
from l4lb.config.partial import Parsed
from l4lb.observe.syslog import is_target as is_syslog

__all__ = ["access_file", "read_issues", "run_issues"]

CAP_NET_BIND_SERVICE = 10
"""The capability's bit in ``CapEff`` (linux/capability.h)."""

_SYSTEMD_DIRS = (
    ("/var/log", "LogsDirectory"),
    ("/var/lib", "StateDirectory"),
    ("/run", "RuntimeDirectory"),
)
"""Directories systemd creates for a unit (``DynamicUser=`` cannot create them itself)."""

_FILE_KINDS = (
    (stat.S_ISDIR, "is a directory"),
    (stat.S_ISCHR, "is not a regular file (a character device)"),
    (stat.S_ISBLK, "is not a regular file (a block device)"),
    (stat.S_ISFIFO, "is not a regular file (a FIFO: reading it would wait for a writer)"),
    (stat.S_ISSOCK, "is not a regular file (a socket)"),
)


def _user() -> str:
    uid = os.geteuid()
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def access_file(target: str) -> str | None:
    """The file path of an access-log target, or None when it is not a file (stdout, off)."""
    if target in ("stdout", "off") or is_syslog(target):
        return None
    return target


# --- files read ---------------------------------------------------------------------------------


def _not_a_list_file(path: str) -> str | None:
    """Why ``path`` cannot be a deny list (None if it is a readable regular file; empty is fine).

    Checked with ``stat`` before any ``open``: opening a FIFO would block ``l4lb check``.
    """
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return f"no such file: {path}"
    except OSError as err:
        return f"{path}: cannot read: {err.strerror or err}"
    for test, what in _FILE_KINDS:
        if test(mode):
            return f"{path} {what}; give a text file with one CIDR a line (it may be empty)"
    if not stat.S_ISREG(mode):
        return f"{path} is not a regular file; give a text file with one CIDR a line"
    if not os.access(path, os.R_OK):
        return f"cannot read {path}: Permission denied for user {_user()}"
    return None


def read_issues(parsed: Parsed) -> list[ConfigIssue]:
    """The files the config reads: deny lists (every line parsed) and CA bundles."""
    from l4lb.trust.cidr import CidrError, CidrSet  # every line checked: file:line errors

    issues: list[ConfigIssue] = []
    for n, lst in enumerate(parsed.config.listeners):
        if lst.deny_file is None:
            continue
        where = f"{parsed.listener_path(n)}.deny_file"
        problem = _not_a_list_file(lst.deny_file)
        if problem is None:
            try:
                CidrSet.from_file(lst.deny_file)
            except CidrError as err:
                problem = str(err)
        if problem is not None:
            issues.append(ConfigIssue(where, problem))
    for name, pool in parsed.config.pools.items():
        ca_file = pool.health.tls_ca_file if pool.health is not None else None
        if ca_file is None:
            continue
        try:
            ssl.create_default_context(cafile=ca_file)
        except (OSError, ssl.SSLError) as err:
            why = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
            issues.append(
                ConfigIssue(
                    f"pools.{name}.health.tls_ca_file",
                    f"cannot load CA certificates from {ca_file}: {why} "
                    "(expected a PEM file of CA certificates)",
                )
            )
    return issues


# --- files written ------------------------------------------------------------------------------


def _systemd_directive(directory: str) -> str | None:
    """``LogsDirectory=l4lb`` for ``/var/log/l4lb``: the unit setting that creates it, if any."""
    for base, key in _SYSTEMD_DIRS:
        rel = os.path.relpath(directory, base)
        if not rel.startswith("..") and rel != ".":
            return f"{key}={rel}"
    return None


def _under_systemd() -> bool:
    """Whether this process runs as a systemd service (``$INVOCATION_ID``, systemd >= 232): its
    unit's directories then exist before ``ExecStartPre``, and a missing one is the unit's fault."""
    return bool(os.environ.get("INVOCATION_ID"))


def _writable(key: str, path: str, expected: str) -> ConfigIssue | None:
    """Why this user cannot open ``path`` for appending, or create it (None: it can)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        st = None
    except OSError as err:
        return ConfigIssue(key, f"cannot open {path}: {err.strerror or err}")
    if st is not None:
        if stat.S_ISDIR(st.st_mode):
            return ConfigIssue(key, f"cannot open {path}: Is a directory (expected {expected})")
        if not os.access(path, os.W_OK):
            return ConfigIssue(
                key,
                f"cannot open {path}: Permission denied: user {_user()} may not write it "
                f"(owner uid {st.st_uid}, mode {stat.filemode(st.st_mode)})",
            )
        return None
    return _creatable(key, path, expected)


def _creatable(key: str, path: str, expected: str) -> ConfigIssue | None:
    """Why this user cannot create ``path`` in its directory (None: it can).

    A missing directory that the unit's ``LogsDirectory=``/``StateDirectory=``/
    ``RuntimeDirectory=`` creates is a warning outside systemd (checked before the first start:
    only a run by hand would fail) and an error in a service (the unit lacks the setting).
    """
    parent = os.path.dirname(path) or "."
    directive = _systemd_directive(parent)
    if not os.path.exists(parent):
        missing = (
            f"cannot open {path}: No such file or directory: directory {parent} does not exist"
        )
        if directive is None:
            return ConfigIssue(key, missing)
        if _under_systemd():
            return ConfigIssue(
                key, f"{missing} — add {directive} to the unit (contrib/l4lb.service has it)"
            )
        return ConfigIssue(
            key,
            f"{missing} yet — systemd's {directive} creates it when the unit starts "
            f"(contrib/l4lb.service); l4lb run outside systemd needs it: mkdir -p {parent}",
            severity=Severity.WARNING,
        )
    if not os.path.isdir(parent):
        return ConfigIssue(
            key, f"cannot open {path}: {parent} is not a directory (expected {expected})"
        )
    if not os.access(parent, os.W_OK | os.X_OK):
        owner = f" (in the unit, {directive} makes it the service's own)" if directive else ""
        return ConfigIssue(
            key,
            f"cannot create {path}: Permission denied: user {_user()} may not write in "
            f"directory {parent}{owner}",
        )
    return None


def _write_issues(parsed: Parsed) -> list[ConfigIssue]:
    config = parsed.config
    issues: list[ConfigIssue] = []
    access = access_file(config.log.access) if parsed.valid("log.access") else None
    if access is not None:
        found = _writable("log.access", access, "a writable file path, 'stdout' or 'off'")
        if found is not None:
            issues.append(found)
        elif _is_fifo(access):
            issues.append(
                ConfigIssue(
                    "log.access",
                    f"{access} is a FIFO: opening it waits for a reader, so the balancer "
                    "does not start until something reads the pipe",
                    severity=Severity.WARNING,
                )
            )
    if config.state_file is not None:
        # written aside in its directory, then renamed over: the directory must be writable
        expected = "a file path in a directory l4lb may write, such as /var/lib/l4lb/state.json"
        found = None
        if os.path.isdir(config.state_file):
            found = ConfigIssue(
                "state_file",
                f"cannot write {config.state_file}: Is a directory (expected {expected})",
            )
        elif os.path.exists(config.state_file) and not os.access(config.state_file, os.R_OK):
            found = ConfigIssue(
                "state_file",
                f"cannot read {config.state_file}: Permission denied for user {_user()} "
                "(its states could not be restored)",
            )
        else:
            found = _creatable("state_file", config.state_file, expected)
        if found is not None:
            issues.append(found)
        else:
            issues += _state_file_content(config.state_file)
    return issues


def _state_file_content(path: str) -> list[ConfigIssue]:
    """A state file run would ignore (corrupt, or not one): a warning, as run's is."""
    from l4lb.balancer.state_file import read  # the reader run restores with

    if not os.path.isfile(path):
        return []
    try:
        read(Path(path))
    except (OSError, ValueError) as err:
        why = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        return [
            ConfigIssue(
                "state_file",
                f"{path} cannot be restored ({why}): l4lb run ignores it and starts every "
                "backend in rotation, then replaces it",
                severity=Severity.WARNING,
            )
        ]
    return []


def _is_fifo(path: str) -> bool:
    try:
        return stat.S_ISFIFO(os.stat(path).st_mode)
    except OSError:
        return False


# --- binds --------------------------------------------------------------------------------------


def _proc(name: str) -> str | None:
    try:
        return Path(name).read_text().strip()
    except OSError:
        return None


def _has_capability(bit: int) -> bool:
    for line in (_proc("/proc/self/status") or "").splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> bit & 1)
    return os.geteuid() == 0


def _is_local(host: str, family: socket.AddressFamily) -> bool:
    """Whether ``host`` is one of this host's addresses, told apart from a bind that succeeds
    only through ``ip_nonlocal_bind``: a UDP socket connected to a local address has that
    address as its own (connecting a UDP socket sends nothing)."""
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect((host, 9))
            return str(probe.getsockname()[0]) == host
    except OSError:
        return False


def _bind_issue(where: str, host: str, bind: str) -> ConfigIssue | None:
    """A bind address this host does not have: an error, a note when ``ip_nonlocal_bind`` lets
    run bind it anyway or when it cannot be told."""
    ip = ipaddress.ip_address(host)
    if ip.is_unspecified:
        return None
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    sysctl = f"net.ipv{ip.version}.ip_nonlocal_bind"
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind((host, 0))  # port 0: nothing listens, nothing is kept
    except OSError as err:
        if err.errno != errno.EADDRNOTAVAIL:
            return ConfigIssue(
                where,
                f"cannot check address {host} here: {err.strerror or err}",
                severity=Severity.NOTE,
            )
    else:
        nonlocal_bind = _proc(f"/proc/sys/net/ipv{ip.version}/ip_nonlocal_bind") == "1"
        if not nonlocal_bind or _is_local(host, family):
            return None
        return ConfigIssue(
            where,
            f"this host has no address {host} now; {sysctl} = 1 lets l4lb run bind {bind} "
            "anyway (connections arrive once the address is added)",
            severity=Severity.NOTE,
        )
    prefix = 32 if ip.version == 4 else 128
    return ConfigIssue(
        where,
        f"this host has no address {host}: l4lb run cannot bind {bind} (EADDRNOTAVAIL); add it "
        f"(ip address add {host}/{prefix} dev lo for a VIP), bind '{_wildcard(ip, bind)}', or "
        f"set {sysctl} = 1 to bind addresses not yet present",
    )


def _wildcard(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, bind: str) -> str:
    port = bind.rpartition(":")[2]
    return f"0.0.0.0:{port}" if ip.version == 4 else f"[::]:{port}"


def _port_issue(where: str, port: int, capable: bool, start: int) -> ConfigIssue | None:
    if port >= start or capable:
        return None
    return ConfigIssue(
        where,
        f"port {port} is below {start} (net.ipv4.ip_unprivileged_port_start): binding it "
        f"needs CAP_NET_BIND_SERVICE, which user {_user()} does not have here; the unit in "
        "contrib/ grants it (AmbientCapabilities=CAP_NET_BIND_SERVICE)",
        severity=Severity.WARNING,
    )


def _bind_issues(parsed: Parsed) -> list[ConfigIssue]:
    config = parsed.config
    vips: set[str] = set()
    if config.anycast is not None:  # anycast.check says when a VIP is not local
        for vip in config.anycast.vips:
            try:
                vips.add(str(ipaddress.ip_network(vip).network_address))
            except ValueError:
                continue
    binds = [
        (f"{parsed.listener_path(n)}.bind", lst.bind, lst.bind_addr)
        for n, lst in enumerate(config.listeners)
    ]
    binds += [
        (f"{parsed.listener_path(n)}.monitor", lst.monitor, lst.monitor_addr)
        for n, lst in enumerate(config.listeners)
        if lst.monitor is not None and lst.monitor_addr is not None
    ]
    if config.admin is not None and parsed.valid("admin.bind"):
        binds.append(("admin.bind", config.admin.bind, config.admin.bind_addr))
    capable = _has_capability(CAP_NET_BIND_SERVICE)
    start_text = _proc("/proc/sys/net/ipv4/ip_unprivileged_port_start") or "1024"
    start = int(start_text) if start_text.isdigit() else 1024
    issues: list[ConfigIssue] = []
    for where, bind, (host, port) in binds:
        found = None if host in vips else _bind_issue(where, host, bind)
        port_found = _port_issue(where, port, capable, start)
        issues += [i for i in (found, port_found) if i is not None]
    return issues


def run_issues(parsed: Parsed) -> list[ConfigIssue]:
    """What ``run`` needs from this machine beyond the files it reads: files it writes, binds."""
    return _write_issues(parsed) + _bind_issues(parsed)
