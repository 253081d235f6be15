"""Transparent mode: connect to a backend from the client's own address, and say what
the host needs for it.

A backend whose ``source`` is ``"client"`` gets a socket bound to the real client's IP (from the
socket, or from a trusted PROXY header) with ``IP_TRANSPARENT`` / ``IPV6_TRANSPARENT``; the port
is the kernel's choice at ``connect()`` (``IP_BIND_ADDRESS_NO_PORT``, HAProxy's
``usesrc clientip``). A ``source`` that is an IP literal binds that fixed local address (HAProxy's
``source ADDR``). The backend's replies go to the client's address, so the host must deliver them
to this process instead of forwarding them; :func:`diagnose` checks exactly that with
``ip route get`` (the kernel's own answer, however the rules were written) and, when it is
missing, names the commands that add it. :class:`Routing` can add and remove them itself
(``transparent_routing = "manage"``).

One rule per backend, selected by the reply's source (the backend's address and port, TCP), so
the host's other traffic is untouched; one route table sends what it selects to the local stack::

    ip rule add pref 100 from BACKEND_IP ipproto tcp sport BACKEND_PORT iif DEV lookup 100
    ip route add local 0.0.0.0/0 dev lo table 100

``DEV`` is ``lo`` when the backend is on this host (the sidecar shape: the reply is locally
generated), else the interface the backend is reached through (the balancer shape).
"""

from __future__ import annotations

import contextlib
import enum
import errno
import ipaddress
import json
import logging
import shutil
import socket
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from l4lb.config.schema import Config, source_value

log = logging.getLogger("l4lb.transparent")

__all__ = [
    "CLIENT",
    "Problem",
    "ReturnRoute",
    "Routing",
    "Source",
    "SourceKind",
    "TransparentError",
    "diagnose",
    "log_problems",
    "open_socket",
    "parse_source",
    "prepare",
    "targets",
]

TABLE = "100"
"""The route table holding the ``local`` default route (go-mmproxy's recipe uses one the same)."""
RULE_PREF = "100"
"""The rules' priority: before ``main`` (32766), after ``local`` (0)."""
PROBE = {4: "192.0.2.1", 6: "2001:db8::1"}
"""A client address for ``ip route get`` (documentation addresses; nothing is sent)."""

IP_TRANSPARENT = getattr(socket, "IP_TRANSPARENT", 19)
IPV6_TRANSPARENT = getattr(socket, "IPV6_TRANSPARENT", 75)
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
_STREAM_NONBLOCK = socket.SOCK_STREAM | getattr(socket, "SOCK_NONBLOCK", 0)


class TransparentError(ValueError):
    """What transparent mode needs is missing; the message lists each problem and its fix."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems = tuple(problems)
        super().__init__("; ".join(str(p) for p in problems))


class SourceKind(enum.Enum):
    """Where a backend connection comes from."""

    BALANCER = "balancer"
    """The balancer's own address, chosen by the kernel (the default)."""
    CLIENT = "client"
    """The real client's IP (transparent: IP_TRANSPARENT), no PROXY header."""
    ADDRESS = "address"
    """A fixed local address of this host (HAProxy's ``source ADDR``)."""


@dataclass(frozen=True, slots=True)
class Source:
    """A backend's compiled ``source``."""

    kind: SourceKind
    address: str = ""
    """The fixed address (``ADDRESS`` only)."""


CLIENT = Source(SourceKind.CLIENT)


def parse_source(text: str) -> Source | None:
    """A config ``source`` value compiled; None for ``"balancer"`` (no bind: the fast path)."""
    value = source_value(text)
    if value == "balancer":
        return None
    if value == "client":
        return CLIENT
    return Source(SourceKind.ADDRESS, value)


def open_socket(family: int, source: Source, client_ip: str) -> socket.socket:
    """A non-blocking TCP socket for a backend of ``family``, bound as ``source`` says.

    Raises OSError (with a message that names the address) when the bind is refused:
    EPERM without CAP_NET_ADMIN, EADDRNOTAVAIL for a fixed address this host does not have,
    EAFNOSUPPORT for an IPv4 client towards an IPv6 backend or the reverse.
    """
    address = client_ip if source.kind is SourceKind.CLIENT else source.address
    if (":" in address) != (family == socket.AF_INET6):
        kind = "IPv6" if ":" in address else "IPv4"
        want = "IPv6" if family == socket.AF_INET6 else "IPv4"
        raise OSError(errno.EAFNOSUPPORT, f"source {address} is {kind}, the backend is {want}")
    sock = socket.socket(family, _STREAM_NONBLOCK)
    try:
        if source.kind is SourceKind.CLIENT:
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
            else:
                sock.setsockopt(socket.IPPROTO_IP, IP_TRANSPARENT, 1)
        # the port is chosen at connect(), unique per backend 4-tuple, not per address
        sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        sock.bind((address, 0))
    except OSError as err:
        sock.close()
        why = err.strerror or str(err)
        if err.errno == errno.EPERM:
            why += " (transparent mode needs CAP_NET_ADMIN)"
        raise OSError(err.errno, f"cannot bind source {address}: {why}") from err
    return sock


# -- what the host needs ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Problem:
    """One missing piece: what, and the commands that add it."""

    what: str
    commands: tuple[str, ...] = ()

    def __str__(self) -> str:
        if not self.commands:
            return self.what
        return f"{self.what}; add it with: " + " && ".join(self.commands)


@dataclass(frozen=True, slots=True)
class ReturnRoute:
    """The rule that brings one transparent backend's replies back to this host."""

    version: int
    backend_ip: str
    backend_port: int
    iif: str
    """``lo`` for a backend on this host (sidecar), else the device towards it (balancer)."""

    def rule(self, action: str) -> list[str]:
        return [
            "ip", f"-{self.version}", "rule", action, "pref", RULE_PREF,
            "from", self.backend_ip, "ipproto", "tcp", "sport", str(self.backend_port),
            "iif", self.iif, "lookup", TABLE,
        ]  # fmt: skip

    def table_route(self, action: str) -> list[str]:
        default = "0.0.0.0/0" if self.version == 4 else "::/0"
        return ["ip", f"-{self.version}", "route", action, "local", default, "dev", "lo",
                "table", TABLE]  # fmt: skip

    @property
    def shape(self) -> str:
        return "sidecar" if self.iif == "lo" else "balancer"


def _ip_json(args: Sequence[str]) -> list[dict[str, object]] | None:
    """``ip -j ARGS`` as JSON, or None when it fails (no route, bad device)."""
    try:
        done = subprocess.run(
            ["ip", "-j", *args], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if done.returncode != 0:
        return None
    try:
        data = json.loads(done.stdout or "[]")
    except ValueError:
        return None
    return data if isinstance(data, list) else None


def _run(args: Sequence[str]) -> str:
    """Run a command; its error text, or "" when it worked."""
    try:
        done = subprocess.run(list(args), capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError) as err:
        return str(err)
    return "" if done.returncode == 0 else (done.stderr.strip() or f"exit {done.returncode}")


def return_route(host: str, port: int) -> ReturnRoute | Problem:
    """What a transparent backend at ``host:port`` needs (the device found by ``ip route get``)."""
    version = ipaddress.ip_address(host).version
    found = _ip_json([f"-{version}", "route", "get", host])
    if not found:
        return Problem(f"no route to backend {host}: cannot tell how its replies come back")
    first = found[0]
    local = first.get("type") == "local"
    return ReturnRoute(version, host, port, "lo" if local else str(first.get("dev", "")))


def route_present(route: ReturnRoute) -> bool:
    """True when the kernel delivers this backend's replies to a client locally."""
    args = [f"-{route.version}", "route", "get", PROBE[route.version], "from", route.backend_ip,
            "ipproto", "tcp", "sport", str(route.backend_port)]  # fmt: skip
    if route.iif != "lo":
        args += ["iif", route.iif]
    found = _ip_json(args) or [{}]
    return found[0].get("type") == "local"


def _table_present(version: int) -> bool:
    found = _ip_json([f"-{version}", "route", "show", "table", TABLE]) or []
    return any(r.get("type") == "local" and r.get("dst") == "default" for r in found)


def capability_problem() -> Problem | None:
    """None when this process may bind non-local addresses (CAP_NET_ADMIN), else the fix."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        probe.setsockopt(socket.IPPROTO_IP, IP_TRANSPARENT, 1)
    except PermissionError:
        return Problem(
            "source = 'client' needs CAP_NET_ADMIN to bind the client's address "
            "(IP_TRANSPARENT): run l4lb as root or with that capability only "
            "(systemd: AmbientCapabilities=CAP_NET_ADMIN)"
        )
    finally:
        probe.close()
    return None


def address_problem(address: str) -> Problem | None:
    """None when ``address`` can be bound here (a fixed ``source``), else what to do."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    probe = socket.socket(family, socket.SOCK_STREAM)
    try:
        probe.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        probe.bind((address, 0))
    except OSError as err:
        prefix = 32 if family == socket.AF_INET else 128
        return Problem(
            f"source {address} cannot be bound on this host: {err.strerror}",
            (f"ip addr add {address}/{prefix} dev IFACE",),
        )
    finally:
        probe.close()
    return None


Target = tuple[str, int, Source]
"""A backend (host, port) and its source."""


def targets(config: Config) -> list[Target]:
    """Every backend of ``config`` whose ``source`` is not the balancer."""
    found: list[Target] = []
    for pool in config.pools.values():
        for bc in pool.backends:
            source = parse_source(pool.backend_source(bc))
            if source is not None:
                found.append((*bc.addr, source))
    return found


def diagnose(
    targets: Iterable[Target], check_routes: bool = True
) -> tuple[list[Problem], list[ReturnRoute]]:
    """What the host lacks for these backends, and the return routes they need.

    Without ``check_routes`` (``manage``: the caller installs them; ``off``), missing routing
    is not a problem.
    """
    problems: list[Problem] = []
    routes: list[ReturnRoute] = []
    transparent = False
    for host, port, source in targets:
        if source.kind is SourceKind.ADDRESS:
            found = address_problem(source.address)
            if found is not None:
                problems.append(found)
        elif source.kind is SourceKind.CLIENT:
            transparent = True
            need = return_route(host, port)
            if isinstance(need, Problem):
                problems.append(need)
            elif need not in routes:
                routes.append(need)
    if not transparent:
        return problems, routes
    if shutil.which("ip") is None:
        problems.append(Problem("source = 'client' needs the ip command (iproute2) for routing"))
        return problems, routes
    cap = capability_problem()
    if cap is not None:
        problems.append(cap)
    if not check_routes:
        return problems, routes
    tables_listed: set[int] = set()
    for route in routes:
        if route_present(route):
            continue
        commands = [" ".join(route.rule("add"))]
        if route.version not in tables_listed and not _table_present(route.version):
            commands.append(" ".join(route.table_route("add")))
            tables_listed.add(route.version)
        problems.append(
            Problem(
                f"replies of transparent backend {_hostport(route.backend_ip, route.backend_port)} "
                f"to a client address would not come back to l4lb ({route.shape} shape: "
                "docs/transparent.md)",
                tuple(commands),
            )
        )
    return problems, routes


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Routing:
    """The rules l4lb installs itself (``transparent_routing = "manage"``), and only those.

    :meth:`apply` adds what a config needs and is missing, and removes what it added for a
    previous config that the new one no longer needs; :meth:`remove` takes out everything it
    added (at stop). Rules that were there before are never touched.
    """

    def __init__(self) -> None:
        self.rules: list[ReturnRoute] = []
        self.tables: set[int] = set()

    def apply(self, routes: Sequence[ReturnRoute]) -> None:
        """Install the missing routing for ``routes``; TransparentError if the kernel refuses."""
        problems: list[Problem] = []
        for route in routes:
            if route.version not in self.tables and not _table_present(route.version):
                err = _run(route.table_route("add"))
                if err:
                    problems.append(Problem(f"cannot add the local route table: {err}"))
                    continue
                self.tables.add(route.version)
                log.info("event=routing_added command=%r", " ".join(route.table_route("add")))
            if route in self.rules or route_present(route):
                continue
            err = _run(route.rule("add"))
            if err:
                problems.append(Problem(f"cannot add {' '.join(route.rule('add'))!r}: {err}"))
                continue
            self.rules.append(route)
            log.info("event=routing_added command=%r", " ".join(route.rule("add")))
        for route in [r for r in self.rules if r not in routes]:
            self._delete_rule(route)
        if problems:
            raise TransparentError(problems)

    def _delete_rule(self, route: ReturnRoute) -> None:
        err = _run(route.rule("del"))
        if err:
            log.warning("event=routing_remove_failed command=%r error=%r",
                        " ".join(route.rule("del")), err)  # fmt: skip
        else:
            log.info("event=routing_removed command=%r", " ".join(route.rule("del")))
        with contextlib.suppress(ValueError):
            self.rules.remove(route)

    def remove(self) -> None:
        """Remove every rule and table route this object added."""
        for route in list(self.rules):
            self._delete_rule(route)
        for version in sorted(self.tables):
            args = ReturnRoute(version, "", 0, "lo").table_route("del")
            err = _run(args)
            if err:
                log.warning("event=routing_remove_failed command=%r error=%r", " ".join(args), err)
            else:
                log.info("event=routing_removed command=%r", " ".join(args))
        self.tables.clear()


def prepare(config: Config, routing: Routing | None) -> Routing | None:
    """At start and on reload: check what ``config``'s transparent backends need (raising
    :class:`TransparentError` with the fixes), and with ``transparent_routing = "manage"``
    install the routing (into ``routing``, or a new :class:`Routing`, which is returned)."""
    found = targets(config)
    if not found:
        return routing
    mode = config.transparent_routing
    problems, routes = diagnose(found, check_routes=mode == "check")
    if problems:
        raise TransparentError(problems)
    if mode == "manage":
        routing = routing if routing is not None else Routing()
        routing.apply(routes)
    return routing


def log_problems(err: TransparentError, event: str) -> None:
    """One log line per problem, then one per command to run (copy-paste ready)."""
    for problem in err.problems:
        log.error("event=%s error=%r", event, problem.what)
        for command in problem.commands:
            log.error("event=%s fix=%r", event, command)
