"""``l4lb decode`` as an operator uses it: a v1 line pasted from a capture, as one or many args."""

from __future__ import annotations

import subprocess
import sys

import pytest


def _decode(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "l4lb", "decode", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    "args",
    [
        ("PROXY TCP4 192.168.0.1 192.168.0.11 56324 443",),
        ("PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n",),
        ("PROXY", "TCP4", "192.168.0.1", "192.168.0.11", "56324", "443"),  # unquoted
    ],
)
def test_v1_line_as_text(args: tuple[str, ...]) -> None:
    result = _decode(*args)
    assert result.returncode == 0, result.stderr
    assert "192.168.0.1:56324" in result.stdout
    assert "192.168.0.11:443" in result.stdout


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (("PROXY TCP4 1.2.3.4 5.6.7.8 1 +2",), 1, "bad_port"),  # as strict as ever
        (("PROXY TCP4 1.2.3.4 5.6.7.8 1 2\u00e9",), 1, "bad_port"),
        (("zz",), 2, "a v1 line may be given as text"),
    ],
)
def test_bad_text_says_why(args: tuple[str, ...], code: int, message: str) -> None:
    result = _decode(*args)
    assert result.returncode == code
    assert message in result.stderr
    assert "Traceback" not in result.stderr
