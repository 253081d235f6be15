"""Small helpers shared by the service tests: the admin API over a real socket."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any


def admin_get(port: int, path: str) -> tuple[int, dict[str, Any]]:
    """GET ``path`` on the admin API at 127.0.0.1:port: (status, JSON body)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def admin_post(port: int, path: str) -> tuple[int, dict[str, Any]]:
    """POST ``path`` (no body) on the admin API at 127.0.0.1:port: (status, JSON body)."""
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method="POST", data=b"")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def worker_snapshots(supervisor: int) -> dict[int, dict[str, Any]]:
    """Every worker's own ``/snapshot`` (not added up), by worker pid, read over the private
    admin sockets the workers of ``supervisor`` serve (``@l4lb-admin-<supervisor>-<pid>``).
    A worker that dies meanwhile is left out."""
    import socket

    prefix = f"@l4lb-admin-{supervisor}-"
    names = []
    with open("/proc/net/unix", encoding="ascii", errors="replace") as table:
        for line in table:
            fields = line.split()
            if len(fields) >= 8 and fields[7].startswith(prefix) and fields[3] == "00010000":
                names.append(fields[7])
    out: dict[int, dict[str, Any]] = {}
    for name in sorted(set(names)):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(10)
            data = b""
            try:
                sock.connect("\0" + name[1:])
                sock.sendall(b"GET /snapshot HTTP/1.1\r\nHost: w\r\nConnection: close\r\n\r\n")
                while chunk := sock.recv(65536):
                    data += chunk
            except (ConnectionError, FileNotFoundError):
                continue  # a worker that died between the listing and the request
        _, _, body = data.partition(b"\r\n\r\n")
        out[int(name.rsplit("-", 1)[1])] = json.loads(body)
    return out


def backends_of(snapshot: dict[str, Any], pool: str = "main") -> dict[str, dict[str, Any]]:
    """A snapshot's backends of ``pool`` by address: state, weight, max_conns, origin."""
    for p in snapshot["pools"]:
        if p["name"] == pool:
            return {
                b["address"]: {k: b[k] for k in ("state", "weight", "max_conns", "origin")}
                for b in p["backends"]
            }
    return {}
