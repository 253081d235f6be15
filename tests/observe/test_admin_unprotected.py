"""An admin API open beyond loopback without a token is flagged at start (it can drain, disable
and reload); loopback, or any bind with a token, is not.

The warning comes before anything binds, so the test keeps the listener's port busy: ``l4lb run``
then exits 3 without ever opening a non-loopback admin socket on this machine.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.l4lb import config_text


@pytest.mark.parametrize(
    ("bind", "token", "warned"),
    [
        ("0.0.0.0:9100", None, True),
        ("[::]:9100", None, True),
        ("127.0.0.1:9100", None, False),
        ("0.0.0.0:9100", "s3cret", False),
    ],
)
def test_unprotected_admin_is_flagged(
    tmp_path: Path, bind: str, token: str | None, warned: bool
) -> None:
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        text = config_text(f"127.0.0.1:{port}", ["127.0.0.1:9"])
        text += f'\n[admin]\nbind = "{bind}"\n' + (f'token = "{token}"\n' if token else "")
        path = tmp_path / "l4lb.toml"
        path.write_text(text)
        result = subprocess.run(
            [sys.executable, "-m", "l4lb", "run", "--config", str(path)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 3, result.stderr  # the busy listener port: nothing was bound
    assert ("event=admin_unprotected" in result.stderr) is warned, result.stderr
    if warned:
        assert f"bind={bind}" in result.stderr and "set [admin] token" in result.stderr
