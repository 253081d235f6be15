"""The header-reading protocol's logic against a fake transport (real sockets are in the others)."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from l4lb.backend.asyncio import ProxiedTransport, ProxyProtocolFactory
from l4lb.proxy_protocol import build
from l4lb.trust.policy import ProxyPolicy

PEER = ("127.0.0.1", 5000)


def in_loop(test: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """Run an async test in a fresh event loop (the protocol arms its timer on the running loop)."""

    @functools.wraps(test)
    def run(*args: Any, **kwargs: Any) -> None:
        asyncio.run(test(*args, **kwargs))

    return run


SOCK = ("127.0.0.1", 80)


class FakeTransport(asyncio.Transport):
    def __init__(self, peer: tuple[str, int] = PEER) -> None:
        super().__init__()
        self.peer = peer
        self.protocol: asyncio.BaseProtocol | None = None
        self.aborted = False
        self.closed = False
        self.written = b""

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": self.peer, "sockname": SOCK, "socket": "raw"}.get(name, default)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        assert self.protocol is not None
        return self.protocol

    def abort(self) -> None:
        self.aborted = True

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.aborted or self.closed

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += bytes(data)


class App(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: Any = None
        self.data = b""
        self.eof = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.data += data

    def eof_received(self) -> bool:
        self.eof = True
        return True


def _open(
    policy: ProxyPolicy, peer: tuple[str, int] = PEER
) -> tuple[Any, FakeTransport, list[App]]:
    apps: list[App] = []

    def make() -> App:
        apps.append(App())
        return apps[-1]

    factory = ProxyProtocolFactory(make, policy)
    protocol = factory()
    transport = FakeTransport(peer)
    transport.set_protocol(protocol)
    protocol.connection_made(transport)
    return factory, transport, apps


@in_loop
async def test_switches_with_leftover_bytes_and_real_addresses() -> None:
    _factory, transport, apps = _open(ProxyPolicy(trusted=["127.0.0.1"]))
    header_protocol = transport.get_protocol()
    header_protocol.data_received(build(1, ("192.0.2.1", 7), ("192.0.2.2", 8))[:10])  # type: ignore[attr-defined]
    assert not apps
    header_protocol.data_received(build(1, ("192.0.2.1", 7), ("192.0.2.2", 8))[10:] + b"app")  # type: ignore[attr-defined]
    (app,) = apps
    assert transport.get_protocol() is app
    assert isinstance(app.transport, ProxiedTransport)
    assert app.transport.get_extra_info("peername") == ("192.0.2.1", 7)
    assert app.transport.get_extra_info("sockname") == ("192.0.2.2", 8)
    assert app.transport.get_extra_info("proxy_peer") == PEER
    assert app.transport.get_extra_info("socket") is None
    assert app.transport.get_extra_info("proxy_socket") == "raw"
    assert app.data == b"app"
    app.transport.write(b"out")
    assert transport.written == b"out"


@in_loop
async def test_optional_peer_that_half_closes_at_once_is_a_direct_client() -> None:
    _factory, transport, apps = _open(ProxyPolicy(mode="optional", trusted=[]))
    keep_open = transport.get_protocol().eof_received()  # type: ignore[attr-defined]
    (app,) = apps
    assert app.eof and keep_open is True
    assert app.transport.get_extra_info("peername") == PEER


@in_loop
async def test_eof_mid_header_rejects(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "l4lb.backend")
    factory, transport, apps = _open(ProxyPolicy(trusted=["127.0.0.1"]))
    transport.get_protocol().data_received(b"PROXY TCP4 1.2.")  # type: ignore[attr-defined]
    transport.get_protocol().eof_received()  # type: ignore[attr-defined]
    assert transport.aborted and not apps
    assert factory.rejections == {"eof": 1}
    assert "rejected 127.0.0.1:5000: eof" in caplog.text


@in_loop
async def test_untrusted_rejected_before_any_byte() -> None:
    factory, transport, apps = _open(ProxyPolicy(trusted=["10.0.0.0/8"]))
    assert transport.aborted and not apps
    assert factory.rejections == {"untrusted": 1}


@in_loop
async def test_timeout_rejects_silent_peer() -> None:
    factory, transport, apps = _open(ProxyPolicy(trusted=["127.0.0.1"], header_timeout=0.05))
    for _ in range(100):
        if transport.aborted:
            break
        await asyncio.sleep(0.02)
    assert transport.aborted and not apps
    assert factory.rejections == {"header_timeout": 1}


@in_loop
async def test_app_that_fails_to_start_is_closed(caplog: pytest.LogCaptureFixture) -> None:
    class Broken(App):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            raise RuntimeError("boom")

    factory = ProxyProtocolFactory(Broken, ProxyPolicy(mode="off"))
    transport = FakeTransport()
    protocol = factory()
    protocol.connection_made(transport)
    assert transport.aborted
    assert "failed to start" in caplog.text
