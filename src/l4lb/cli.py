"""The ``l4lb`` command: a thin dispatcher to the module that implements each subcommand.

Each subcommand lives in the module named for what it does and exposes ``main(argv) -> int``;
this file only maps names to modules, so adding a command never touches another's code.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Sequence
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path

# name -> (module, one-line help). Each module has ``main(argv: list[str]) -> int``.
COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("l4lb.balancer.command", "run the load balancer: l4lb run --config FILE.toml"),
    "check": ("l4lb.config.command", "validate a config file: l4lb check --config FILE.toml"),
    "reload": (
        "l4lb.balancer.reload_command",
        "validate, reload the running l4lb, report the outcome: l4lb reload --config FILE --pid N",
    ),
    "demo": ("l4lb.demo.command", "run the balancer in front of two built-in demo backends"),
    "demo-backend": ("l4lb.demo.backend_command", "run one demo backend that requires PROXY"),
    "decode": ("l4lb.decode", "decode a PROXY header from hex or raw stdin"),
    "serve-asgi": ("l4lb.backend.serve", "run an ASGI app under uvicorn behind a PROXY balancer"),
}


def _usage() -> str:
    lines = ["usage: l4lb COMMAND [options]", "", "commands:"]
    lines += [f"  {name:<14} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run 'l4lb COMMAND --help' for the options of one command."]
    return "\n".join(lines)


def build() -> str:
    """Which build is installed: "compiled with mypyc: N modules" or "pure Python".

    A compiled module is an extension module beside its ``.py`` file (in a wheel built with a
    C compiler, or a checkout after ``make setup``); Python imports it before the ``.py``.
    """
    package = Path(__file__).parent
    sources = (
        path.with_name(path.name.split(".", 1)[0] + ".py")
        for suffix in EXTENSION_SUFFIXES
        for path in package.rglob(f"*{suffix}")
    )
    compiled = {source for source in sources if source.exists()}
    if not compiled:
        return "pure Python"
    return f"compiled with mypyc: {len(compiled)} modules"


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0 if args else 2
    if args[0] in ("-V", "--version"):
        from l4lb import __version__

        print(f"l4lb {__version__} ({build()})")
        return 0
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        print(f"l4lb: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    entry: Callable[[list[str]], int] = module.main
    try:
        return entry(rest)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
