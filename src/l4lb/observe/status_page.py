"""The live status page served at ``GET /`` of the admin API.

One self-contained HTML file (``status_page.html``: inline CSS and JavaScript, no external
assets) in the spirit of HAProxy's stats page. It fetches ``/status`` every two seconds and
draws listeners, pools and backends with state colours, rates computed from successive
counters, and active connections; narrow screens hide the less important columns.
"""

from __future__ import annotations

from functools import cache
from importlib.resources import files


@cache
def render() -> bytes:
    """The page's bytes (read once from the package)."""
    return files("l4lb.observe").joinpath("status_page.html").read_bytes()
