"""``l4lb run`` refusing to start says which key is wrong and what would do, with exit 1."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.l4lb import config_text
from tests.support.peers import free_port


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize(
    ("access", "why"),
    [
        ("/nonexistent/dir/access.log", "No such file"),
        ("logs/access.log", "No such file"),  # relative to the config file, not the cwd
        (".", "Is a directory"),
    ],
)
def test_unusable_access_log(tmp_path: Path, workers: int, access: str, why: str) -> None:
    path = tmp_path / "l4lb.toml"
    text = config_text(f"127.0.0.1:{free_port()}", ["127.0.0.1:9"], access_log=access)
    path.write_text(text.replace("workers = 1", f"workers = {workers}"))
    result = subprocess.run(
        [sys.executable, "-m", "l4lb", "run", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd="/",
    )
    assert result.returncode == 1, result.stderr
    line = next(ln for ln in result.stderr.splitlines() if "event=start_failed" in ln)
    shown = line.split("log.access: cannot open ", 1)[1].split(": ", 1)[0]
    assert os.path.normpath(shown) == os.path.normpath(tmp_path / access), line
    assert why in line
    assert "expected a writable file path, 'stdout' or 'off'" in line
    assert "Traceback" not in result.stderr
