"""The process ExaBGP runs for its API: copies lines between ExaBGP's pipes and l4lb's socket.

ExaBGP starts its API processes itself (``process { run ...; }``), so l4lb cannot hold the
pipes directly; this helper connects to a Unix socket l4lb listens on and copies: l4lb's
commands (``announce route ...``) to its stdout, ExaBGP's JSON messages from its stdin to l4lb.

When l4lb's side closes (l4lb stopped or died), the helper stops ExaBGP (its parent) with
SIGTERM, so the BGP sessions close and the routers withdraw the routes at once: ExaBGP itself
keeps announcing what an API process announced after that process ends. It also dies with
ExaBGP (``PR_SET_PDEATHSIG``).

Usage: ``python -m l4lb.anycast.bridge SOCKET_PATH``
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading

from l4lb.anycast.lifetime import die_with_parent


def _to_exabgp(sock: socket.socket, exabgp: int) -> None:
    out = sys.stdout.buffer
    while True:
        try:
            data = sock.recv(65536)
        except OSError:
            data = b""
        if not data:
            os.kill(exabgp, signal.SIGTERM)
            os._exit(0)
        out.write(data)
        out.flush()


def main(argv: list[str]) -> int:
    exabgp = os.getppid()
    die_with_parent(signal.SIGTERM)
    if len(argv) != 1:
        print("usage: python -m l4lb.anycast.bridge SOCKET_PATH", file=sys.stderr)
        return 2
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(argv[0])
    except OSError as err:
        print(f"l4lb bridge: cannot connect to {argv[0]}: {err.strerror}", file=sys.stderr)
        os.kill(exabgp, signal.SIGTERM)
        return 1
    threading.Thread(target=_to_exabgp, args=(sock, exabgp), daemon=True).start()
    stdin = sys.stdin.fileno()
    while True:
        data = os.read(stdin, 65536)
        if not data:
            return 0
        sock.sendall(data)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
