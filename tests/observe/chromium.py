"""Run Debian's real headless Chromium against a page: rendered DOM and screenshots."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def _base(profile: Path) -> list[str]:
    return [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile}",
    ]


def dump_dom(url: str, profile: Path, budget_ms: int = 3000) -> str:
    """The DOM after the page's scripts ran for ``budget_ms`` of virtual time."""
    out = subprocess.run(
        [*_base(profile), f"--virtual-time-budget={budget_ms}", "--dump-dom", url],
        capture_output=True,
        timeout=90,
        check=True,
    )
    return out.stdout.decode()


def screenshot(url: str, profile: Path, path: Path, size: str = "1200,800") -> Path:
    """A PNG of the rendered page at ``size`` (width,height)."""
    subprocess.run(
        [
            *_base(profile),
            "--virtual-time-budget=3000",
            "--hide-scrollbars",
            f"--window-size={size}",
            f"--screenshot={path}",
            url,
        ],
        capture_output=True,
        timeout=90,
        check=True,
    )
    return path
