"""The status page in a real headless Chromium, in front of a real ``l4lb run``.

The page renders listeners, pools and backends from /status; after a backend is stopped the
page shows it down; screenshots (desktop and phone size) are saved under the test's tmp_path
and copied to bench/results/ for people to look at.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from tests.observe.chromium import CHROMIUM, dump_dom, screenshot
from tests.observe.live import Ports, l4lb_run
from tests.support.echo_backend import EchoBackend, echo_through

RESULTS = Path(__file__).parents[2] / "bench" / "results"


def rows(dom: str) -> dict[str, str]:
    """backend address -> state, from the rendered table rows."""
    found = re.findall(r'<tr class="\w+" data-backend="([^"]+)" data-state="(\w+)"', dom)
    return dict(found)


@pytest.mark.skipif(shutil.which(CHROMIUM) is None, reason="chromium is not installed")
def test_status_page_in_chromium(tmp_path: Path) -> None:
    a, b = EchoBackend("a").start(), EchoBackend("b").start()
    ports = Ports()
    front, admin = ports["front"], ports["admin"]
    config = f"""
workers = 1

[[listeners]]
name = "front"
bind = "127.0.0.1:{front}"
pool = "web"

[pools.web]
balance = "leastconn"
send_proxy = "v2"
backends = [{{ address = "{a.address}", weight = 2 }}, {{ address = "{b.address}" }}]

[pools.web.health]
check = "proxy-local"
interval = "200ms"
timeout = "500ms"
rise = 1
fall = 1

[log]
access = "off"

[admin]
bind = "127.0.0.1:{admin}"
"""
    url = f"http://127.0.0.1:{admin}/"
    profile = tmp_path / "chromium-profile"
    try:
        with l4lb_run(tmp_path / "l4lb", config) as lb:
            for _ in range(6):
                echo_through("127.0.0.1", front, b"x" * 1000)
            lb.wait_state("web", a.address, "up")
            dom = dump_dom(url, profile)
            assert 'data-loaded="yes"' in dom
            assert rows(dom) == {a.address: "up", b.address: "up"}
            assert 'data-listener="front"' in dom
            assert "Pool web" in dom and "leastconn" in dom and "check proxy-local" in dom
            assert '<b id="sum-backends">2/2</b>' in dom

            b.stop()
            lb.wait_state("web", b.address, "down")
            dom = dump_dom(url, profile)
            assert rows(dom) == {a.address: "up", b.address: "down"}
            assert '<span class="state down">down</span>' in dom
            assert '<b id="sum-backends">1/2</b>' in dom
            assert "refused" in dom.lower()  # the last check's detail

            # the page refreshes itself: 7 s of (virtual) time fetch /status at least 3 times
            dom = dump_dom(url, profile, budget_ms=7000)
            refreshes = re.search(r'data-refreshes="(\d+)"', dom)
            assert refreshes is not None and int(refreshes.group(1)) >= 3, refreshes

            shots = [
                screenshot(url, profile, tmp_path / "status_page.png", "1200,700"),
                screenshot(url, profile, tmp_path / "status_page_phone.png", "390,844"),
            ]
    finally:
        a.stop()
        b.stop()
    RESULTS.mkdir(parents=True, exist_ok=True)
    for shot in shots:
        data = shot.read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 5000
        shutil.copy(shot, RESULTS / shot.name)
        print(f"screenshot: {shot} (copied to {RESULTS / shot.name})")
