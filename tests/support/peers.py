"""Start and stop real HAProxy and nginx processes, and small socket utilities, for tests.

Every process is started by the test that needs it, on free loopback ports, with its config and
logs in the test's own temporary folder, and stopped by PID when the test ends.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

NGINX_STREAM_MODULE = "/usr/lib/nginx/modules/ngx_stream_module.so"


def _port_slice() -> range:
    """The ports this process hands out: outside the kernel's ephemeral range, one slice per
    pytest-xdist worker.

    ``bind(0)`` and every client ``connect()`` take their port from the ephemeral range
    (net.ipv4.ip_local_port_range), so a port chosen there and bound a moment later (by l4lb,
    HAProxy, nginx) can be taken in between by any socket of any test: a flaky "Address already
    in use". Below that range only free_port hands out ports, and each worker has its own slice.
    """
    try:
        text = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text()
        low, high = (int(x) for x in text.split())
    except (OSError, ValueError):
        low, high = 32768, 60999
    if low - 10000 >= 4000:
        start, stop = 10000, low
    elif 65536 - (high + 1) >= 4000:
        start, stop = high + 1, 65536
    else:
        return range(0)
    try:
        count = max(1, int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
        index = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")) % count
    except ValueError:
        count, index = 1, 0
    size = (stop - start) // count
    return range(start + index * size, start + (index + 1) * size)


_PORTS = _port_slice()
_next_port = [int.from_bytes(os.urandom(4), "big") % len(_PORTS)] if _PORTS else [0]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now, and that no ``bind(0)`` or outgoing
    connection will take before the caller binds it (see ``_port_slice``)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(len(_PORTS)):
        port = _PORTS[_next_port[0] % len(_PORTS)]
        _next_port[0] += 1
        with socket.socket(family, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_port(
    host: str, port: int, timeout: float = 10.0, proc: subprocess.Popen[bytes] | None = None
) -> None:
    """Wait until something accepts TCP connections on ``host:port``."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {host}:{port} opened")
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.settimeout(0.5)
            try:
                s.connect((host, port))
                return
            except OSError:
                time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout}s")


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0, interval: float = 0.05) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` passes; return its last value."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def connect_from(source_ip: str, host: str, port: int, timeout: float = 5.0) -> socket.socket:
    """A TCP connection to ``host:port`` whose source address is ``source_ip`` (e.g. 127.0.0.7)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.bind((source_ip, 0))
    s.connect((host, port))
    return s


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 5.0) -> None:
    """Stop a process we started, by its PID: SIGTERM, then SIGKILL."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)


def have(binary: str) -> bool:
    return shutil.which(binary) is not None or os.path.exists(f"/usr/sbin/{binary}")


@contextlib.contextmanager
def haproxy(
    workdir: Path, body: str, wait: Sequence[tuple[str, int]] = ()
) -> Iterator[subprocess.Popen[bytes]]:
    """Run a real HAProxy with ``body`` (frontends/backends/listens) in the foreground.

    The global and defaults sections are provided; ``wait`` lists (host, port) to wait for.
    Its log lines (``log stdout``) go to ``workdir/haproxy.log``.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    cfg = workdir / "haproxy.cfg"
    cfg.write_text(
        "global\n"
        "    log stdout format raw local0 info\n"
        "    nbthread 1\n"
        "defaults\n"
        "    mode tcp\n"
        "    log global\n"
        "    timeout connect 5s\n"
        "    timeout client 30s\n"
        "    timeout server 30s\n" + body
    )
    log = open(workdir / "haproxy.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        ["haproxy", "-db", "-f", str(cfg)], stdout=log, stderr=subprocess.STDOUT
    )
    try:
        for host, port in wait:
            wait_port(host, port, proc=proc)
        yield proc
    finally:
        stop_process(proc)
        log.close()


@contextlib.contextmanager
def nginx(
    workdir: Path, stream: str = "", http: str = "", wait: Sequence[tuple[str, int]] = ()
) -> Iterator[subprocess.Popen[bytes]]:
    """Run a real nginx in the foreground with the given ``stream {}`` and ``http {}`` bodies.

    Paths in the bodies may use ``{dir}`` for ``workdir``. Errors go to ``workdir/error.log``.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    conf = workdir / "nginx.conf"
    parts = []
    if stream and os.path.exists(NGINX_STREAM_MODULE):
        parts.append(f"load_module {NGINX_STREAM_MODULE};")
    parts += [
        "daemon off;",
        "master_process on;",
        "worker_processes 1;",
        "user root;",
        f"pid {workdir}/nginx.pid;",
        f"error_log {workdir}/error.log info;",
        "events { worker_connections 1024; }",
    ]
    if stream:
        parts.append("stream {\n" + stream.replace("{dir}", str(workdir)) + "\n}")
    if http:
        parts.append(
            "http {\n"
            f"  client_body_temp_path {workdir}/body; proxy_temp_path {workdir}/proxy;\n"
            f"  fastcgi_temp_path {workdir}/fcgi; uwsgi_temp_path {workdir}/uwsgi;\n"
            f"  scgi_temp_path {workdir}/scgi;\n"
            f"  access_log off;\n" + http.replace("{dir}", str(workdir)) + "\n}"
        )
    conf.write_text("\n".join(parts) + "\n")
    proc = subprocess.Popen(
        ["nginx", "-p", str(workdir), "-c", str(conf)],
        stdout=subprocess.DEVNULL,
        stderr=open(workdir / "stderr.log", "wb"),  # noqa: SIM115
    )
    try:
        for host, port in wait:
            wait_port(host, port, proc=proc)
        yield proc
    finally:
        stop_process(proc)
