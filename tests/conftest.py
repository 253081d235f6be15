"""Settings for the whole suite.

Every test talks to loopback only. A machine configured with an HTTP proxy (``http_proxy`` and
friends, common on CI runners) would send the tests' urllib, httpx and curl requests for
127.0.0.1 to that proxy instead; loopback is excluded from any proxy here.
"""

from __future__ import annotations

import os

_LOOPBACK = "127.0.0.1,localhost,::1,[::1]"

for _name in ("no_proxy", "NO_PROXY"):
    _current = os.environ.get(_name, "")
    os.environ[_name] = f"{_current},{_LOOPBACK}" if _current else _LOOPBACK
