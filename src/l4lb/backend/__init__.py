"""PROXY protocol support for Python servers behind a balancer: asyncio, socketserver, uvicorn,
gunicorn, hypercorn and aiohttp.

Every integration takes the same :class:`~l4lb.trust.policy.ProxyPolicy` as the balancer's own
listeners (``mode``, ``trusted``, ``header_timeout``) and reads the header through its
:class:`~l4lb.trust.policy.HeaderGate`:

* :mod:`l4lb.backend.asyncio`: ``start_server(cb, host, port, policy=...)`` and
  ``ProxyProtocolFactory(protocol_factory, policy)`` for ``loop.create_server``;
* :mod:`l4lb.backend.socketserver`: ``ProxyProtocolMixin`` for ``StreamRequestHandler`` and
  ``BaseHTTPRequestHandler``;
* :mod:`l4lb.backend.uvicorn`: ``proxy_protocol_http(...)``, a protocol class for
  ``uvicorn.Config(app, http=...)`` (picklable, for ``workers=N``), ``ProxyProtocolHTTP`` for
  ``uvicorn --http`` configured from the environment, and the ``l4lb serve-asgi`` command;
* :mod:`l4lb.backend.gunicorn` (``SyncProxyWorker``, ``ThreadProxyWorker``),
  :mod:`l4lb.backend.gunicorn_asgi` (``ProxyUvicornWorker``) and
  :mod:`l4lb.backend.gunicorn_aiohttp` (``ProxyWebWorker``): gunicorn worker classes;
* :mod:`l4lb.backend.hypercorn`: ``serve(app, config, policy=...)`` and a multi-process runner;
* :mod:`l4lb.backend.aiohttp`: ``ProxyProtocolAppRunner`` and ``run_app``.

Servers started by a command read the policy from the environment: :mod:`l4lb.backend.environ`.
"""

from l4lb.trust.policy import Decision, Mode, ProxyPolicy, Reason

__all__ = ["Decision", "Mode", "ProxyPolicy", "Reason"]
