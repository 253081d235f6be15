"""contrib/l4lb.service passes systemd's own checker (with ExecStart pointed at this checkout)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNIT = Path(__file__).parents[2] / "contrib" / "l4lb.service"


def test_unit_declares_notify_and_reload() -> None:
    text = UNIT.read_text()
    assert "Type=notify" in text
    assert "ExecReload=/opt/l4lb/bin/l4lb reload --config ${L4LB_CONFIG} --pid $MAINPID" in text
    for directory in ("LogsDirectory=l4lb", "StateDirectory=l4lb", "RuntimeDirectory=l4lb"):
        assert directory in text
    assert "l4lb run --config" in text and "l4lb check --config" in text


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_analyze_verify(tmp_path: Path) -> None:
    l4lb = Path(sys.executable).parent / "l4lb"
    unit = tmp_path / "l4lb.service"
    unit.write_text(UNIT.read_text().replace("/opt/l4lb/bin/l4lb", str(l4lb)))
    out = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    problems = [
        line
        for line in (out.stdout + out.stderr).splitlines()
        if any(word in line for word in ("Unknown", "Failed", "Invalid", "ignoring"))
    ]
    assert out.returncode == 0 and not problems, out.stdout + out.stderr
