"""The README's service example works with ``contrib/l4lb.service`` as shipped.

The example (marked in the README and docs/install.md, the same block in both) is checked
against the unit: every path it writes is in a directory the unit creates for the service
(``LogsDirectory=``, ``StateDirectory=``, ``RuntimeDirectory=``: ``ProtectSystem=strict`` allows
nothing else), and ``systemd-analyze verify`` is clean on the unit with the binary where
docs/install.md puts it. Then the unit's own command lines (``ExecStartPre``, ``ExecStart``,
``ExecReload``) run on the example, its paths rebased into a tmp root that mirrors the unit's
directories (owned by the service user, as systemd makes them) and its addresses made local,
as an unprivileged user with only the unit's ``AmbientCapabilities`` (``setpriv``, as
``DynamicUser=`` runs it: PID 1 here is not systemd): it binds a port below 1024, serves a
connection, reloads (a refused reload fails), and stops cleanly on ``KillSignal``.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import tomllib
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.echo_backend import EchoBackend, echo_through
from tests.support.peers import free_port, stop_process, wait_for

REPO = Path(__file__).parents[2]
UNIT = REPO / "contrib" / "l4lb.service"
MARK = "<!-- the service example: /etc/l4lb/l4lb.toml"
INSTALLED = "/opt/l4lb/bin/l4lb"  # docs/install.md
DIRECTORIES = {  # systemd.exec(5): where each directory setting puts the service's directory
    "RuntimeDirectory": "/run",
    "StateDirectory": "/var/lib",
    "LogsDirectory": "/var/log",
}
WRITTEN = ("log.access", "state_file")
"""Config keys naming files the balancer writes."""


def example(doc: Path) -> str:
    """The TOML block right after the service-example mark in ``doc``."""
    text = doc.read_text()
    assert MARK in text, f"{doc}: no service example mark"
    block = re.search(r"```toml\n(.*?)```", text[text.index(MARK) :], re.S)
    assert block is not None, f"{doc}: no TOML block after the mark"
    return block.group(1)


def unit_settings(path: Path = UNIT) -> dict[str, list[str]]:
    """``Key=value`` lines of a unit file, every value of each key in order."""
    out: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def writable_dirs(unit: dict[str, list[str]]) -> list[str]:
    """The directories the unit creates for the service (and lets it write)."""
    return [
        f"{base}/{name}"
        for key, base in DIRECTORIES.items()
        for value in unit.get(key, ())
        for name in value.split()
    ]


def _get(doc: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(doc, dict) or part not in doc:
            return None
        doc = doc[part]
    return doc


def test_the_readme_and_install_doc_show_the_same_example() -> None:
    assert example(REPO / "README.md") == example(REPO / "docs" / "install.md")


def test_every_path_the_example_writes_is_a_directory_the_unit_creates() -> None:
    unit = unit_settings()
    dirs = writable_dirs(unit)
    assert sorted(dirs) == ["/run/l4lb", "/var/lib/l4lb", "/var/log/l4lb"], dirs
    assert unit["ProtectSystem"] == ["strict"] and unit["DynamicUser"] == ["yes"]
    config = tomllib.loads(example(REPO / "README.md"))
    for key in WRITTEN:
        path = _get(config, key)
        if path is None or path in ("stdout", "off"):
            continue
        assert path.startswith("/"), f"{key} = {path!r}: relative to /etc/l4lb, not writable"
        assert any(path.startswith(d + "/") for d in dirs), (key, path, dirs)
    # reload-status.json: the unit's RuntimeDirectory, which systemd passes on
    assert "RuntimeDirectory" in unit


def _system_units_root(root: Path) -> None:
    """systemd's own units under ``root`` (the unit's After=/Wants=/WantedBy= name them)."""
    shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_systemd_analyze_verify_is_clean_with_the_installed_binary(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc/systemd/system").mkdir(parents=True)
    shutil.copy(UNIT, root / "etc/systemd/system/l4lb.service")
    _system_units_root(root)

    def verify() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["systemd-analyze", "verify", f"--root={root}", "/etc/systemd/system/l4lb.service"],
            capture_output=True,
            text=True,
            timeout=60,
        )

    missing = verify()  # the check is real: without the install it complains
    assert missing.returncode != 0 and f"{INSTALLED} is not executable" in missing.stderr
    binary = root / INSTALLED.lstrip("/")
    binary.parent.mkdir(parents=True)
    binary.write_text(f'#!/bin/sh\nexec {sys.executable} -m l4lb "$@"\n')
    binary.chmod(0o755)
    done = verify()
    assert done.returncode == 0 and not done.stderr.strip() and not done.stdout.strip(), done


# -- the example, run as the unit runs it ------------------------------------------------------


def _privileged_port() -> int:
    """A free port below 1024 on 127.0.0.1 (the example binds 443: the capability is needed)."""
    for port in range(1023, 600, -1):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port below 1024")


@pytest.fixture
def service_root() -> Iterator[Path]:
    """A root the service user can reach (pytest's own tmp is 0700, root's)."""
    root = Path(tempfile.mkdtemp(prefix="service-unit-"))
    root.chmod(0o755)
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


class Service:
    """The example run by the unit's command lines, rebased into ``root``."""

    def __init__(self, root: Path, uid: int) -> None:
        self.root = root
        self.uid = uid
        self.unit = unit_settings()
        env = dict(
            line.split("=", 1) for value in self.unit["Environment"] for line in shlex.split(value)
        )
        self.config = root / env["L4LB_CONFIG"].lstrip("/")
        self.env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "L4LB_CONFIG": str(self.config),
            "RUNTIME_DIRECTORY": str(self.dir("/run/l4lb")),  # what systemd sets
            "STATE_DIRECTORY": str(self.dir("/var/lib/l4lb")),
            "LOGS_DIRECTORY": str(self.dir("/var/log/l4lb")),
        }
        caps = [c.lower().removeprefix("cap_") for c in self.unit["AmbientCapabilities"]]
        self.setpriv = [
            "setpriv",
            f"--reuid={uid}",
            f"--regid={uid}",
            "--clear-groups",
            "--inh-caps=-all," + ",".join(f"+{c}" for c in caps),
            "--ambient-caps=-all," + ",".join(f"+{c}" for c in caps),
            "--bounding-set=-all," + ",".join(f"+{c}" for c in caps),
            "--no-new-privs",
        ]
        self.proc: subprocess.Popen[bytes] | None = None

    def dir(self, path: str) -> Path:
        return self.root / path.lstrip("/")

    def make_dirs(self) -> None:
        """/etc/l4lb (ConfigurationDirectory=, root's) and the service's own directories."""
        self.config.parent.mkdir(parents=True)
        for d in writable_dirs(self.unit):
            self.dir(d).mkdir(parents=True)
            os.chown(self.dir(d), self.uid, self.uid)
        for parent in {p for d in writable_dirs(self.unit) for p in self.dir(d).parents}:
            if self.root in parent.parents or parent == self.root:
                parent.chmod(0o755)

    def command(self, key: str, **values: str) -> list[str]:
        """The unit's ``key=`` command line, with its variables and the installed binary."""
        (line,) = self.unit[key]
        words = []
        for word in shlex.split(line.lstrip("-@:+!")):
            word = word.replace("${L4LB_CONFIG}", str(self.config))
            for name, value in values.items():
                word = word.replace(f"${name}", value)
            words.append(word)
        assert words[0] == INSTALLED, (key, words)
        return [*self.setpriv, sys.executable, "-m", "l4lb", *words[1:]]

    def run(self, key: str, **values: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.command(key, **values),
            env=self.env,
            cwd="/",
            capture_output=True,
            text=True,
            timeout=120,
        )

    def start(self) -> subprocess.Popen[bytes]:
        self.err = self.root / "journal.log"
        self.proc = subprocess.Popen(
            self.command("ExecStart"),
            env=self.env,
            cwd="/",
            stdout=subprocess.DEVNULL,
            stderr=open(self.err, "wb"),  # noqa: SIM115
        )
        return self.proc

    def journal(self) -> str:
        return self.err.read_text(errors="replace")


def test_the_example_runs_under_the_units_rules(service_root: Path) -> None:
    if shutil.which("setpriv") is None:
        pytest.fail("setpriv (util-linux) is needed to run as the service user")
    uid = 61184 + os.getpid() % 4000  # DynamicUser='s range, unused here
    service = Service(service_root, uid)
    service.make_dirs()
    text = example(REPO / "README.md")
    config = tomllib.loads(text)
    port, admin, monitor = _privileged_port(), free_port(), free_port()
    with EchoBackend("one") as one, EchoBackend("two") as two:
        local = {  # the example's addresses, made local; its paths, rebased
            config["listeners"][0]["bind"]: f"127.0.0.1:{port}",
            config["admin"]["bind"]: f"127.0.0.1:{admin}",
            config["listeners"][0]["monitor"]: f"127.0.0.1:{monitor}",
            config["pools"]["web"]["backends"][0]["address"]: one.address,
            config["pools"]["web"]["backends"][1]["address"]: two.address,
        }
        for key in WRITTEN:
            path = _get(config, key)
            local[path] = str(service.dir(path))
        for old, new in local.items():
            assert text.count(f'"{old}"') == 1, old
            text = text.replace(f'"{old}"', f'"{new}"')
        service.config.write_text(text)

        checked = service.run("ExecStartPre")
        assert checked.returncode == 0, (checked.stdout, checked.stderr)
        proc = service.start()
        try:
            assert wait_for(lambda: "event=workers_started" in service.journal(), 30), (
                service.journal()
            )
            assert proc.poll() is None
            name, echoed = echo_through("127.0.0.1", port, b"through the unit\n")
            assert name in ("one", "two") and echoed == b"through the unit\n"
            status = lambda: _http_status(f"http://127.0.0.1:{monitor}/")  # noqa: E731
            assert wait_for(lambda: status() == 200, 20)
            # ExecReload: applied ...
            mainpid = str(proc.pid)
            service.config.write_text(
                text.replace('drain_timeout = "30s"', 'drain_timeout = "20s"')
            )
            applied = service.run("ExecReload", MAINPID=mainpid)
            assert applied.returncode == 0, (applied.stdout, applied.stderr, service.journal())
            assert f"event=reloaded pid={mainpid}" in applied.stdout
            # ... and refused (a new listener's port is taken): `systemctl reload` fails
            with socket.socket() as taken:
                taken.bind(("127.0.0.1", 0))
                taken.listen()
                busy = taken.getsockname()[1]
                service.config.write_text(
                    text + f'\n[[listeners]]\nname = "more"\nbind = "127.0.0.1:{busy}"\n'
                    'pool = "web"\n'
                )
                refused = service.run("ExecReload", MAINPID=mainpid)
            assert refused.returncode == 1, (refused.stdout, refused.stderr, service.journal())
            assert "event=reload_rejected" in refused.stderr
            name, _ = echo_through("127.0.0.1", port, b"still serving\n")
            assert name in ("one", "two")
            # the files it wrote, each in the unit's directories, owned by the service user
            access = service.dir(config["log"]["access"])
            assert wait_for(lambda: access.exists() and access.stat().st_size > 0, 10)
            assert access.stat().st_uid == uid
            assert (service.dir("/run/l4lb") / "reload-status.json").stat().st_uid == uid
            # the admin API (token) drains a backend: state_file keeps it, in StateDirectory=
            token = config["admin"]["token"]
            drain = urllib.request.Request(
                f"http://127.0.0.1:{admin}/pools/web/backends/{one.address}/drain",
                data=b"",
                method="POST",
                headers={"Authorization": f"Bearer {token}"},
            )
            with urllib.request.urlopen(drain, timeout=10) as resp:
                assert resp.status == 200
            state = service.dir(config["state_file"])
            assert wait_for(lambda: state.exists(), 10), service.journal()
            assert state.stat().st_uid == uid
            # KillSignal: a clean stop
            proc.send_signal(signal.Signals[service.unit["KillSignal"][0]])
            assert proc.wait(int(service.unit["TimeoutStopSec"][0])) == 0, service.journal()
            assert '"drain"' in state.read_text()
            assert "Traceback" not in service.journal(), service.journal()
        finally:
            stop_process(proc)


def _http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as err:
        return err.code
    except OSError:
        return 0


def test_without_the_capability_the_example_cannot_bind(service_root: Path) -> None:
    """The unit's AmbientCapabilities= is what lets the service user bind 443."""
    uid = 61184 + (os.getpid() + 1) % 4000
    service = Service(service_root, uid)
    service.make_dirs()
    service.setpriv = [
        w for w in service.setpriv if not w.startswith(("--inh-caps", "--ambient-caps"))
    ]
    text = example(REPO / "README.md")
    config = tomllib.loads(text)
    port = _privileged_port()
    text = text.replace(f'"{config["listeners"][0]["bind"]}"', f'"127.0.0.1:{port}"')
    for key in WRITTEN:
        path = _get(config, key)
        text = text.replace(f'"{path}"', f'"{service.dir(path)}"')
    text = text.replace(f'"{config["admin"]["bind"]}"', f'"127.0.0.1:{free_port()}"')
    text = text.replace(f'"{config["listeners"][0]["monitor"]}"', f'"127.0.0.1:{free_port()}"')
    service.config.write_text(text)
    proc = service.start()
    try:
        assert proc.wait(30) != 0
        assert "Permission denied" in service.journal(), service.journal()
        assert "Traceback" not in service.journal()
    finally:
        stop_process(proc)
