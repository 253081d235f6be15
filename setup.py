"""The wheel's build: the hot modules compiled with mypyc when this machine can, else pure Python.

``pip wheel .``, ``pip install .`` and ``python -m build`` run this through setuptools' backend.
The modules are pyproject.toml's ``[tool.l4lb] compiled`` (the list ``make setup`` compiles in
place); their ``.py`` files stay in the wheel beside the extension modules, as in a checkout: the
source, and the fallback. The wheel is then for this Python version and architecture
(``cp311-cp311-linux_x86_64``). Without a C compiler or the Python headers, or with
``L4LB_COMPILE=0``, it is the pure ``py3-none-any`` wheel, and one line says why
(``L4LB_COMPILE=1`` makes that an error instead). docs/install.md.

Only the commands that build the installed files compile: not the metadata steps pip runs
first, not an sdist, not an editable install (``make setup``'s ``pip install -e``, after which
the Makefile compiles in place, or not, as ``COMPILE`` says).
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
import sysconfig
import tomllib
from pathlib import Path

from setuptools import Extension, setup

HERE = Path(__file__).resolve().parent
BUILD_COMMANDS = frozenset({"bdist_wheel", "build", "build_ext", "install"})
"""The setup.py commands that make the files a wheel or an install holds."""


def compiled_modules() -> list[str]:
    with open(HERE / "pyproject.toml", "rb") as file:
        modules: list[str] = tomllib.load(file)["tool"]["l4lb"]["compiled"]
    return modules


def cannot_compile() -> str | None:
    """Why this build environment cannot compile the modules, or None when it can."""
    cc = shlex.split(os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc")[0]
    headers = Path(sysconfig.get_paths()["include"]) / "Python.h"
    missing = [
        what
        for what, there in (
            (f"a C compiler ({cc})", shutil.which(cc)),
            (f"the Python headers ({headers})", headers.exists()),
        )
        if not there
    ]
    if missing:
        return " and ".join(missing) + " missing (e.g. apt-get install gcc python3-dev)"
    try:
        import mypyc.build  # noqa: F401
    except ImportError:
        return "mypy (mypyc) is not installed where this build runs (pyproject.toml requires it)"
    return None


def ext_modules() -> list[Extension]:
    if not BUILD_COMMANDS & set(sys.argv[1:]):
        return []
    setting = os.environ.get("L4LB_COMPILE", "")
    why = "L4LB_COMPILE=0" if setting == "0" else cannot_compile()
    if why is not None:
        if setting == "1":
            sys.exit(f"l4lb: L4LB_COMPILE=1 but cannot compile with mypyc: {why}")
        print(f"l4lb: building pure Python, not compiled with mypyc: {why}", file=sys.stderr)
        return []
    from mypyc.build import mypycify

    modules = compiled_modules()
    print(f"l4lb: compiling {len(modules)} hot modules with mypyc (L4LB_COMPILE=0 for pure Python)")
    paths = [str(Path("src", *m.split("."))) + ".py" for m in modules]
    extensions: list[Extension] = mypycify(paths)
    return extensions


setup(ext_modules=ext_modules())
