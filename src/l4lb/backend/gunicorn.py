"""PROXY protocol for gunicorn's WSGI workers: ``sync`` and ``gthread`` worker classes.

    L4LB_TRUSTED_PROXIES=10.0.0.0/8 gunicorn -w 4 -k l4lb.backend.gunicorn.SyncProxyWorker app:app
    L4LB_TRUSTED_PROXIES=10.0.0.0/8 gunicorn -w 4 --threads 8 \\
        -k l4lb.backend.gunicorn.ThreadProxyWorker app:app

The policy comes from the environment (:mod:`l4lb.backend.environ`; gunicorn's ``--env`` and
``raw_env`` work too) or from a subclass's ``proxy_policy``. The arbiter checks it once at start,
so a bad value stops gunicorn with one clear line before any worker is forked.

Each accepted connection's header is read with the socketserver integration's
:func:`~l4lb.backend.socketserver.read_header` (peek, decide, consume exactly the header), before
gunicorn's parser sees a byte: ``REMOTE_ADDR``/``REMOTE_PORT`` are the real client for every
request on a keep-alive connection, a rejected connection is closed and logged on gunicorn's error
log, and gunicorn's own TLS (``--certfile``) still works, as the handshake starts right after the
header. Leave gunicorn's own ``--proxy-protocol`` off: it would look for a second header.

The class names do not end in ``SyncWorker`` on purpose: gunicorn swaps any worker class so named
for its plain ``gthread`` worker when ``--threads`` is above 1, which would drop the PROXY reading
(and its trust check) without a word.

The ASGI worker (uvicorn under gunicorn) is in :mod:`l4lb.backend.gunicorn_asgi`.
"""

from __future__ import annotations

import contextlib
import socket
from typing import Any, ClassVar

from gunicorn import util  # type: ignore[import-untyped]
from gunicorn.workers.gthread import ThreadWorker  # type: ignore[import-untyped]
from gunicorn.workers.sync import SyncWorker  # type: ignore[import-untyped]

from l4lb.backend.environ import policy_from_env
from l4lb.backend.socketserver import read_header
from l4lb.trust.policy import Decision, PolicyError, ProxyPolicy

__all__ = ["SyncProxyWorker", "ThreadProxyWorker", "check_gunicorn_config", "worker_policy"]


def worker_policy(cls: type) -> ProxyPolicy:
    """The class's ``proxy_policy`` if set, else the environment's; RuntimeError (gunicorn's way
    to stop with ``Error: ...`` and no traceback) when the environment's is not valid."""
    policy = getattr(cls, "proxy_policy", None)
    if isinstance(policy, ProxyPolicy):
        return policy
    try:
        return policy_from_env()
    except PolicyError as err:
        raise RuntimeError(f"{cls.__module__}.{cls.__name__}: {err}") from None


def check_gunicorn_config(cls: type, cfg: Any, log: Any, *, allow_tls: bool = True) -> ProxyPolicy:
    """Checks run once in the arbiter: a valid policy, and gunicorn's own PROXY parsing off;
    with ``allow_tls=False`` (the async workers), gunicorn's own TLS off too."""
    policy = worker_policy(cls)
    if getattr(cfg, "proxy_protocol", "off") not in ("off", False, None):
        raise RuntimeError(
            f"{cls.__module__}.{cls.__name__} reads the PROXY header itself: turn gunicorn's "
            "--proxy-protocol off (it would look for a second header)"
        )
    log.info("PROXY protocol: %s", _describe(policy))
    if not allow_tls and cfg.is_ssl:
        raise RuntimeError(
            f"{cls.__module__}.{cls.__name__}: gunicorn's TLS would start before the PROXY "
            "header; terminate TLS at the balancer (remove --certfile/--keyfile)"
        )
    return policy


def _describe(policy: ProxyPolicy) -> str:
    trusted = ", ".join(str(n) for n in policy.networks) or "nobody"
    return f"mode {policy.mode}, trusted {trusted}, header timeout {policy.header_timeout:g}s"


_REFUSED = object()


def _decide(worker: Any, sock: Any, addr: Any) -> Decision | None:
    """The header decision for one connection, or None (logged) when it is refused."""
    try:
        decision = read_header(sock, worker.proxy_policy_in_use, addr)
    except OSError as err:
        worker.log.warning("PROXY header from %s: %s; closing", addr, err)
        return None
    if not decision.accepted:
        worker.log.warning("PROXY %s", decision.describe())
        return None
    return decision


class SyncProxyWorker(SyncWorker):  # type: ignore[misc]
    """gunicorn's ``sync`` worker, reading a PROXY header before each connection's requests."""

    proxy_policy: ClassVar[ProxyPolicy | None] = None

    @classmethod
    def check_config(cls, cfg: Any, log: Any) -> None:
        check_gunicorn_config(cls, cfg, log)

    def init_process(self) -> None:
        self.proxy_policy_in_use = worker_policy(type(self))
        super().init_process()

    def handle(self, listener: Any, client: Any, addr: Any) -> None:
        decision = _decide(self, client, addr)
        if decision is None:
            util.close(client)
            return
        super().handle(listener, client, decision.client)


class ThreadProxyWorker(ThreadWorker):  # type: ignore[misc]
    """gunicorn's ``gthread`` worker: the header is read in the pool thread that first serves
    the connection (never in the accepting loop, so a silent peer blocks one thread at most
    ``header_timeout``), and the connection keeps the real client for its keep-alive requests."""

    proxy_policy: ClassVar[ProxyPolicy | None] = None

    @classmethod
    def check_config(cls, cfg: Any, log: Any) -> None:
        super().check_config(cfg, log)
        check_gunicorn_config(cls, cfg, log)

    def init_process(self) -> None:
        self.proxy_policy_in_use = worker_policy(type(self))
        super().init_process()

    def handle(self, conn: Any) -> Any:
        # Once per connection, keyed on our own mark: gunicorn 22 initialises a connection (and
        # its parser) before this runs, gunicorn 27 after; neither has read a byte yet.
        if getattr(conn, "proxy_decision", None) is None:
            conn.sock.setblocking(True)
            decision = _decide(self, conn.sock, conn.client)
            conn.proxy_decision = decision or _REFUSED
            if decision is not None:
                conn.client = decision.client
            else:
                # Refused: end the stream, so that gunicorn's own handle() meets the end of the
                # connection and closes it its way (its return value differs across versions).
                with contextlib.suppress(OSError):
                    conn.sock.shutdown(socket.SHUT_RDWR)
        return super().handle(conn)
