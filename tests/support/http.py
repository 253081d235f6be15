"""Reading one HTTP/1.1 response off a socket, for tests that speak HTTP by hand (keep-alive
requests through the balancer, or from inside a network namespace where no client library
reaches)."""

from __future__ import annotations

import socket


def read_response(sock: socket.socket) -> tuple[int, bytes]:
    """The status and the body (``Content-Length`` bytes) of the next response on ``sock``.

    Raises ConnectionError when the peer closes before the headers or in the body.
    """
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError(f"closed before the response headers: {buf!r}")
        buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("closed in the middle of the body")
        body += chunk
    return int(head.split(b" ", 2)[1]), body[:length]


__all__ = ["read_response"]
