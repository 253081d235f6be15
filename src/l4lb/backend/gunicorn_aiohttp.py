"""PROXY protocol for aiohttp apps under gunicorn: aiohttp's own gunicorn worker, our runner.

    L4LB_TRUSTED_PROXIES=10.0.0.0/8 gunicorn -w 4 \\
        -k l4lb.backend.gunicorn_aiohttp.ProxyWebWorker myapp:app

``myapp:app`` is a ``web.Application`` (or an async function returning one), as for
``aiohttp.GunicornWebWorker``. The worker hands aiohttp a
:class:`~l4lb.backend.aiohttp.ProxyProtocolAppRunner` built with gunicorn's settings (access log
and its format, keep-alive, graceful timeout), so every connection's header is decided before
aiohttp reads a byte and ``request.remote`` is the real client. The policy comes from the
environment (:mod:`l4lb.backend.environ`) or a subclass's ``proxy_policy``, checked once in the
arbiter. gunicorn's own TLS options are refused (TLS would start before the header).
"""

from __future__ import annotations

import inspect
from typing import Any, ClassVar

from aiohttp import web
from aiohttp.worker import GunicornWebWorker

from l4lb.backend.aiohttp import ProxyProtocolAppRunner
from l4lb.backend.gunicorn import check_gunicorn_config, worker_policy
from l4lb.trust.policy import ProxyPolicy

__all__ = ["ProxyWebWorker"]


class ProxyWebWorker(GunicornWebWorker):
    """``aiohttp.GunicornWebWorker`` whose runner reads a PROXY header on every connection."""

    proxy_policy: ClassVar[ProxyPolicy | None] = None

    @classmethod
    def check_config(cls, cfg: Any, log: Any) -> None:
        check_gunicorn_config(cls, cfg, log, allow_tls=False)

    def load_wsgi(self) -> None:
        super().load_wsgi()
        loaded: Any = self.wsgi  # type: ignore[has-type]
        policy = worker_policy(type(self))

        async def make_runner() -> web.AppRunner:
            if isinstance(loaded, web.Application):
                app = loaded
            elif inspect.iscoroutinefunction(loaded):
                app = await loaded()
            else:
                raise RuntimeError(
                    "wsgi app should be either Application or async function returning "
                    f"Application, got {loaded!r}"
                )
            return ProxyProtocolAppRunner(
                app,
                policy=policy,
                logger=self.log,
                keepalive_timeout=self.cfg.keepalive,
                access_log=self.log.access_log if self.cfg.accesslog else None,
                access_log_format=self._get_valid_log_format(self.cfg.access_log_format),
                shutdown_timeout=self.cfg.graceful_timeout / 100 * 95,
            )

        self.wsgi = make_runner
