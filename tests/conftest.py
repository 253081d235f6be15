"""Settings for the whole suite.

Open files: some tests hold a thousand client sockets at once, and the balancer and backends they
start inherit the test process's limits. A login shell's soft RLIMIT_NOFILE is often 1024 (a fresh
Debian machine: soft 1024, hard 524288), where those tests failed with "Too many open files", and a
failed test's leaked sockets then failed the next tests on the same worker. The soft limit is
raised to 20000 (or the hard limit, if lower), so every machine runs the suite with the same limit;
tests of the balancer's own limit handling set theirs explicitly.

Hypothesis: no per-example ``deadline`` (200 ms by default) and no ``too_slow`` health check. Both
time the machine, not the code: on a loaded CI machine an example that waits for the CPU fails
with DeadlineExceeded or "Flaky: Unreliable test timings". What the properties assert is
unchanged; the fuzz test bounds each example with its own generous liveness limit.

Every test talks to loopback only. A machine configured with an HTTP proxy (``http_proxy`` and
friends, common on CI runners) would send the tests' urllib, httpx and curl requests for
127.0.0.1 to that proxy instead; loopback is excluded from any proxy here.
"""

from __future__ import annotations

import os
import resource

from hypothesis import HealthCheck, settings

_LOOPBACK = "127.0.0.1,localhost,::1,[::1]"

for _name in ("no_proxy", "NO_PROXY"):
    _current = os.environ.get(_name, "")
    os.environ[_name] = f"{_current},{_LOOPBACK}" if _current else _LOOPBACK

_OPEN_FILES = 20000
_soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
_want = _OPEN_FILES if _hard == resource.RLIM_INFINITY else min(_hard, _OPEN_FILES)
if _soft != resource.RLIM_INFINITY and _soft < _want:
    resource.setrlimit(resource.RLIMIT_NOFILE, (_want, _hard))

settings.register_profile(
    "l4lb", deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True
)
settings.load_profile("l4lb")


def _compiled() -> tuple[list[str], list[str]]:
    """The l4lb modules imported from a mypyc build (``make setup`` makes one by default), and
    those of them whose .py is newer than the build."""
    import pathlib

    import l4lb

    root = pathlib.Path(l4lb.__file__).parent
    compiled, stale = [], []
    for ext in root.rglob("*.so"):
        source = ext.with_name(ext.name.split(".", 1)[0] + ".py")
        if not source.exists():
            continue
        name = str(source.relative_to(root.parent))
        compiled.append(name)
        if source.stat().st_mtime > ext.stat().st_mtime:
            stale.append(name)
    return sorted(compiled), sorted(stale)


def pytest_configure(config: object) -> None:
    """Refuse to test a stale mypyc build: Python imports an extension module before its .py,
    so an edit made since the build would silently not be tested. ``make test`` rebuilds
    first; this catches pytest run by hand after an edit."""
    import pytest

    _, stale = _compiled()
    if stale:
        raise pytest.UsageError(
            f"{', '.join(stale)} changed since the mypyc build: run `make setup` to rebuild it "
            "(or `COMPILE=0 make setup` to test the pure-Python modules)"
        )


def pytest_report_header(config: object) -> str:
    """Which build the suite runs: CI runs it compiled and a part of it pure (.ci/run)."""
    compiled, _ = _compiled()
    if not compiled:
        return "l4lb: pure Python (no mypyc build)"
    return f"l4lb: compiled with mypyc: {', '.join(compiled)}"
