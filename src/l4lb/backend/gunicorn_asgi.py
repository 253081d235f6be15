"""PROXY protocol for ASGI apps under gunicorn: uvicorn's gunicorn worker with our protocol class.

    L4LB_TRUSTED_PROXIES=10.0.0.0/8 gunicorn -w 4 \\
        -k l4lb.backend.gunicorn_asgi.ProxyUvicornWorker app:app

gunicorn forks the workers and supervises them (a worker that dies is replaced); each worker runs
uvicorn with :func:`~l4lb.backend.uvicorn.proxy_protocol_http` built from the policy, so
``scope["client"]`` is the real client for keep-alive requests and WebSockets alike. uvicorn's
``proxy_headers`` are turned off here. The policy comes from the environment
(:mod:`l4lb.backend.environ`) or a subclass's ``proxy_policy``, checked once in the arbiter.
gunicorn's own TLS options are refused: under this worker TLS would start before the header;
terminate TLS at the balancer.
"""

from __future__ import annotations

from typing import Any, ClassVar

from uvicorn_worker import UvicornWorker  # type: ignore[import-untyped]

from l4lb.backend.gunicorn import check_gunicorn_config, worker_policy
from l4lb.backend.uvicorn import proxy_protocol_http
from l4lb.trust.policy import ProxyPolicy

__all__ = ["ProxyUvicornWorker"]


class ProxyUvicornWorker(UvicornWorker):  # type: ignore[misc]
    """``uvicorn_worker.UvicornWorker`` reading a PROXY header on every connection."""

    proxy_policy: ClassVar[ProxyPolicy | None] = None
    http_implementation: ClassVar[str] = "auto"
    """uvicorn's HTTP protocol after the header: ``auto``, ``h11`` or ``httptools``."""

    @classmethod
    def check_config(cls, cfg: Any, log: Any) -> None:
        check_gunicorn_config(cls, cfg, log, allow_tls=False)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        policy = worker_policy(type(self))
        self.config.http = proxy_protocol_http(policy=policy, http=self.http_implementation)
        self.config.proxy_headers = False
