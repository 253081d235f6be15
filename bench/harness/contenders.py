"""The shared backend (real nginx) and the contenders in front of it.

One nginx serves every contender: a ``proxy_protocol`` listener (what the balancers talk to) and a
plain one (what "direct" talks to), both answering ``/tiny`` with 3 bytes and ``/big.bin`` with the
large file. Each balancer gets one CPU's worth of work: HAProxy ``nbthread 1``, nginx stream
``worker_processes 1``, l4lb ``workers = 1``, all pinned to the balancer core.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from harness import procs

HERE = Path(__file__).resolve().parent
NGINX_STREAM_MODULE = "/usr/lib/nginx/modules/ngx_stream_module.so"
IDLE = "300s"  # every idle timeout on the path, so held connections stay up while measured
MAX_CONNS = 9500  # per contender; each proxied connection takes two descriptors of 20,000


def _nginx_bin() -> str:
    return shutil.which("nginx") or "/usr/sbin/nginx"


def _haproxy_bin() -> str:
    return shutil.which("haproxy") or "/usr/sbin/haproxy"


def _nginx_conf(workdir: Path, body: str, worker_connections: int) -> Path:
    conf = workdir / "nginx.conf"
    conf.write_text(
        "\n".join(
            [
                f"load_module {NGINX_STREAM_MODULE};" if "stream {" in body else "",
                "daemon off;",
                "master_process on;",
                "worker_processes 1;",
                "worker_rlimit_nofile 20000;",
                "user root;",
                f"pid {workdir}/nginx.pid;",
                f"error_log {workdir}/error.log warn;",
                f"events {{ worker_connections {worker_connections}; multi_accept on; }}",
                body,
            ]
        )
        + "\n"
    )
    return conf


@dataclass
class Backend:
    """The nginx every contender forwards to (pinned with the load generator)."""

    workdir: Path
    data_dir: Path
    core: int | None
    proxy_port: int = field(default_factory=procs.free_port)
    plain_port: int = field(default_factory=procs.free_port)
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        w = self.workdir
        body = f"""http {{
  client_body_temp_path {w}/body; proxy_temp_path {w}/proxy; fastcgi_temp_path {w}/fcgi;
  uwsgi_temp_path {w}/uwsgi; scgi_temp_path {w}/scgi;
  access_log off; sendfile on; tcp_nopush on;
  keepalive_timeout {IDLE}; keepalive_requests 100000000; client_header_timeout {IDLE};
  server {{
    listen 127.0.0.1:{self.proxy_port} proxy_protocol backlog=4096;
    listen 127.0.0.1:{self.plain_port} backlog=4096;
    root {self.data_dir};
    location = /tiny {{ default_type text/plain; return 200 "ok\\n"; }}
    location = /big.bin {{ }}
  }}
}}"""
        conf = _nginx_conf(w, body, 20000)
        self.proc = procs.start(
            [_nginx_bin(), "-p", str(w), "-c", str(conf)], self.core, w / "stdout.log"
        )
        procs.wait_port(self.proxy_port, self.proc)
        procs.wait_port(self.plain_port, self.proc)

    def stop(self) -> None:
        if self.proc is not None:
            procs.stop(self.proc)


@dataclass
class Contender:
    """One thing measured: a balancer process (or none, for direct) listening on ``port``."""

    name: str
    workdir: Path
    backend: Backend
    core: int | None
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    error: str | None = None

    def argv(self) -> list[str] | None:
        """The command that runs this balancer in the foreground; None for direct."""
        raise NotImplementedError

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        argv = self.argv()
        if argv is None:
            self.port = self.backend.plain_port
            return
        self.proc = procs.start(argv, self.core, self.workdir / "stdout.log", self.env())
        try:
            procs.wait_port(self.port, self.proc)
        except (RuntimeError, TimeoutError) as err:
            log = (self.workdir / "stdout.log").read_text(errors="replace")[-600:]
            self.stop()
            self.error = f"{err}: {log.strip()}"

    def env(self) -> dict[str, str] | None:
        """The balancer's environment (None: the bench's own)."""
        return None

    def stop(self) -> None:
        if self.proc is not None:
            procs.stop(self.proc)
            self.proc = None

    def pids(self) -> list[int]:
        """The balancer's processes now (master and workers); empty for direct."""
        if self.proc is None or self.proc.poll() is not None:
            return []
        return procs.tree(self.proc.pid)


class Direct(Contender):
    def argv(self) -> list[str] | None:
        return None


@dataclass
class HAProxy(Contender):
    splice: bool = False
    """``option splice-auto`` (off by default in HAProxy): the fair match for l4lb's splice."""

    def argv(self) -> list[str] | None:
        self.port = procs.free_port()
        cfg = self.workdir / "haproxy.cfg"
        cfg.write_text(
            f"""global
    nbthread 1
    maxconn {MAX_CONNS}
    maxpipes 200
defaults
    mode tcp
    timeout connect 5s
    timeout client {IDLE}
    timeout server {IDLE}
{"    option splice-auto" if self.splice else ""}
listen bench
    bind 127.0.0.1:{self.port}
    server b 127.0.0.1:{self.backend.proxy_port} send-proxy-v2
"""
        )
        return [_haproxy_bin(), "-db", "-f", str(cfg)]


class NginxStream(Contender):
    def argv(self) -> list[str] | None:
        self.port = procs.free_port()
        body = f"""stream {{
  server {{
    listen 127.0.0.1:{self.port} backlog=4096;
    proxy_pass 127.0.0.1:{self.backend.proxy_port};
    proxy_protocol on;
    proxy_timeout {IDLE};
  }}
}}"""
        conf = _nginx_conf(self.workdir, body, 2 * MAX_CONNS + 100)
        return [_nginx_bin(), "-p", str(self.workdir), "-c", str(conf)]


@dataclass
class L4lb(Contender):
    relay: str = "stream"
    gc_out: Path | None = None
    """Run under ``gcprobe.py``, which writes the collector's pauses here at exit."""

    def argv(self) -> list[str] | None:
        self.port = procs.free_port()
        cfg = self.workdir / "l4lb.toml"
        cfg.write_text(
            f"""workers = 1
relay = "{self.relay}"

[[listeners]]
name = "bench"
bind = "127.0.0.1:{self.port}"
pool = "bench"

[pools.bench]
balance = "roundrobin"
send_proxy = "v2"
connect_timeout = "5s"
idle_timeout = "{IDLE}"
backends = [{{ address = "127.0.0.1:{self.backend.proxy_port}" }}]

[log]
access = "off"
"""
        )
        if self.gc_out is not None:
            return [sys.executable, str(HERE / "gcprobe.py"), "run", "--config", str(cfg)]
        exe = Path(sys.executable).parent / "l4lb"
        return [str(exe), "run", "--config", str(cfg)]

    def env(self) -> dict[str, str] | None:
        if self.gc_out is None:
            return None
        return {**os.environ, "L4LB_BENCH_GC_OUT": str(self.gc_out)}


def make(name: str, workdir: Path, backend: Backend, core: int | None) -> Contender:
    """A contender by its name in the table."""
    d = workdir / name
    if name == "direct":
        return Direct(name, d, backend, core)
    if name in ("haproxy", "haproxy-splice"):
        return HAProxy(name, d, backend, core, splice=name == "haproxy-splice")
    if name == "nginx":
        return NginxStream(name, d, backend, core)
    if name.startswith("l4lb-"):
        return L4lb(name, d, backend, core, relay=name.removeprefix("l4lb-"))
    raise ValueError(
        f"unknown contender {name!r} (direct, haproxy, nginx, l4lb-stream, l4lb-splice, "
        "l4lb-kernel)"
    )


def make_big_file(path: Path, size: int) -> None:
    """Write ``size`` bytes of incompressible data once (not sparse: every page is real)."""
    if path.exists() and path.stat().st_size == size:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    block = os.urandom(1 << 20)
    t = time.monotonic()
    with open(tmp, "wb") as f:
        left = size
        while left > 0:
            n = min(left, len(block))
            f.write(block[:n])
            left -= n
    tmp.replace(path)
    print(f"  generated {path} ({size >> 20} MiB) in {time.monotonic() - t:.1f}s", flush=True)
