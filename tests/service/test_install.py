"""docs/install.md, exercised: build the wheel with the venv's pip, install it into a fresh
venv outside the checkout, then ``l4lb check`` and ``l4lb run`` from that venv serve one
connection. Needs the package index (pip) for the build backend and the dependencies.

The wheel built here is the pure-Python one (``L4LB_COMPILE=0``, docs/install.md's fallback):
tests/test_wheel.py builds, installs and serves from the compiled one, which costs a mypyc
build (about 45 s of one core) that a second test need not pay again."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from tests.support.echo_backend import EchoBackend, echo_through
from tests.support.l4lb import config_text
from tests.support.logs import wait_line
from tests.support.peers import free_port, stop_process

REPO = Path(__file__).parents[2]


def _run(args: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["L4LB_COMPILE"] = "0"
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, (args, done.stdout[-3000:], done.stderr[-3000:])
    return done


def test_wheel_into_a_fresh_venv_checks_and_serves(tmp_path: Path) -> None:
    pip = Path(sys.executable).parent / "pip"
    wheels = tmp_path / "dist"
    _run([str(pip), "wheel", "--no-deps", str(REPO), "-w", str(wheels)], cwd=tmp_path)
    (wheel,) = wheels.glob("l4lb-*.whl")
    venv = tmp_path / "opt" / "l4lb"
    _run([sys.executable, "-m", "venv", str(venv)], cwd=tmp_path)
    _run([str(venv / "bin" / "pip"), "install", "-q", str(wheel)], cwd=tmp_path)
    python = str(venv / "bin" / "python")
    where = _run([python, "-c", "import l4lb; print(l4lb.__file__)"], cwd=tmp_path)
    assert where.stdout.strip().startswith(str(venv)), where.stdout  # not the checkout
    version = _run([str(venv / "bin" / "l4lb"), "--version"], cwd=tmp_path)
    assert version.stdout.strip().endswith("(pure Python)"), version.stdout

    etc, logs = tmp_path / "etc" / "l4lb", tmp_path / "log" / "l4lb"
    etc.mkdir(parents=True)
    logs.mkdir(parents=True)
    port = free_port()
    l4lb = str(venv / "bin" / "l4lb")
    with EchoBackend("installed") as backend:
        config = etc / "l4lb.toml"
        config.write_text(
            config_text(f"127.0.0.1:{port}", [backend.address], access_log=str(logs / "a.log"))
        )
        checked = _run([l4lb, "check", "--config", str(config)], cwd=tmp_path)
        assert "OK" in checked.stdout
        err = tmp_path / "run.err"
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        proc = subprocess.Popen(
            [l4lb, "run", "--config", str(config)],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=open(err, "wb"),  # noqa: SIM115
        )
        try:
            wait_line(err, "event=started", timeout=30)
            payload = b"from the installed wheel\n"
            assert echo_through("127.0.0.1", port, payload) == ("installed", payload)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0, err.read_text()
        finally:
            stop_process(proc)
