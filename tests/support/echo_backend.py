"""A restartable echo backend for tests: strips a PROXY header, says who it is, echoes the rest.

Each connection gets ``NAME\\n`` first, then every byte it sends back, until it half-closes.
The PROXY header (v1 line or v2 binary, if any) is read and recorded, never echoed, so a test
can tell which backend served a connection and verify the payload end to end. ``stop()``
closes the listening socket and every open connection; ``start()`` binds the same port again.
"""

from __future__ import annotations

import contextlib
import socket
import socketserver
import threading

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def _read_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("closed inside the PROXY header")
        data += chunk
    return data


def read_proxy_header(sock: socket.socket) -> bytes:
    """Consume a PROXY v1/v2 header if the stream starts with one; return it (or b"")."""
    first = sock.recv(16, socket.MSG_PEEK)
    if first.startswith(V2_SIGNATURE[: len(first)]) and len(first) >= 12:
        head = _read_exact(sock, 16)
        return head + _read_exact(sock, int.from_bytes(head[14:16], "big"))
    if first.startswith(b"PROXY "):
        line = b""
        while not line.endswith(b"\r\n"):
            line += _read_exact(sock, 1)
        return line
    return b""


class EchoBackend:
    def __init__(self, name: str, host: str = "127.0.0.1", port: int = 0) -> None:
        self.name = name
        self.host = host
        self.port = port
        self.headers: list[bytes] = []
        self.served = 0
        self._server: socketserver.ThreadingTCPServer | None = None
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def start(self) -> EchoBackend:
        backend = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                sock: socket.socket = self.request
                with backend._lock:
                    backend._conns.add(sock)
                try:
                    header = read_proxy_header(sock)
                    with backend._lock:
                        backend.headers.append(header)
                    sock.sendall(backend.name.encode() + b"\n")
                    while data := sock.recv(65536):
                        sock.sendall(data)
                    with backend._lock:
                        backend.served += 1
                    sock.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                finally:
                    with backend._lock:
                        backend._conns.discard(sock)

        class Server(socketserver.ThreadingTCPServer):
            allow_reuse_address = True
            daemon_threads = True
            address_family = socket.AF_INET6 if ":" in self.host else socket.AF_INET

        self._server = Server((self.host, self.port), Handler)
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True).start()
        return self

    def stop(self) -> None:
        """Close the listening socket and every open connection (connects are then refused)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        with self._lock:
            for sock in self._conns:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            self._conns.clear()

    def __enter__(self) -> EchoBackend:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def echo_through(host: str, port: int, payload: bytes, timeout: float = 10.0) -> tuple[str, bytes]:
    """Send ``payload`` through the balancer to an EchoBackend: (backend name, echoed bytes)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect((host, port))
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    name, _, rest = data.partition(b"\n")
    return name.decode(errors="replace"), rest
