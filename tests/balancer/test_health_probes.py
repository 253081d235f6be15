"""Each health probe against tiny real asyncio servers, and the rise/fall state machine."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import pytest

from l4lb.balancer.health import (
    CheckResult,
    CheckSettings,
    HealthChecks,
    PoolPlan,
    Target,
    run_probe,
)
from l4lb.balancer.pool import Backend
from l4lb.config.schema import BackendConfig
from tests.support.peers import free_port

V2_LOCAL = b"\r\n\r\n\x00\r\nQUIT\n\x20\x00\x00\x00"  # HAProxy doc/proxy-protocol.txt, 2.2
V1_UNKNOWN = b"PROXY UNKNOWN\r\n"

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class Server:
    """A one-purpose TCP server on a free loopback port; records what each client sent."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.received: list[bytes] = []
        self.server: asyncio.Server | None = None
        self.port = 0

    async def __aenter__(self) -> Server:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                await self.handler(reader, writer)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                writer.close()

        self.server = await asyncio.start_server(serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    def target(self, proxy_version: int = 0) -> Target:
        return Target("p", f"127.0.0.1:{self.port}", "127.0.0.1", self.port, proxy_version)


async def read_all(reader: asyncio.StreamReader) -> bytes:
    return await reader.read(65536)


def http_server(status_line: bytes, header: bytes, seen: list[bytes]) -> Handler:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        first = await reader.readexactly(len(header))  # V2_LOCAL itself starts with CRLFCRLF
        data = first + await reader.readuntil(b"\r\n\r\n")
        seen.append(data)
        if first != header:
            return  # a PROXY-requiring server closes on a missing header
        writer.write(status_line + b"\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()

    return handle


def run(coro: Awaitable[CheckResult]) -> CheckResult:
    async def main() -> CheckResult:
        return await coro

    return asyncio.run(main())


def test_tcp_up_and_refused() -> None:
    async def main() -> tuple[CheckResult, CheckResult]:
        async with Server(read_all) as srv:
            up = await run_probe(srv.target(), CheckSettings("tcp"))
        port = free_port()
        down = await run_probe(Target("p", f"127.0.0.1:{port}", "127.0.0.1", port), CheckSettings())
        return up, down

    up, down = asyncio.run(main())
    assert up.ok and up.detail == "connected" and up.duration >= 0
    assert not down.ok and "refused" in down.detail.lower()


def test_proxy_local_sends_v2_local_header() -> None:
    seen: list[bytes] = []
    arrived = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(await reader.read(65536))
        arrived.set()

    async def main() -> CheckResult:
        async with Server(handle) as srv:
            result = await run_probe(srv.target(2), CheckSettings("proxy-local"))
            await asyncio.wait_for(arrived.wait(), 10)
            return result

    result = asyncio.run(main())
    assert result.ok
    assert seen == [V2_LOCAL]


@pytest.mark.parametrize(
    ("proxy_version", "header", "status_line", "ok", "detail"),
    [
        (2, V2_LOCAL, b"HTTP/1.1 200 OK", True, "HTTP 200"),
        (1, V1_UNKNOWN, b"HTTP/1.0 302 Found", True, "HTTP 302"),
        (0, b"GET", b"HTTP/1.1 204 No Content", True, "HTTP 204"),
        (2, V2_LOCAL, b"HTTP/1.1 503 Service Unavailable", False, "GET /healthz: HTTP 503"),
        (2, V2_LOCAL, b"HTTP/1.1 404 Not Found", False, "GET /healthz: HTTP 404"),
        (2, V2_LOCAL, b"SSH-2.0-OpenSSH", False, "not an HTTP response"),
    ],
)
def test_http(proxy_version: int, header: bytes, status_line: bytes, ok: bool, detail: str) -> None:
    seen: list[bytes] = []

    async def main() -> CheckResult:
        async with Server(http_server(status_line, header, seen)) as srv:
            settings = CheckSettings("http", http_path="/healthz")
            return await run_probe(srv.target(proxy_version), settings)

    result = asyncio.run(main())
    assert result.ok is ok and detail in result.detail
    assert seen[0].startswith(header)
    assert b"GET /healthz HTTP/1.0\r\n" in seen[0]


def test_http_server_requiring_v2_rejects_missing_header() -> None:
    seen: list[bytes] = []

    async def main() -> CheckResult:
        async with Server(http_server(b"HTTP/1.1 200 OK", V2_LOCAL, seen)) as srv:
            return await run_probe(srv.target(0), CheckSettings("http", http_path="/"))

    result = asyncio.run(main())
    assert not result.ok and "nothing" in result.detail


def pong(reply: bytes) -> Handler:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.readuntil(b"PING\r\n")
        if data.startswith(V2_LOCAL):
            writer.write(reply)
            await writer.drain()  # then closed: a reply without the expected text ends there

    return handle


@pytest.mark.parametrize(
    ("reply", "ok", "detail"),
    [
        (b"+PONG\r\n", True, "got 'PONG'"),
        (b"PO", False, "expected 'PONG', got 'PO'"),
        (b"-ERR\r\n", False, "expected 'PONG', got '-ERR\\r\\n'"),
    ],
)
def test_send_expect(reply: bytes, ok: bool, detail: str) -> None:
    async def main() -> CheckResult:
        async with Server(pong(reply)) as srv:
            settings = CheckSettings("send-expect", send="PING\r\n", expect="PONG", timeout=5)
            return await run_probe(srv.target(2), settings)

    result = asyncio.run(main())
    assert result.ok is ok and result.detail == detail


@pytest.mark.parametrize("check", ["http", "send-expect"])
def test_silent_backend_times_out(check: str) -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # says nothing; open until the probe gives up and closes

    async def main() -> CheckResult:
        async with Server(silent) as srv:
            settings = CheckSettings(check, timeout=0.3, send="x", expect="y")
            return await run_probe(srv.target(), settings)

    result = asyncio.run(main())
    assert not result.ok and result.detail == "timeout after 0.3s"
    assert 0.25 < result.duration < 5


class Recorder:
    def __init__(self) -> None:
        self.changes: list[tuple[str, bool, str]] = []

    def __call__(self, target: Target, up: bool, result: CheckResult) -> None:
        self.changes.append((target.address, up, result.source))


async def until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


def test_rise_and_fall(caplog: pytest.LogCaptureFixture) -> None:
    """A backend goes down after `fall` failures and back up after `rise` successes."""
    caplog.set_level(logging.INFO, "l4lb.health")
    recorder = Recorder()

    async def main() -> None:
        port = free_port()
        settings = CheckSettings("tcp", interval=0.05, timeout=0.5, rise=3, fall=2)
        target = Target("web", f"127.0.0.1:{port}", "127.0.0.1", port)
        checks = HealthChecks(recorder)
        checks.start([PoolPlan("web", settings, [target])])
        try:
            await until(lambda: recorder.changes == [(target.address, False, "active")])
            record = checks.health("web", target.address)
            assert record is not None and not record.up and record.failures >= 2
            server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", port)
            try:
                await until(lambda: len(recorder.changes) == 2)
                assert recorder.changes[1] == (target.address, True, "active")
                assert record.up and record.successes >= 3 and record.checks >= 5
                assert sum(record.check_buckets) == record.checks
            finally:
                server.close()
        finally:
            await checks.aclose()

    asyncio.run(main())
    messages = [r.getMessage() for r in caplog.records]
    assert any(
        m.startswith("event=health_down pool=web") and "failed=2" in m and "refused" in m
        for m in messages
    )
    assert any(m.startswith("event=health_up pool=web") and "passed=3" in m for m in messages)


def test_passive_failures_mark_down_before_next_check() -> None:
    recorder = Recorder()
    backend = Backend(BackendConfig(address="127.0.0.1:9"), 0)

    async def main() -> None:
        async with Server(read_all) as srv:
            settings = CheckSettings("tcp", interval=3600, timeout=1, rise=1, fall=3)
            target = srv.target()
            target.backend = backend
            checks = HealthChecks(recorder)
            checks.start([PoolPlan("p", settings, [target])])
            try:
                await until(
                    lambda: (
                        (r := checks.health("p", target.address)) is not None and r.last is not None
                    )
                )
                checks.connect_result(backend, False, "connection refused")
                checks.connect_result(backend, False, "connection refused")
                checks.connect_result(backend, True)  # a success resets the count
                checks.connect_result(backend, False, "connection refused")
                checks.connect_result(backend, False, "connection refused")
                assert recorder.changes == []
                checks.connect_result(backend, False, "connection refused")
                assert recorder.changes == [(target.address, False, "passive")]
                other = Backend(BackendConfig(address="127.0.0.1:10"), 0)
                checks.connect_result(other, False)  # unknown backends are ignored
            finally:
                await checks.aclose()

    asyncio.run(main())


def test_ipv6_backend_http_check() -> None:
    seen: list[bytes] = []

    async def main() -> CheckResult:
        server = await asyncio.start_server(
            lambda r, w: http_server(b"HTTP/1.1 200 OK", V2_LOCAL, seen)(r, w), "::1", 0
        )
        port = server.sockets[0].getsockname()[1]
        try:
            target = Target("p", f"[::1]:{port}", "::1", port, 2)
            return await run_probe(target, CheckSettings("http", http_path="/v6"))
        finally:
            server.close()

    result = asyncio.run(main())
    assert result.ok and result.detail == "HTTP 200"
    assert b"Host: [::1]:" in seen[0]
