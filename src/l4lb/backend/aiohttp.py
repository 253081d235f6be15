"""PROXY protocol for aiohttp: an ``AppRunner`` whose every site reads the header first.

    runner = ProxyProtocolAppRunner(app, policy=ProxyPolicy(trusted=["10.0.0.0/8"]))
    await runner.setup()
    await web.TCPSite(runner, "0.0.0.0", 8080).start()      # or SockSite, UnixSite

or ``run_app(app, host=..., port=..., policy=...)`` in place of ``web.run_app``; or under gunicorn
with :class:`l4lb.backend.gunicorn_aiohttp.ProxyWebWorker`, which builds this runner:

    L4LB_TRUSTED_PROXIES=10.0.0.0/8 gunicorn -w 4 \\
        -k l4lb.backend.gunicorn_aiohttp.ProxyWebWorker myapp:app

The runner's server (the protocol factory every site hands to ``loop.create_server``) is wrapped in
:class:`~l4lb.backend.asyncio.ProxyProtocolFactory`: aiohttp's request handler is switched in once
the header is accepted, with a transport whose ``peername`` is the real client, so
``request.remote`` and ``request.transport.get_extra_info("peername")`` name it for every request
on a keep-alive connection and in a WebSocket. ``get_extra_info("proxy_header")`` gives the header.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from l4lb.backend.asyncio import ProxyProtocolFactory
from l4lb.backend.environ import policy_from_env
from l4lb.trust.policy import PolicyError, ProxyPolicy

__all__ = ["ProxyProtocolAppRunner", "run_app"]


class _ProxyServer(ProxyProtocolFactory):
    """aiohttp's ``web.Server`` behind a header-reading factory; everything else is the
    server's (``shutdown``, ``connections``, ``requests_count``: the runner and gunicorn's worker
    use them)."""

    def __getattr__(self, name: str) -> Any:
        return getattr(self.protocol_factory, name)


class ProxyProtocolAppRunner(web.AppRunner):
    """``web.AppRunner`` reading a PROXY header on every connection of every site.

    ``policy``: a :class:`~l4lb.trust.policy.ProxyPolicy`; None reads it from the environment
    (:mod:`l4lb.backend.environ`), raising :class:`~l4lb.trust.policy.PolicyError` on a bad value.
    Other arguments are ``web.AppRunner``'s.
    """

    def __init__(
        self, app: web.Application, *, policy: ProxyPolicy | None = None, **kwargs: Any
    ) -> None:
        super().__init__(app, **kwargs)
        self.proxy_policy = policy if policy is not None else policy_from_env()

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        return _ProxyServer(server, self.proxy_policy)  # type: ignore[return-value]


def run_app(
    app: web.Application | Callable[[], Awaitable[web.Application]],
    *,
    host: str = "0.0.0.0",
    port: int = 8080,
    policy: ProxyPolicy | None = None,
    print: Callable[..., None] | None = print,
    **runner_kwargs: Any,
) -> None:
    """``web.run_app`` behind a PROXY balancer: serve until SIGINT or SIGTERM, then clean up.

    ``policy`` None reads it from the environment; a bad value exits with one line naming the
    variable.
    """
    if policy is None:
        try:
            policy = policy_from_env()
        except PolicyError as err:
            raise SystemExit(f"l4lb.backend.aiohttp.run_app: {err}") from None

    async def main() -> None:
        application = app if isinstance(app, web.Application) else await app()
        runner = ProxyProtocolAppRunner(application, policy=policy, **runner_kwargs)
        await runner.setup()
        try:
            site = web.TCPSite(runner, host, port)
            await site.start()
            if print is not None:
                print(f"======== Running on {site.name} (PROXY protocol) ========")
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            await stop.wait()
        finally:
            await runner.cleanup()

    asyncio.run(main())
