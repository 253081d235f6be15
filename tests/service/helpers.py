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
