"""Network namespaces for multi-host tests: create, wire, run processes in, open sockets in, remove.

Every namespace is named ``<prefix>-<run>-<role>``: a prefix per suite (``l4f`` the anycast fleet,
``l4t`` transparent mode) and a run id made of this process's PID and the time, so suites and
pytest-xdist workers running at once never share a name. :class:`Namespaces` remembers what it
created and every process it started; :meth:`Namespaces.close` (the fixtures' finalizers) kills
them by PID, and whatever else still runs inside (found with ``ip netns pids``), and deletes the
namespaces, whether the test passed or failed. Documentation addresses only inside them.

Sockets: a thread that has entered a namespace (``setns``) creates its sockets there, and the
socket stays in that namespace when used from any other thread; :meth:`Namespace.socket` does that
on a per-namespace thread, so a test talks to its hosts without a helper process.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

needs_root = pytest.mark.skipif(
    os.geteuid() != 0,
    reason="needs root: network namespaces, transparent sockets, nftables (CI runs as root)",
)

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def sh(*args: str, check: bool = True) -> str:
    done = subprocess.run(list(args), capture_output=True, text=True, timeout=30)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


def netns_names(prefix: str) -> list[str]:
    """The namespaces whose names start with ``prefix`` (``ip netns list``)."""
    return [n for n in sh("ip", "netns", "list", check=False).split() if n.startswith(prefix)]


class Namespace:
    """One network namespace."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None

    def ip(self, *args: str) -> str:
        return sh("ip", "-n", self.name, *args)

    def sysctl(self, key: str, value: str) -> None:
        sh("ip", "netns", "exec", self.name, "sysctl", "-q", "-w", f"{key}={value}")

    def exec_args(self, args: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *args]

    def pids(self) -> list[int]:
        """The processes running in this namespace."""
        return [int(p) for p in sh("ip", "netns", "pids", self.name, check=False).split()]

    def _enter(self) -> None:
        fd = os.open(f"/run/netns/{self.name}", os.O_RDONLY)
        try:
            if _libc.setns(fd, CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise OSError(err, os.strerror(err))
        finally:
            os.close(fd)

    def socket(self, family: int = socket.AF_INET) -> socket.socket:
        """A TCP socket that lives in this namespace."""
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(1, initializer=self._enter)
        return self._pool.submit(socket.socket, family, socket.SOCK_STREAM).result()

    def port_open(self, host: str, port: int) -> bool:
        """Whether something accepts TCP connections on ``host:port``, seen from here."""
        s = self.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        s.settimeout(1)
        try:
            s.connect((host, port))
            return True
        except OSError:
            return False
        finally:
            s.close()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None


class Namespaces:
    """The namespaces and processes of one test topology; :meth:`close` removes all of them.

    ``nodad``: IPv6 duplicate address detection off in every namespace (and on every address
    :meth:`addr` adds), so an address is usable at once instead of after a second or two.
    """

    def __init__(self, prefix: str, nodad: bool = False) -> None:
        self.run = f"{os.getpid() % 10000:04d}{int(time.time() * 10) % 10000:04d}"
        self.prefix = f"{prefix}-{self.run}-"
        self.nodad = nodad
        self.spaces: dict[str, Namespace] = {}
        self.procs: list[subprocess.Popen[bytes]] = []

    def add(self, role: str) -> Namespace:
        name = self.prefix + role
        sh("ip", "netns", "add", name)
        ns = Namespace(name)
        self.spaces[role] = ns
        ns.ip("link", "set", "lo", "up")
        if self.nodad:
            ns.sysctl("net.ipv6.conf.all.accept_dad", "0")
            ns.sysctl("net.ipv6.conf.default.accept_dad", "0")
        return ns

    def link(self, a: Namespace, a_name: str, b: Namespace, b_name: str) -> None:
        """A veth pair, one end in each namespace (never in the test's own namespace), both up."""
        sh("ip", "link", "add", a_name, "netns", a.name, "type", "veth",
           "peer", "name", b_name, "netns", b.name)  # fmt: skip
        a.ip("link", "set", "dev", a_name, "up")
        b.ip("link", "set", "dev", b_name, "up")

    def addr(self, ns: Namespace, dev: str, *cidrs: str) -> None:
        for cidr in cidrs:
            extra = ["nodad"] if self.nodad and ":" in cidr else []
            ns.ip("addr", "add", cidr, "dev", dev, *extra)

    def start(
        self, ns: Namespace, args: Sequence[str], log: Path, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        """Start ``args`` in ``ns`` (its own session), stdout and stderr appended to ``log``."""
        out = open(log, "ab")  # noqa: SIM115 - the child keeps it
        try:
            proc = subprocess.Popen(
                ns.exec_args(args), stdout=out, stderr=subprocess.STDOUT, env=env,
                start_new_session=True,
            )  # fmt: skip
        finally:
            out.close()
        self.procs.append(proc)
        return proc

    def close(self) -> list[str]:
        """Kill every process started (and any left in the namespaces), delete the namespaces.

        Returns what had to be killed after its own stop (for the test to report).
        """
        leftovers: list[str] = []
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(5)
        for ns in self.spaces.values():
            ns.close()
            for _ in range(50):
                pids = ns.pids()
                if not pids:
                    break
                for pid in pids:
                    leftovers.append(f"{ns.name}:{pid}")
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                time.sleep(0.05)
            sh("ip", "netns", "del", ns.name, check=False)
        self.spaces.clear()
        return leftovers

    def left_behind(self) -> list[str]:
        """This run's namespaces that still exist (none after :meth:`close`)."""
        return netns_names(self.prefix)


NGINX_CONF = """\
daemon off;
master_process off;
worker_processes 1;
error_log {dir}/nginx-error.log warn;
pid {dir}/nginx.pid;
events {{ worker_connections {worker_connections}; }}
http {{
    access_log off;
    client_body_temp_path {dir}/tmp;
    proxy_temp_path {dir}/tmp;
    fastcgi_temp_path {dir}/tmp;
    uwsgi_temp_path {dir}/tmp;
    scgi_temp_path {dir}/tmp;
{http}
}}
"""


def write_nginx_conf(workdir: Path, http: str, worker_connections: int = 1024) -> Path:
    """An nginx config for a namespace (one process, in the foreground, everything under
    ``workdir``) around the ``http {}`` body given; its path. Start it with
    ``nginx -p WORKDIR -c PATH``."""
    (workdir / "tmp").mkdir(parents=True, exist_ok=True)
    conf = workdir / "nginx.conf"
    conf.write_text(
        NGINX_CONF.format(dir=workdir, http=http, worker_connections=worker_connections)
    )
    return conf


__all__ = [
    "Namespace",
    "Namespaces",
    "needs_root",
    "netns_names",
    "sh",
    "write_nginx_conf",
]
