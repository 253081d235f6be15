"""A legacy TCP server that knows nothing of PROXY: ``socketserver``, the peer from the socket.

    python -m tests.transparent.legacy_server LOG HOST:PORT [HOST:PORT ...]

For each connection it reads the request until the client's FIN, appends one line
``PEER_IP PEER_PORT SERVER_PORT`` to LOG (only when the request was not empty: a port probe is
not a client), then answers ``peer PEER_IP\n`` followed by 1 MiB, and closes. Answering only after
the FIN is what a half-closing client needs the relay to get right.
"""

from __future__ import annotations

import socket
import socketserver
import sys
import threading

ANSWER_TAIL = bytes(range(256)) * 4096  # 1 MiB


class _Handler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        sock: socket.socket = self.request
        request = b""
        while chunk := sock.recv(65536):
            request += chunk
        if not request:
            return
        ip, port = self.client_address[:2]
        if ip.startswith("::ffff:"):
            ip = ip[7:]
        server: _Server = self.server  # type: ignore[assignment]
        with server.lock, open(server.log_path, "a") as log:
            log.write(f"{ip} {port} {sock.getsockname()[1]}\n")
        sock.sendall(f"peer {ip}\n".encode() + ANSWER_TAIL)


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    lock = threading.Lock()
    log_path = ""


class _Server6(_Server):
    address_family = socket.AF_INET6


def main(argv: list[str]) -> None:
    log_path, binds = argv[0], argv[1:]
    servers = []
    for bind in binds:
        host, _, port = bind.rpartition(":")
        host = host.strip("[]")
        cls = _Server6 if ":" in host else _Server
        server = cls((host, int(port)), _Handler)
        server.log_path = log_path
        servers.append(server)
    for server in servers[1:]:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    servers[0].serve_forever()


if __name__ == "__main__":
    main(sys.argv[1:])
