"""PROXY protocol support for Python servers behind a balancer: asyncio, socketserver, uvicorn.

Every integration takes the same :class:`~l4lb.trust.policy.ProxyPolicy` as the balancer's own
listeners (``mode``, ``trusted``, ``header_timeout``) and reads the header through its
:class:`~l4lb.trust.policy.HeaderGate`:

* :mod:`l4lb.backend.asyncio`: ``start_server(cb, host, port, policy=...)`` and
  ``ProxyProtocolFactory(protocol_factory, policy)`` for ``loop.create_server``;
* :mod:`l4lb.backend.socketserver`: ``ProxyProtocolMixin`` for ``StreamRequestHandler`` and
  ``BaseHTTPRequestHandler``;
* :mod:`l4lb.backend.uvicorn`: ``proxy_protocol_http(...)``, a protocol class for
  ``uvicorn.Config(app, http=...)``, and the ``l4lb serve-asgi`` command.
"""

from l4lb.trust.policy import Decision, Mode, ProxyPolicy, Reason

__all__ = ["Decision", "Mode", "ProxyPolicy", "Reason"]
