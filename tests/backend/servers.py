"""Run the backend integrations in-process (each in its own thread) for tests, on free ports.

Every server here is a small "greeting" service: it speaks first, naming the addresses the
integration gave it, then echoes lines. So one read tells a test who the app thinks the client is,
and the echo proves that no application byte was lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import json
import socket
import socketserver
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from l4lb.backend.asyncio import start_server
from l4lb.backend.socketserver import ProxyProtocolMixin
from l4lb.trust.policy import ProxyPolicy
from tests.support.http import read_response

CLIENT = ("198.51.100.42", 40000)
"""The client address the tests' PROXY headers claim."""
DEST = ("203.0.113.7", 443)


def policy(mode: str = "required", timeout: float = 5.0) -> ProxyPolicy:
    """A policy trusting 127.0.0.1, the tests' balancer."""
    return ProxyPolicy(mode=mode, trusted=["127.0.0.1/32"], header_timeout=timeout)


def fmt(addr: Any) -> str:
    if not addr:
        return "-"
    return f"{addr[0]}:{addr[1]}"


def greeting(peer: Any, sock: Any, via: Any, header: Any) -> bytes:
    version = header.version if header is not None else "-"
    uid = header.unique_id.decode() if header is not None and header.unique_id else "-"
    auth = header.authority if header is not None and header.authority else "-"
    return (
        f"HELLO peer={fmt(peer)} sock={fmt(sock)} via={fmt(via)} v={version} uid={uid} "
        f"auth={auth}\r\n"
    ).encode()


def parse_greeting(line: bytes) -> dict[str, str]:
    assert line.startswith(b"HELLO "), line
    return dict(part.split("=", 1) for part in line.decode().split()[1:])


class LoopThread:
    """An asyncio event loop running in a thread; ``call(coro)`` runs a coroutine on it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def call(self, coro: Awaitable[Any], timeout: float = 10.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)  # type: ignore[arg-type]

    def close_server(self, server: asyncio.AbstractServer) -> None:
        """Close a server from its own loop (asyncio servers are not thread-safe)."""

        async def close() -> None:
            server.close()

        with contextlib.suppress(Exception):
            self.call(close())

    def close(self) -> None:
        async def cancel_all() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        with contextlib.suppress(Exception):
            self.call(cancel_all())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


class Seen:
    """What the application saw, shared between the server thread and the test."""

    def __init__(self) -> None:
        self.connections: list[dict[str, Any]] = []
        self.lock = threading.Lock()

    def add(self, **info: Any) -> None:
        with self.lock:
            self.connections.append(info)

    def __len__(self) -> int:
        with self.lock:
            return len(self.connections)


@contextlib.contextmanager
def asyncio_greeter(
    policy: ProxyPolicy, host: str = "127.0.0.1", ssl: Any = None
) -> Iterator[tuple[int, Seen, Any]]:
    """``start_server`` with a greeting callback; yields (port, seen, server)."""
    seen = Seen()

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        names = ("peername", "sockname", "proxy_peer", "ssl_object")
        info = {k: writer.get_extra_info(k) for k in names}
        tls = info.pop("ssl_object")
        header = writer.get_extra_info("proxy_header")
        seen.add(header=header, tls=tls.version() if tls is not None else None, **info)
        writer.write(greeting(info["peername"], info["sockname"], info["proxy_peer"], header))
        try:
            while line := await reader.readline():
                writer.write(b"ECHO " + line)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    runner = LoopThread()

    async def start() -> asyncio.Server:
        return await start_server(on_client, host, 0, policy=policy, ssl=ssl)

    server = runner.call(start())
    try:
        yield server.sockets[0].getsockname()[1], seen, server
    finally:
        runner.close_server(server)
        runner.close()


@contextlib.contextmanager
def _serving(server: Any) -> Iterator[tuple[int, Any]]:
    """Run a socketserver in a thread for the block: (port, server); shut down after."""
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    try:
        yield server.server_address[1], server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.proxy_rejections: dict[str, int] = {}
        self.seen = Seen()


class _DualStackServer(_Server):
    address_family = socket.AF_INET6  # "::" also accepts IPv4, as ::ffff:a.b.c.d


@contextlib.contextmanager
def socketserver_greeter(
    policy: ProxyPolicy, dual_stack: bool = False
) -> Iterator[tuple[int, _Server]]:
    """A ``StreamRequestHandler`` greeting server with ``ProxyProtocolMixin``."""

    class Handler(ProxyProtocolMixin, socketserver.StreamRequestHandler):
        proxy_policy = policy

        def handle(self) -> None:
            sockname = self.proxy_destination
            self.server.seen.add(  # type: ignore[attr-defined]
                peername=self.client_address, header=self.proxy_header, proxy_peer=self.proxy_peer
            )
            self.wfile.write(
                greeting(self.client_address, sockname, self.proxy_peer, self.proxy_header)
            )
            for line in self.rfile:
                self.wfile.write(b"ECHO " + line)

    server = (
        _DualStackServer(("::", 0), Handler) if dual_stack else _Server(("127.0.0.1", 0), Handler)
    )
    with _serving(server) as served:
        yield served


class _HTTPServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.proxy_rejections: dict[str, int] = {}
        self.log_lines: list[str] = []


@contextlib.contextmanager
def http_server(policy: ProxyPolicy, ssl: Any = None) -> Iterator[tuple[int, _HTTPServer]]:
    """An ``http.server`` handler with ``ProxyProtocolMixin``, answering with the client in JSON."""

    class Handler(ProxyProtocolMixin, http.server.BaseHTTPRequestHandler):
        proxy_policy = policy
        proxy_ssl_context = ssl
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            header = self.proxy_header
            body = json.dumps(
                {
                    "client": list(self.client_address),
                    "via": list(self.proxy_peer),
                    "destination": list(self.proxy_destination or ()),
                    "version": header.version if header else None,
                    "unique_id": header.unique_id.decode() if header and header.unique_id else None,
                    "path": self.path,
                    "tls": self.request.version() if hasattr(self.request, "version") else None,
                }
            ).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            self.server.log_lines.append(  # type: ignore[attr-defined]
                f"{self.address_string()} - {format % args}"
            )

    server = _HTTPServer(("127.0.0.1", 0), Handler)
    with _serving(server) as served:
        yield served


# --- uvicorn -------------------------------------------------------------------------------


async def asgi_app(
    scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]
) -> None:
    """Answers HTTP with JSON naming scope client/server and the PROXY extension; echoes WS."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    ext = scope.get("extensions", {}).get("proxy_protocol") or {}
    info = {
        "client": list(scope["client"]) if scope.get("client") else None,
        "server": list(scope["server"]) if scope.get("server") else None,
        "version": ext.get("version"),
        "reason": ext.get("reason"),
        "authority": ext.get("authority"),
        "unique_id": ext["unique_id"].decode() if ext.get("unique_id") else None,
        "upstream": list(ext["upstream"]) if ext.get("upstream") else None,
        "tlv_types": [t for t, _ in ext.get("tlvs", [])],
        "ssl": ext.get("ssl"),
        "scheme": scope.get("scheme"),
    }
    if scope["type"] == "websocket":
        await receive()  # websocket.connect
        await send({"type": "websocket.accept"})
        await send({"type": "websocket.send", "text": json.dumps(info)})
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                return
            await send({"type": "websocket.send", "text": "echo " + (message.get("text") or "")})
    body = json.dumps(info).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


@contextlib.contextmanager
def uvicorn_server(
    policy: ProxyPolicy, http: str = "auto", ws: str = "auto", ssl: Any = None
) -> Iterator[int]:
    """uvicorn serving :func:`asgi_app` with ``proxy_protocol_http(policy=...)``, in a thread."""
    import uvicorn

    from l4lb.backend.uvicorn import proxy_protocol_http
    from tests.support.peers import free_port

    port = free_port()
    config = uvicorn.Config(
        asgi_app,
        host="127.0.0.1",
        port=port,
        http=proxy_protocol_http(policy=policy, http=http, ssl=ssl),
        ws=ws,
        proxy_headers=False,
        log_level="warning",
        lifespan="off",
        timeout_graceful_shutdown=1,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(10)


# --- clients -------------------------------------------------------------------------------


def recv_line(sock: socket.socket, timeout: float = 10.0) -> bytes:
    """One line (up to LF) from a blocking socket; b"" if the peer closes first."""
    sock.settimeout(timeout)
    buf = b""
    while not buf.endswith(b"\n"):
        try:
            chunk = sock.recv(1)
        except ConnectionResetError:
            return buf
        if not chunk:
            return buf
        buf += chunk
    return buf


def closed_by_peer(sock: socket.socket, timeout: float = 10.0) -> bool:
    """True if the peer closes (FIN or RST) within ``timeout`` without sending a byte."""
    sock.settimeout(timeout)
    try:
        data = sock.recv(100)
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return data == b""


def http_request(
    sock: socket.socket, path: str = "/", host: str = "x", timeout: float = 10.0
) -> tuple[int, bytes]:
    """One keep-alive HTTP/1.1 GET on ``sock``: the status and the body."""
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    sock.settimeout(timeout)
    return read_response(sock)


def http_get(
    sock: socket.socket, path: str = "/", host: str = "x", timeout: float = 10.0
) -> dict[str, Any]:
    """One keep-alive HTTP/1.1 GET on ``sock`` that must answer 200; the JSON body."""
    status, body = http_request(sock, path, host, timeout)
    assert status == 200, (status, body)
    result: dict[str, Any] = json.loads(body)
    return result


# --- TLS -------------------------------------------------------------------------------------


def make_cert(workdir: Any) -> tuple[str, str]:
    """A throwaway self-signed certificate for 127.0.0.1 and localhost: (cert, key) paths."""
    import subprocess

    cert, key = str(workdir / "cert.pem"), str(workdir / "key.pem")
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            key,
            "-out",
            cert,
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=IP:127.0.0.1,DNS:localhost",
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )
    return cert, key


def server_context(cert: str, key: str) -> Any:
    import ssl

    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    return ctx


def tls_client(sock: socket.socket, cert: str) -> Any:
    """Wrap a connected socket (after its PROXY header was sent) in TLS, trusting ``cert``."""
    import ssl

    ctx = ssl.create_default_context(cafile=cert)
    return ctx.wrap_socket(sock, server_hostname="localhost")


class TLSInOneSegment:
    """A TLS client whose ClientHello goes out in the same segment as the PROXY header.

    The hard case for a server that starts TLS after the header: it must not have read any of
    the ClientHello with the header.
    """

    def __init__(self, sock: socket.socket, cert: str, header: bytes) -> None:
        import ssl

        self.sock = sock
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        ctx = ssl.create_default_context(cafile=cert)
        self.tls = ctx.wrap_bio(self.incoming, self.outgoing, server_hostname="localhost")
        with contextlib.suppress(ssl.SSLWantReadError):
            self.tls.do_handshake()
        sock.sendall(header + self.outgoing.read())
        sock.settimeout(10)
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._flush()
                data = sock.recv(65536)
                if not data:
                    raise ConnectionError("closed during the TLS handshake") from None
                self.incoming.write(data)
        self._flush()

    def _flush(self) -> None:
        pending = self.outgoing.read()
        if pending:
            self.sock.sendall(pending)

    def sendall(self, data: bytes) -> None:
        self.tls.write(data)
        self._flush()

    def recv_until(self, marker: bytes) -> bytes:
        import ssl

        buf = b""
        while marker not in buf:
            try:
                buf += self.tls.read(65536)
            except ssl.SSLWantReadError:
                data = self.sock.recv(65536)
                if not data:
                    break
                self.incoming.write(data)
        return buf


def ws_first_message(sock: Any, path: str = "/ws", timeout: float = 10.0) -> dict[str, Any]:
    """Upgrade to WebSocket on ``sock`` and return the first (JSON text) message, one thread.

    For TLS sockets made by :func:`tls_client`: the websockets sync client reads in a second
    thread while it writes, and an ``SSLSocket`` must not be used from two threads at once.
    """
    import base64
    import os

    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        f"GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    sock.settimeout(timeout)
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError(f"closed during the upgrade: {buf!r}")
        buf += chunk
    head, _, frame = buf.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101"), head

    def need(n: int) -> None:
        nonlocal frame
        while len(frame) < n:
            chunk = sock.recv(4096)
            if not chunk:
                raise ConnectionError("closed in the middle of a frame")
            frame += chunk

    need(2)
    assert frame[0] == 0x81, frame[:2]  # FIN + text, unmasked from a server
    length, offset = frame[1] & 0x7F, 2
    if length == 126:
        need(4)
        length, offset = int.from_bytes(frame[2:4], "big"), 4
    need(offset + length)
    result: dict[str, Any] = json.loads(frame[offset : offset + length])
    return result


# --- real HAProxy and nginx in front -------------------------------------------------------


@contextlib.contextmanager
def front_ends(workdir: Any, backend_port: int) -> Iterator[dict[str, int]]:
    """Real HAProxy and nginx in front of ``127.0.0.1:backend_port``; yields name -> front port.

    ``haproxy-v1`` (send-proxy), ``haproxy-v2`` (send-proxy-v2 with unique-id and authority;
    the unique id is the client's ``ip:port``), ``haproxy-chain`` (accept-proxy in front, so a
    client's own v2 header with an authority TLV is passed on) and ``nginx`` (stream,
    ``proxy_protocol on``, v1). Both connect to the backend from 127.0.0.1.
    """
    from tests.support.peers import free_port, haproxy, nginx

    ports = {name: free_port() for name in ("haproxy-v1", "haproxy-v2", "haproxy-chain", "nginx")}
    server = f"127.0.0.1:{backend_port}"
    v2 = "send-proxy-v2 proxy-v2-options unique-id,authority"
    body = (
        f"listen v1\n    bind 127.0.0.1:{ports['haproxy-v1']}\n"
        f"    server app {server} send-proxy\n"
        f"listen v2\n    bind 127.0.0.1:{ports['haproxy-v2']}\n"
        "    unique-id-format %ci:%cp\n"
        f"    server app {server} {v2}\n"
        f"listen chain\n    bind 127.0.0.1:{ports['haproxy-chain']} accept-proxy\n"
        "    unique-id-format %ci:%cp\n"
        f"    server app {server} {v2}\n"
    )
    stream = (
        f"server {{ listen 127.0.0.1:{ports['nginx']}; proxy_pass {server}; "
        "proxy_protocol on; proxy_connect_timeout 5s; }"
    )
    hap_ports = [("127.0.0.1", ports[n]) for n in ("haproxy-v1", "haproxy-v2", "haproxy-chain")]
    with (
        haproxy(workdir / "haproxy", body, wait=hap_ports),
        nginx(workdir / "nginx", stream=stream, wait=[("127.0.0.1", ports["nginx"])]),
    ):
        yield ports
