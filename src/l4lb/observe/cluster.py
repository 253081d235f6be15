"""One admin API for several worker processes (``workers = N``).

Each worker keeps its own counters and applies its own state changes. So that the admin API
shows and steers the whole balancer, every worker also serves the admin API on a private
abstract Unix socket (``@l4lb-admin-<supervisor pid>-<worker pid>``, same-user peers only),
and the one worker that holds ``[admin] bind`` answers for all of them:

- ``/status`` and ``/metrics`` add up every worker's counters
  (:func:`~l4lb.observe.snapshot.merge`);
- drain/disable/enable are applied by every worker;
- ``POST /reload`` reloads this worker, then every other one, and reports any worker's errors.

If that worker dies, another takes the bind over within a few seconds. Workers are found in
``/proc/net/unix`` (listening sockets with the supervisor's prefix), so a restarted worker is
picked up without any registry.
"""

from __future__ import annotations

import asyncio
import logging
import socket

log = logging.getLogger("l4lb.admin")

PREFIX = "l4lb-admin"
_LISTENING = "00010000"  # /proc/net/unix Flags of a listening socket (__SO_ACCEPTCON)
_TIMEOUT = 5.0


def socket_name(supervisor: int, pid: int) -> str:
    """The abstract Unix socket name of one worker's private admin API."""
    return f"\0{PREFIX}-{supervisor}-{pid}"


def peer_sockets(supervisor: int, own_pid: int) -> list[str]:
    """The private admin sockets of the other workers of this supervisor."""
    prefix = f"@{PREFIX}-{supervisor}-"
    own = f"{prefix}{own_pid}"
    found = set()
    try:
        with open("/proc/net/unix", encoding="ascii", errors="replace") as table:
            next(table, None)
            for line in table:
                fields = line.split()
                if len(fields) < 8 or fields[3] != _LISTENING:
                    continue
                path = fields[7]
                if path.startswith(prefix) and path != own:
                    found.add("\0" + path[1:])
    except OSError as err:
        log.warning("event=workers_unlisted error=%r", str(err))
    return sorted(found)


async def request(name: str, method: str, target: str) -> tuple[int, bytes]:
    """One HTTP/1.1 request to a worker's private admin socket: (status, body)."""
    async with asyncio.timeout(_TIMEOUT):
        # a socket of our own: uvloop does not take abstract names as a path
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(sock, name)
        except BaseException:
            sock.close()
            raise
        reader, writer = await asyncio.open_unix_connection(sock=sock)
        try:
            writer.write(
                f"{method} {target} HTTP/1.1\r\nHost: worker\r\nConnection: close\r\n"
                "Content-Length: 0\r\n\r\n".encode()
            )
            data = await reader.read()
        finally:
            writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    parts = head.split(b" ", 2)
    if len(parts) < 2 or not parts[1].isdigit():
        raise ConnectionError(f"no HTTP answer from worker {name[1:]!r}")
    return int(parts[1]), body


def listening_socket(name: str) -> socket.socket:
    """A listening Unix socket bound to the abstract ``name`` (for ``start_unix_server``)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(name)
        sock.listen(64)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock
