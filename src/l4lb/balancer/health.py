"""Active and passive health checks: which backends may take new connections.

One asyncio task per pool probes every backend of the pool each ``interval`` (concurrently,
each probe bounded by ``timeout``). ``rise`` consecutive successes bring a backend up, ``fall``
consecutive failures take it down; connect failures reported by the relay count the same way,
so a dead backend is taken out before the next active check (passive checking).

Probes live in one registry by name (``check = "tcp"`` looks up :data:`PROBES`):

- ``tcp``: a TCP connection is accepted.
- ``proxy-local``: a TCP connection, then the backend's PROXY header as ``LOCAL`` (v1
  ``UNKNOWN``; nothing when it receives none), as HAProxy's ``check-send-proxy`` does, so backends
  that require the PROXY protocol accept the check.
- ``http``: the backend's PROXY header as ``LOCAL`` (v1 ``UNKNOWN``; nothing when the pool
  sends none), then ``http_method http_path`` (``Host: http_host``), over TLS with ``https``;
  up when the status is in ``expect_status`` (default 200-399). A plain check that meets a
  TLS port (a TLS alert, or a 400 where a TLS handshake succeeds) says so.
- ``tls``: the PROXY header as for ``http``, then a TLS handshake (``sni``; the certificate
  verified with ``tls_verify``).
- ``send-expect``: the PROXY header as for ``http``, then ``send``; up when ``expect``
  appears in what the backend answers.

Nothing here runs per client connection: the relay only calls :meth:`HealthChecks.connect_result`
when a connect to a backend fails or succeeds.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import errno
import logging
import os
import ssl
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from l4lb.balancer.logs import Every
from l4lb.balancer.tasks import BackgroundTasks
from l4lb.config.schema import HealthConfig
from l4lb.proxy_protocol import local_header

if TYPE_CHECKING:
    from l4lb.balancer.pool import Backend, Pool
    from l4lb.balancer.runtime import Balancer

log = logging.getLogger("l4lb.health")

CHECK_BUCKETS: tuple[float, ...] = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
"""Upper bounds (seconds) of the check-duration histogram; the last bucket is +Inf."""

_MAX_READ = 65536


LOCAL_ERRNOS = frozenset(
    {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM, errno.EADDRNOTAVAIL}
)
"""Errors of this host, not of a backend: out of descriptors, buffers, memory, local ports."""


def local_resource_error(code: int | None) -> bool:
    """True when a failed connect says nothing about the backend (see :data:`LOCAL_ERRNOS`).

    Neither an active check nor a passive report may count such a failure against a backend:
    at EMFILE every backend would go down together and the pool would empty itself.
    """
    return code in LOCAL_ERRNOS


def _why(err: OSError) -> str:
    """``Connection refused`` rather than asyncio's ``Connect call failed ('127.0.0.1', 9)``."""
    if err.errno:
        return os.strerror(err.errno)
    return err.strerror or str(err) or type(err).__name__


class CheckFailed(Exception):
    """A probe found the backend unhealthy; the message says why, for the log and /status."""


class LocalError(CheckFailed):
    """The probe could not run for a reason of this host (see :func:`local_resource_error`)."""


@dataclass(frozen=True, slots=True)
class CheckSettings:
    """How one pool is checked (the pool's ``[pools.NAME.health]`` table)."""

    check: str = "tcp"
    interval: float = 2.0
    timeout: float = 1.0
    rise: int = 2
    fall: int = 3
    http_path: str = "/"
    send: str = ""
    expect: str = ""
    http_method: str = "GET"
    http_host: str | None = None
    expect_status: tuple[tuple[int, int], ...] = ((200, 399),)
    https: bool = False
    sni: str | None = None
    tls: ssl.SSLContext | None = None
    """The client context of ``tls`` and ``https`` checks (built once per pool)."""

    @classmethod
    def from_config(cls, cfg: HealthConfig) -> CheckSettings:
        """From the validated ``[pools.NAME.health]`` table."""
        return cls(
            check=cfg.check,
            interval=cfg.interval_s,
            timeout=cfg.timeout_s,
            rise=cfg.rise,
            fall=cfg.fall,
            http_path=cfg.http_path,
            send=cfg.send or "",
            expect=cfg.expect or "",
            http_method=cfg.http_method,
            http_host=cfg.http_host,
            expect_status=cfg.expect_statuses,
            https=cfg.https,
            sni=cfg.sni or cfg.http_host,
            tls=tls_context(cfg.tls_verify, cfg.tls_ca_file)
            if cfg.check == "tls" or cfg.https
            else None,
        )


def tls_context(verify: bool, ca_file: str | None = None) -> ssl.SSLContext:
    """The checks' TLS client context: no verification (a check asks "does it answer TLS?"),
    or the chain and the name verified against ``ca_file`` (default: the system's CAs)."""
    if verify:
        return ssl.create_default_context(cafile=ca_file)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


@dataclass(frozen=True, slots=True)
class CheckResult:
    """The outcome of one probe (or of a passive observation); /status shows the last one."""

    ok: bool
    detail: str
    duration: float
    """Seconds the probe took."""
    at: float
    """Wall-clock time (``time.time()``) when it finished."""
    source: str = "active"
    """``active`` for a probe, ``passive`` for a connect failure seen by the relay, ``local``
    for a probe that could not run for a reason of this host (never counted)."""


@dataclass(slots=True)
class Target:
    """One backend as the checker sees it, built by the integration from the runtime model."""

    pool: str
    address: str
    """As written in the config and shown in /status (``127.0.0.1:9001``, ``[::1]:9001``)."""
    host: str
    port: int
    proxy_version: int = 0
    """PROXY version the backend receives (0 = none); ``http``/``send-expect`` send it as LOCAL."""
    backend: Backend | None = None
    """The runtime backend, handed back to ``set_up``; None for a probe on its own."""


@dataclass(slots=True)
class Health:
    """The checker's running record for one backend (kept across reloads by pool and address)."""

    up: bool = True
    successes: int = 0
    failures: int = 0
    last: CheckResult | None = None
    checks: int = 0
    check_buckets: list[int] = field(default_factory=lambda: [0] * (len(CHECK_BUCKETS) + 1))
    check_seconds: float = 0.0

    def observe(self, duration: float) -> None:
        self.checks += 1
        self.check_seconds += duration
        self.check_buckets[bisect.bisect_left(CHECK_BUCKETS, duration)] += 1


Probe = Callable[[Target, CheckSettings], Awaitable[str]]
"""Connects to the target and returns a short detail on success, or raises CheckFailed."""


async def _open(target: Target) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    try:
        return await asyncio.open_connection(target.host, target.port)
    except OSError as err:
        if local_resource_error(err.errno):
            raise LocalError(f"connect to {target.address}: {_why(err)}") from err
        raise CheckFailed(f"connect to {target.address} failed: {_why(err)}") from err


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()


async def _read_until(reader: asyncio.StreamReader, done: Callable[[bytes], bool]) -> bytes:
    """Read until ``done(data)`` or EOF, at most 64 KiB."""
    data = b""
    while not done(data) and len(data) < _MAX_READ:
        try:
            chunk = await reader.read(_MAX_READ - len(data))
        except OSError as err:
            if data:  # e.g. reset after answering: judge what did arrive
                break
            raise CheckFailed(f"read failed: {_why(err)}") from err
        if not chunk:
            break
        data += chunk
    return data


def _drop(writer: asyncio.StreamWriter) -> None:
    """Abort a check's connection that went (or tried to go) TLS: a failed ``start_tls`` leaves
    a stream whose ``wait_closed`` never returns, and a check needs no close_notify."""
    writer.transport.abort()


def _local(target: Target) -> bytes:
    return local_header(version=target.proxy_version) if target.proxy_version else b""


async def probe_tcp(target: Target, settings: CheckSettings) -> str:
    _, writer = await _open(target)
    await _close(writer)
    return "connected"


async def probe_proxy_local(target: Target, settings: CheckSettings) -> str:
    """Connect and send the header this backend receives, as LOCAL (v2) or UNKNOWN (v1).

    Like HAProxy's ``check-send-proxy``, the version follows the backend's ``send_proxy``: a v1-only
    backend would refuse a v2 header, and one that gets no header would take it as data.
    """
    _, writer = await _open(target)
    if not target.proxy_version:
        await _close(writer)
        return "connected (the backend receives no PROXY header: none sent)"
    try:
        writer.write(_local(target))
        await writer.drain()
    except OSError as err:
        raise CheckFailed(f"sending the PROXY LOCAL header failed: {_why(err)}") from err
    finally:
        await _close(writer)
    return f"connected, PROXY v{target.proxy_version} LOCAL sent"


_TLS_RECORD = (0x15, 0x16)  # alert, handshake: what a TLS server answers plain text with
_LOOKS_TLS = "the port speaks TLS; set https = true (or use check = 'tls')"


def _server_name(target: Target, settings: CheckSettings) -> str | None:
    """The SNI (and, verifying, the name checked): ``sni``, else the backend's host."""
    ctx = settings.tls
    if settings.sni is not None:
        return settings.sni
    return target.host if ctx is not None and ctx.check_hostname else None


async def _handshake(writer: asyncio.StreamWriter, target: Target, settings: CheckSettings) -> str:
    """Upgrade the check's connection to TLS; the negotiated version, or CheckFailed."""
    assert settings.tls is not None
    try:
        await writer.start_tls(
            settings.tls,
            server_hostname=_server_name(target, settings),
            ssl_handshake_timeout=settings.timeout,
        )
    except ssl.SSLCertVerificationError as err:
        raise CheckFailed(f"TLS certificate not accepted: {err.verify_message}") from err
    except ssl.SSLError as err:
        raise CheckFailed(f"TLS handshake failed: {err.reason or err}") from err
    except (OSError, EOFError) as err:
        why = _why(err) if isinstance(err, OSError) else "closed"
        raise CheckFailed(f"TLS handshake failed: {why}") from err
    tls = writer.get_extra_info("ssl_object")
    return str(tls.version()) if tls is not None else "TLS"


async def _speaks_tls(target: Target, settings: CheckSettings) -> bool:
    """True when a TLS handshake on the target succeeds (to explain a failed plain check)."""
    probe = CheckSettings(
        sni=settings.sni or settings.http_host,
        tls=tls_context(False),
        timeout=max(0.1, settings.timeout / 2),
    )
    try:
        _, writer = await _open(target)
    except CheckFailed:
        return False
    try:
        if target.proxy_version:
            writer.write(_local(target))
        await _handshake(writer, target, probe)
    except (CheckFailed, OSError):
        return False
    finally:
        _drop(writer)
    return True


async def probe_tls(target: Target, settings: CheckSettings) -> str:
    """The PROXY LOCAL header when the backend receives one, then a TLS handshake."""
    _, writer = await _open(target)
    try:
        if target.proxy_version:
            writer.write(_local(target))
        version = await _handshake(writer, target, settings)
    finally:
        _drop(writer)
    return f"TLS handshake ok ({version})"


async def probe_http(target: Target, settings: CheckSettings) -> str:
    reader, writer = await _open(target)
    what = f"{settings.http_method} {settings.http_path}"
    try:
        if settings.https:
            if target.proxy_version:
                writer.write(_local(target))
            await _handshake(writer, target, settings)
            prefix = b""
        else:
            prefix = _local(target)
        if settings.http_host is not None:
            host = settings.http_host
        else:
            host = f"[{target.host}]" if ":" in target.host else target.host
            host = f"{host}:{target.port}"
        request = (
            f"{what} HTTP/1.0\r\nHost: {host}\r\n"
            "User-Agent: l4lb-health-check\r\nConnection: close\r\n\r\n"
        )
        writer.write(prefix + request.encode("ascii", "replace"))
        data = await _read_until(reader, lambda d: b"\n" in d)
    finally:
        if settings.https:
            _drop(writer)
        else:
            await _close(writer)
    if not settings.https and data and data[0] in _TLS_RECORD and data[1:2] == b"\x03":
        raise CheckFailed(f"{what}: answered with a TLS record (alert): {_LOOKS_TLS}")
    line = data.split(b"\n", 1)[0].strip().decode("latin-1")
    parts = line.split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        shown = line[:60] if line else "nothing"
        hint = ""
        if not settings.https and await _speaks_tls(target, settings):
            hint = f"; {_LOOKS_TLS}"
        raise CheckFailed(f"{what}: not an HTTP response (got {shown!r}){hint}")
    status = int(parts[1])
    if not any(low <= status <= high for low, high in settings.expect_status):
        hint = ""
        if status == 400 and not settings.https and await _speaks_tls(target, settings):
            hint = f"; {_LOOKS_TLS}"
        over = " over TLS" if settings.https else ""
        raise CheckFailed(f"{what}: HTTP {status}{over}{hint}")
    return f"HTTP {status}" if not settings.https else f"HTTP {status} over TLS"


async def probe_send_expect(target: Target, settings: CheckSettings) -> str:
    reader, writer = await _open(target)
    expect = settings.expect.encode()
    try:
        writer.write(_local(target) + settings.send.encode())
        data = await _read_until(reader, lambda d: expect in d)
    finally:
        await _close(writer)
    if expect not in data:
        got = data[:60].decode("latin-1") if data else "nothing"
        raise CheckFailed(f"expected {settings.expect!r}, got {got!r}")
    return f"got {settings.expect!r}"


PROBES: dict[str, Probe] = {
    "tcp": probe_tcp,
    "proxy-local": probe_proxy_local,
    "http": probe_http,
    "send-expect": probe_send_expect,
    "tls": probe_tls,
}
"""Health checks by the name used in ``[pools.NAME.health] check``."""


async def run_probe(target: Target, settings: CheckSettings) -> CheckResult:
    """Run the pool's probe once against ``target``, within ``settings.timeout``."""
    probe = PROBES[settings.check]
    start = time.monotonic()
    try:
        async with asyncio.timeout(settings.timeout):
            detail = await probe(target, settings)
        ok = True
    except TimeoutError:
        ok, detail = False, f"timeout after {settings.timeout:g}s"
    except LocalError as err:
        return CheckResult(False, str(err), time.monotonic() - start, time.time(), "local")
    except CheckFailed as err:
        ok, detail = False, str(err)
    except OSError as err:  # anything the socket layer raises that a probe did not wrap
        if local_resource_error(err.errno):
            detail = f"{type(err).__name__}: {_why(err)}"
            return CheckResult(False, detail, time.monotonic() - start, time.time(), "local")
        ok, detail = False, f"{type(err).__name__}: {_why(err)}"
    return CheckResult(ok, detail, time.monotonic() - start, time.time())


SetUp = Callable[[Target, bool, CheckResult], None]
"""Called when a backend crosses rise/fall: mark it up (True) or down (False) in the runtime."""


@dataclass(slots=True)
class PoolPlan:
    """What to check for one pool: its settings and backends."""

    name: str
    settings: CheckSettings
    targets: list[Target]


def plan_for(pool: Pool) -> PoolPlan | None:
    """The checks of a runtime pool, or None when it has no ``[pools.NAME.health]`` table."""
    cfg = pool.config.health
    if cfg is None:
        return None
    targets = [
        Target(pool.name, b.address, b.host, b.port, b.proxy_version, b) for b in pool.backends
    ]
    return PoolPlan(pool.name, CheckSettings.from_config(cfg), targets)


class HealthChecks(BackgroundTasks):
    """All health checking of a balancer: one task per checked pool, plus passive reports.

    With the runtime's pools, :meth:`attach` does everything: it starts one checker per checked
    pool, marks backends up and down through ``Pool.set_health`` and subscribes to the pool's
    connect results (passive checks). Call it again after a reload (pools are replaced, backend
    records carry over by address); :meth:`aclose` at shutdown. ``set_up`` replaces
    ``Pool.set_health`` (for tests without a runtime).
    """

    def __init__(self, set_up: SetUp | None = None) -> None:
        self._pools: dict[str, Pool] = {}
        self._set_up = set_up or self._set_pool_health
        self._plans: dict[str, PoolPlan] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._health: dict[tuple[str, str], Health] = {}
        self._by_backend: dict[int, tuple[PoolPlan, Target]] = {}
        self._local_errors = Every(10.0)

    # -- lifecycle -------------------------------------------------------------------------

    def attach(self, pools: Iterable[Pool]) -> None:
        """Check these runtime pools (replacing whatever was checked before)."""
        self._pools = {}
        plans = []
        for pool in pools:
            plan = plan_for(pool)
            if plan is None:
                # no checks (any more, after a reload): nothing may keep a backend down
                for backend in pool.backends:
                    if not backend.health_up:
                        pool.set_health(backend, True, "health checks removed")
                continue
            self._pools[pool.name] = pool
            pool.on_connect_result = self.connect_result
            plans.append(plan)
        self.start(plans)

    def _set_pool_health(self, target: Target, up: bool, result: CheckResult) -> None:
        pool = self._pools.get(target.pool)
        if pool is not None and target.backend is not None:
            pool.set_health(target.backend, up, result.detail)

    def start(self, plans: Iterable[PoolPlan]) -> None:
        """Start (or, after a reload, restart) checking these pools; records survive by address."""
        self.stop()
        self._plans = {plan.name: plan for plan in plans}
        keep = {(p.name, t.address) for p in self._plans.values() for t in p.targets}
        self._health = {k: v for k, v in self._health.items() if k in keep}
        self._by_backend = {}
        for plan in self._plans.values():
            for target in plan.targets:
                # a backend added at run time (DNS, API) starts down: up after ``rise`` checks
                up = target.backend.health_up if target.backend is not None else True
                self._health.setdefault((plan.name, target.address), Health(up=up))
                if target.backend is not None:
                    self._by_backend[id(target.backend)] = (plan, target)
            self._tasks[plan.name] = asyncio.get_running_loop().create_task(
                self._run(plan), name=f"l4lb-health-{plan.name}"
            )

    # -- what others read ------------------------------------------------------------------

    def health(self, pool: str, address: str) -> Health | None:
        """The running record of one backend, for /status and /metrics."""
        return self._health.get((pool, address))

    def settings(self, pool: str) -> CheckSettings | None:
        plan = self._plans.get(pool)
        return plan.settings if plan else None

    # -- passive checks --------------------------------------------------------------------

    def connect_result(self, backend: Backend, ok: bool, detail: str = "") -> None:
        """The relay's report of one connect to ``backend``: failures count toward ``fall``."""
        found = self._by_backend.get(id(backend))
        if found is None:
            return
        plan, target = found
        record = self._health[(plan.name, target.address)]
        if ok:
            record.failures = 0
            return
        now = time.time()
        self._apply(
            plan, target, CheckResult(False, detail or "connect failed", 0.0, now, "passive")
        )

    # -- internals -------------------------------------------------------------------------

    async def _run(self, plan: PoolPlan) -> None:
        interval = plan.settings.interval
        while True:
            started = time.monotonic()
            try:
                probes = (run_probe(t, plan.settings) for t in plan.targets)
                results = await asyncio.gather(*probes)
                for target, result in zip(plan.targets, results, strict=True):
                    self._health[(plan.name, target.address)].observe(result.duration)
                    self._apply(plan, target, result)
            except Exception:  # a bug must not end this pool's checks for good
                log.exception("event=health_round_failed pool=%s", plan.name)
            await asyncio.sleep(max(0.0, interval - (time.monotonic() - started)))

    def _apply(self, plan: PoolPlan, target: Target, result: CheckResult) -> None:
        if result.source == "local":  # this host's trouble, not the backend's
            held = self._local_errors.due()
            if held is not None:
                log.warning(
                    "event=health_check_local_error pool=%s backend=%s error=%r more=%d detail=%r",
                    plan.name,
                    target.address,
                    result.detail,
                    held,
                    "a resource of this host ran out; not counted against the backend",
                )
            return
        record = self._health[(plan.name, target.address)]
        record.last = result
        if target.backend is not None:
            target.backend.last_check = ("ok: " if result.ok else "failed: ") + result.detail
        settings = plan.settings
        if result.ok:
            record.successes += 1
            record.failures = 0
            if not record.up and record.successes >= settings.rise:
                self._change(record, plan, target, True, result)
        else:
            record.failures += 1
            record.successes = 0
            if record.up and record.failures >= settings.fall:
                self._change(record, plan, target, False, result)

    def _change(
        self, record: Health, plan: PoolPlan, target: Target, up: bool, result: CheckResult
    ) -> None:
        record.up = up
        settings = plan.settings
        # One line per verdict, in the key=value form of the runtime's other events.
        log.warning(
            "event=health_%s pool=%s backend=%s check=%s %s=%d detail=%r",
            "up" if up else "down",
            plan.name,
            target.address,
            "passive" if result.source == "passive" else settings.check,
            "passed" if up else "failed",
            record.successes if up else record.failures,
            result.detail,
        )
        try:
            self._set_up(target, up, result)
        except Exception:  # the runtime's callback must not kill the checker task
            log.exception("event=health_mark_failed pool=%s backend=%s", plan.name, target.address)


def checks_of(balancer: Balancer) -> HealthChecks | None:
    """The health checks attached to ``balancer`` (for /status and /metrics), if any."""
    return balancer.health_checks


def attach(balancer: Balancer) -> HealthChecks:
    """Check the balancer's pools, follow its reloads, stop with it (the runtime calls this)."""
    checks = HealthChecks()
    checks.attach(balancer.pools.values())
    balancer.on_reload.append(lambda b: checks.attach(b.pools.values()))
    balancer.on_stop.append(lambda b: checks.stop())
    balancer.health_checks = checks
    return checks
