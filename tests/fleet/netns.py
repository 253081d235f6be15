"""Network namespaces for the fleet test: create, run processes in, open sockets in, remove.

Every namespace is named ``l4f-<run>-<role>``; :class:`Namespaces` remembers what it created and
every process it started, and :meth:`Namespaces.close` kills them by PID (and whatever else still
runs inside the namespaces, found with ``ip netns pids``) and deletes the namespaces, whether the
test passed or failed.

Sockets: a thread that has entered a namespace (``setns``) creates its sockets there, and the
socket stays in that namespace when used from any other thread; :meth:`Namespace.socket` does that
on a per-namespace thread, so the test talks to the fleet without a helper process.
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

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def sh(*args: str, check: bool = True) -> str:
    done = subprocess.run(list(args), capture_output=True, text=True, timeout=30)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


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

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None


class Namespaces:
    """The namespaces and processes of one fleet; :meth:`close` removes all of them."""

    def __init__(self, run: str) -> None:
        self.run = run
        self.spaces: dict[str, Namespace] = {}
        self.procs: list[subprocess.Popen[bytes]] = []

    def add(self, role: str) -> Namespace:
        name = f"l4f-{self.run}-{role}"
        sh("ip", "netns", "add", name)
        ns = Namespace(name)
        self.spaces[role] = ns
        ns.ip("link", "set", "lo", "up")
        return ns

    def link(self, a: Namespace, a_name: str, b: Namespace, b_name: str) -> None:
        """A veth pair, one end in each namespace (never in the test's own namespace), both up."""
        sh("ip", "link", "add", a_name, "netns", a.name, "type", "veth",
           "peer", "name", b_name, "netns", b.name)  # fmt: skip
        a.ip("link", "set", "dev", a_name, "up")
        b.ip("link", "set", "dev", b_name, "up")

    def start(
        self, ns: Namespace, args: Sequence[str], log: Path, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
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
                pids = sh("ip", "netns", "pids", ns.name, check=False).split()
                if not pids:
                    break
                for pid in pids:
                    leftovers.append(f"{ns.name}:{pid}")
                    with contextlib.suppress(ProcessLookupError, ValueError):
                        os.kill(int(pid), signal.SIGKILL)
                time.sleep(0.05)
            sh("ip", "netns", "del", ns.name, check=False)
        self.spaces.clear()
        return leftovers
