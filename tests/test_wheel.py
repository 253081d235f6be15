"""The wheel that docs/install.md builds (setup.py), built for real from a copy of this checkout.

Where the machine can compile, it is a platform wheel with an extension module for each module
in pyproject.toml's ``[tool.l4lb] compiled`` and every ``.py`` file beside them; installed into a
fresh venv outside the checkout, it imports the compiled modules, says so in ``l4lb --version``
and relays a connection. ``L4LB_COMPILE=0``, or no C compiler, gives the pure ``py3-none-any``
wheel and one line saying why; ``L4LB_COMPILE=1`` makes a missing compiler an error.

Each build runs as docs/install.md's does: ``pip wheel`` from a fresh venv, so the build sees
only what pyproject.toml's ``[build-system] requires`` brings into pip's isolated build
environment, not this dev venv's packages (mypyc, run by the dev venv's pip, would read their
types there and hide a missing build requirement). So the package index must be reachable, as
for tests/service/test_install.py (pip's cache serves repeated runs). The compiled build is the
costly part: about 40-50 s of one core (mypyc and the C compiler); a pure one about 5 s.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pytest

import l4lb
from tests.support.echo_backend import EchoBackend, echo_through
from tests.support.l4lb import config_text
from tests.support.logs import wait_line
from tests.support.peers import free_port, stop_process

REPO = Path(__file__).parents[1]
COMPILED: list[str] = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["l4lb"][
    "compiled"
]
EXT_SUFFIX = sysconfig.get_config_var("EXT_SUFFIX")
NO_COMPILER = "/nonexistent/wheel-test-cc"


def _env(**extra: str) -> dict[str, str]:
    """This environment without what would point a build or a venv elsewhere, plus ``extra``."""
    drop = ("PYTHONPATH", "VIRTUAL_ENV", "L4LB_COMPILE", "CC")
    return {**{k: v for k, v in os.environ.items() if k not in drop}, **extra}


def _run(
    args: list[str], cwd: Path, env: dict[str, str], ok: bool = True
) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600, check=False
    )
    if ok:
        assert done.returncode == 0, (args, done.stdout[-4000:], done.stderr[-4000:])
    return done


def _source(tmp_path: Path) -> Path:
    """The checkout's files as git sees them (tracked, and new ones not ignored): no venv, no
    in-place mypyc build, no build/ left by another build."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout
    tree = tmp_path / "l4lb-src"
    for name in filter(None, listed.decode().split("\0")):
        if (REPO / name).is_file():
            (tree / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, tree / name)
    return tree


@pytest.fixture(scope="module")
def pip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv's pip, as docs/install.md builds with (``python3 -m venv /tmp/build``)."""
    venv = tmp_path_factory.mktemp("wheel-build-venv")
    _run([sys.executable, "-m", "venv", str(venv)], venv, _env())
    return venv / "bin" / "pip"


def _build(
    pip: Path, tmp_path: Path, env: dict[str, str], ok: bool = True
) -> tuple[Path | None, str]:
    """``pip wheel`` the copied source; the wheel (None when the build failed) and pip's
    verbose output (which holds the build's own lines)."""
    tree = _source(tmp_path)
    dist = tmp_path / "dist"
    done = _run(
        [str(pip), "wheel", "-v", "--no-deps", str(tree), "-w", str(dist)], tmp_path, env, ok
    )
    wheels = list(dist.glob("l4lb-*.whl"))
    assert len(wheels) == (1 if done.returncode == 0 else 0), wheels
    return (wheels[0] if wheels else None), done.stdout + done.stderr


def _said(output: str) -> list[str]:
    """The build's own lines (pip -v indents the backend's output)."""
    return [line.strip() for line in output.splitlines() if line.strip().startswith("l4lb:")]


def _sources() -> set[str]:
    package = Path(l4lb.__file__).parent
    return {str(p.relative_to(package.parent)) for p in package.rglob("*.py")}


def test_compiled_wheel_installs_and_serves(pip: Path, tmp_path: Path) -> None:
    wheel, output = _build(pip, tmp_path, _env())
    assert wheel is not None
    python_tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    platform_tag = sysconfig.get_platform().replace("-", "_").replace(".", "_")
    assert wheel.name == f"l4lb-{l4lb.__version__}-{python_tag}-{python_tag}-{platform_tag}.whl"
    assert _said(output) == [
        f"l4lb: compiling {len(COMPILED)} hot modules with mypyc (L4LB_COMPILE=0 for pure Python)"
    ]
    names = set(zipfile.ZipFile(wheel).namelist())
    assert _sources() <= names  # every .py: the source and the fallback
    extensions = {n for n in names if n.startswith("l4lb/") and n.endswith(EXT_SUFFIX)}
    assert extensions == {m.replace(".", "/") + EXT_SUFFIX for m in COMPILED}

    venv = tmp_path / "opt" / "l4lb"
    env = _env()
    _run([sys.executable, "-m", "venv", str(venv)], tmp_path, env)
    _run([str(venv / "bin" / "pip"), "install", "-q", str(wheel)], tmp_path, env)
    python, command = str(venv / "bin" / "python"), str(venv / "bin" / "l4lb")
    version = _run([command, "--version"], tmp_path, env).stdout.strip()
    assert version == f"l4lb {l4lb.__version__} (compiled with mypyc: {len(COMPILED)} modules)"
    where = "import importlib, json, sys; print(json.dumps({m: importlib.import_module(m).__file__ for m in sys.argv[1:]}))"  # noqa: E501
    files = json.loads(_run([python, "-c", where, "l4lb", *COMPILED], tmp_path, env).stdout)
    assert files.pop("l4lb").startswith(str(venv)), "imported the checkout, not the install"
    for module, file in files.items():
        assert file.startswith(str(venv)) and file.endswith(EXT_SUFFIX), (module, file)

    # The installed, compiled l4lb checks a config and relays one connection, then stops.
    port = free_port()
    with EchoBackend("compiled") as backend:
        config = tmp_path / "l4lb.toml"
        config.write_text(config_text(f"127.0.0.1:{port}", [backend.address], access_log="stdout"))
        assert "OK" in _run([command, "check", "--config", str(config)], tmp_path, env).stdout
        log = tmp_path / "l4lb.log"
        with open(log, "wb") as stderr:
            proc = subprocess.Popen(
                [command, "run", "--config", str(config)],
                cwd=tmp_path,
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
            )
        try:
            wait_line(log, "event=started", timeout=30)
            payload = b"through the compiled wheel\n"
            assert echo_through("127.0.0.1", port, payload) == ("compiled", payload)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0, log.read_text()
        finally:
            stop_process(proc)


@pytest.mark.parametrize(
    ("extra", "why"),
    [
        ({"L4LB_COMPILE": "0"}, "L4LB_COMPILE=0"),
        (
            {"CC": NO_COMPILER},
            f"a C compiler ({NO_COMPILER}) missing (e.g. apt-get install gcc python3-dev)",
        ),
    ],
    ids=["asked", "no-compiler"],
)
def test_pure_wheel_when_asked_or_unable(
    pip: Path, tmp_path: Path, extra: dict[str, str], why: str
) -> None:
    wheel, output = _build(pip, tmp_path, _env(**extra))
    assert wheel is not None
    assert wheel.name == f"l4lb-{l4lb.__version__}-py3-none-any.whl"
    assert _said(output) == [f"l4lb: building pure Python, not compiled with mypyc: {why}"]
    assert "Traceback" not in output
    names = set(zipfile.ZipFile(wheel).namelist())
    assert _sources() <= names
    assert not [n for n in names if n.endswith(".so")]


def test_compile_required_without_a_compiler_fails_in_one_line(pip: Path, tmp_path: Path) -> None:
    wheel, output = _build(pip, tmp_path, _env(L4LB_COMPILE="1", CC=NO_COMPILER), ok=False)
    assert wheel is None
    assert _said(output) == [
        f"l4lb: L4LB_COMPILE=1 but cannot compile with mypyc: a C compiler ({NO_COMPILER}) "
        "missing (e.g. apt-get install gcc python3-dev)"
    ]
    assert "Traceback" not in output
