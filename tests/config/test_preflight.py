"""``l4lb check`` checks what ``l4lb run`` will need from this machine (config/preflight.py):
files it writes can be opened or created by this user, files it reads can be read and parse,
binds are addresses this host has, ports below 1024 have the capability.

The permission cases run the command as ``nobody`` (setpriv), as the tests run as root; each
error is also what ``l4lb run`` says when it refuses the same file as the same user.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from l4lb.config import ConfigError, ConfigIssue, load_config
from l4lb.config.issues import Severity

CONFIG = """\
[[listeners]]
name = "a"
bind = "{bind}"
pool = "p"
{listener}
[pools.p]
backends = [{{ address = "127.0.0.1:9" }}]
{tail}
"""


def config(bind: str = "127.0.0.1:18090", listener: str = "", tail: str = "") -> str:
    return CONFIG.format(bind=bind, listener=listener, tail=tail)


def as_nobody() -> list[str]:
    """The command prefix that runs as an unprivileged user (none when the tests already are)."""
    if os.geteuid() != 0:
        return []
    return ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--inh-caps=-all"]


def user() -> str:
    uid = 65534 if os.geteuid() == 0 else os.geteuid()
    return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"


def l4lb(*args: str, prefix: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*(prefix or []), sys.executable, "-m", "l4lb", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd="/",
    )


def errors(stderr: str) -> list[str]:
    return [ln.strip() for ln in stderr.splitlines() if ln.startswith("  ")]


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory the unprivileged user can enter and read (pytest's tmp_path is root's 0700)."""
    path = Path(tempfile.mkdtemp(prefix="check-preflight-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path)


def check_as_nobody(directory: Path, text: str) -> tuple[str, subprocess.CompletedProcess[str]]:
    file = directory / "l4lb.toml"
    file.write_text(text)
    file.chmod(0o644)
    return str(file), l4lb("check", str(file), prefix=as_nobody())


def refused_alike(file: str, checked: subprocess.CompletedProcess[str]) -> list[str]:
    """check refused the file; run, as the same user, refuses it with the same errors."""
    assert checked.returncode == 1, checked.stderr
    assert "Traceback" not in checked.stderr
    ran = l4lb("run", "--config", file, prefix=as_nobody())
    assert ran.returncode == 1, ran.stderr
    assert errors(ran.stderr) == errors(checked.stderr)
    return errors(checked.stderr)


# --- files written --------------------------------------------------------------------------------


def test_an_access_log_in_a_directory_this_user_may_not_write(shared_dir: Path) -> None:
    logs = shared_dir / "logs"
    logs.mkdir(mode=0o755)  # root's: nobody may not create files in it
    file, checked = check_as_nobody(shared_dir, config(tail=f'[log]\naccess = "{logs}/a.log"'))
    (error,) = refused_alike(file, checked)
    assert error == (
        f"log.access: cannot create {logs}/a.log: Permission denied: user {user()} may not "
        f"write in directory {logs} (line 9)"
    )
    assert not (logs / "a.log").exists()  # a check creates nothing


def test_an_access_log_file_this_user_may_not_write(shared_dir: Path) -> None:
    log = shared_dir / "a.log"
    log.write_text("kept\n")
    log.chmod(0o644)
    file, checked = check_as_nobody(shared_dir, config(tail=f'[log]\naccess = "{log}"'))
    (error,) = refused_alike(file, checked)
    assert f"log.access: cannot open {log}: Permission denied: user {user()} may not write it" in (
        error
    )
    assert "mode -rw-r--r--" in error and error.endswith("(line 9)")
    assert log.read_text() == "kept\n"  # neither truncated nor appended to


def test_a_writable_access_log_and_state_file_pass(shared_dir: Path) -> None:
    mine = shared_dir / "mine"
    mine.mkdir()
    os.chown(mine, 65534 if os.geteuid() == 0 else os.geteuid(), -1)
    text = f'state_file = "{mine}/state.json"\n' + config(tail=f'[log]\naccess = "{mine}/a.log"')
    _, checked = check_as_nobody(shared_dir, text)
    assert checked.returncode == 0, checked.stderr
    assert list(mine.iterdir()) == []


def test_a_state_file_in_a_directory_this_user_may_not_write(shared_dir: Path) -> None:
    # top-level keys go before the first table
    text = f'state_file = "{shared_dir}/state.json"\n' + config()
    file, checked = check_as_nobody(shared_dir, text)
    (error,) = refused_alike(file, checked)
    assert error == (
        f"state_file: cannot create {shared_dir}/state.json: Permission denied: user {user()} "
        f"may not write in directory {shared_dir} (line 1)"
    )


def test_a_log_directory_systemd_creates_is_a_warning_before_the_first_start(
    tmp_path: Path,
) -> None:
    """The unit's LogsDirectory= makes /var/log/NAME when it starts: checked by hand before,
    the directory is missing, and only a run by hand would fail; in a service (INVOCATION_ID set,
    as systemd sets it) it is the unit's fault, an error for check and run alike."""
    name = f"check-{uuid.uuid4().hex[:8]}"
    path = tmp_path / "l4lb.toml"
    path.write_text(config(tail=f'[log]\naccess = "/var/log/{name}/access.log"'))
    env = {k: v for k, v in os.environ.items() if k != "INVOCATION_ID"}
    by_hand = subprocess.run(
        [sys.executable, "-m", "l4lb", "check", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert by_hand.returncode == 0, by_hand.stderr
    assert (
        f"{path}: warning: log.access: cannot open /var/log/{name}/access.log: No such file or "
        f"directory: directory /var/log/{name} does not exist yet — systemd's "
        f"LogsDirectory={name} creates it when the unit starts (contrib/l4lb.service); "
        f"l4lb run outside systemd needs it: mkdir -p /var/log/{name} (line 9)"
    ) in by_hand.stderr
    service = {**env, "INVOCATION_ID": uuid.uuid4().hex}
    for command in ("check", "run"):
        done = subprocess.run(
            [sys.executable, "-m", "l4lb", command, "--config", str(path)],
            capture_output=True,
            text=True,
            timeout=60,
            env=service,
        )
        assert done.returncode == 1, (command, done.stderr)
        assert errors(done.stderr) == [
            f"log.access: cannot open /var/log/{name}/access.log: No such file or directory: "
            f"directory /var/log/{name} does not exist — add LogsDirectory={name} to the unit "
            "(contrib/l4lb.service has it) (line 9)"
        ], done.stderr
    assert not Path(f"/var/log/{name}").exists()


# --- files read -----------------------------------------------------------------------------------


def test_a_deny_file_this_user_may_not_read(shared_dir: Path) -> None:
    deny = shared_dir / "deny.txt"
    deny.write_text("203.0.113.0/24\n")
    deny.chmod(0o600)
    file, checked = check_as_nobody(shared_dir, config(listener=f'deny_file = "{deny}"'))
    (error,) = refused_alike(file, checked)
    assert error == (
        f"listeners[0].deny_file: cannot read {deny}: Permission denied for user {user()} (line 5)"
    )


def test_a_deny_file_reports_its_own_bad_line(tmp_path: Path) -> None:
    (tmp_path / "deny.txt").write_text("# blocked\n203.0.113.0/24\n203.0.113.0/33\n")
    path = tmp_path / "l4lb.toml"
    path.write_text(config(listener='deny_file = "deny.txt"'))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    (issue,) = info.value.issues
    assert issue.path == "listeners[0].deny_file" and issue.line == 5
    assert issue.message.startswith(f"{tmp_path / 'deny.txt'}:3: '203.0.113.0/33'")


def test_a_ca_file_that_is_not_pem(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text("not a certificate\n")
    tail = '[pools.p.health]\ncheck = "tls"\ntls_verify = true\ntls_ca_file = "ca.pem"'
    path = tmp_path / "l4lb.toml"
    path.write_text(config(tail=tail))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    (issue,) = info.value.issues
    assert issue.path == "pools.p.health.tls_ca_file" and issue.line == 11
    assert "expected a PEM file of CA certificates" in issue.message


# --- binds and ports ------------------------------------------------------------------------------


def test_a_port_below_1024_without_the_capability_is_a_warning(shared_dir: Path) -> None:
    _, checked = check_as_nobody(shared_dir, config(bind="127.0.0.1:443"))
    assert checked.returncode == 0, checked.stderr
    assert (
        f"warning: listeners[0].bind: port 443 is below 1024 "
        "(net.ipv4.ip_unprivileged_port_start): binding it needs CAP_NET_BIND_SERVICE, which "
        f"user {user()} does not have here; the unit in contrib/ grants it "
        "(AmbientCapabilities=CAP_NET_BIND_SERVICE) (line 3)"
    ) in checked.stderr


def test_a_port_below_1024_with_the_capability_is_fine(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs CAP_NET_BIND_SERVICE, which root has")  # the warning case runs anyway
    path = tmp_path / "l4lb.toml"
    path.write_text(config(bind="127.0.0.1:443"))
    notes: list[ConfigIssue] = []
    load_config(path, warnings=notes, check_files=True)
    assert notes == []


def test_a_bind_this_host_lacks_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "l4lb.toml"
    path.write_text(config(bind="[2001:db8::7]:8443"))
    with pytest.raises(ConfigError) as info:
        load_config(path, check_files=True)
    (issue,) = info.value.issues
    assert issue.path == "listeners[0].bind" and issue.line == 3
    assert issue.message.startswith("this host has no address 2001:db8::7: l4lb run cannot bind")
    assert "ip address add 2001:db8::7/128 dev lo" in issue.message
    assert "bind '[::]:8443'" in issue.message


@pytest.fixture
def netns() -> Iterator[str]:
    """A network namespace of our own (loopback up), always removed."""
    name = f"check-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def test_ip_nonlocal_bind_makes_it_a_note(tmp_path: Path, netns: str) -> None:
    """With net.ipv4.ip_nonlocal_bind = 1 run can bind an address not (yet) present: check says
    so and passes. Set in a namespace of the test's own, never on the host."""
    path = tmp_path / "l4lb.toml"
    path.write_text(config(bind="192.0.2.10:8443"))
    inside = ["ip", "netns", "exec", netns]
    refused = l4lb("check", str(path), prefix=inside)
    assert refused.returncode == 1 and "this host has no address 192.0.2.10" in refused.stderr
    sysctl = ["sysctl", "-q", "-w", "net.ipv4.ip_nonlocal_bind=1"]
    subprocess.run([*inside, *sysctl], check=True)
    done = l4lb("check", str(path), prefix=inside)
    assert done.returncode == 0, done.stderr
    assert (
        f"{path}: note: listeners[0].bind: this host has no address 192.0.2.10 now; "
        "net.ipv4.ip_nonlocal_bind = 1 lets l4lb run bind 192.0.2.10:8443 anyway"
    ) in done.stderr


def test_severities() -> None:
    assert [s.value for s in Severity] == ["error", "warning", "note"]


def test_a_state_file_run_would_ignore_is_a_warning(tmp_path: Path) -> None:
    (tmp_path / "state.json").write_text("{not json\n")
    path = tmp_path / "l4lb.toml"
    path.write_text('state_file = "state.json"\n' + config())
    notes: list[ConfigIssue] = []
    load_config(path, warnings=notes, check_files=True)
    (note,) = notes
    assert note.severity is Severity.WARNING and (note.path, note.line) == ("state_file", 1)
    assert note.message.startswith(f"{tmp_path / 'state.json'} cannot be restored (not JSON:")
    assert "l4lb run ignores it and starts every backend in rotation" in note.message
