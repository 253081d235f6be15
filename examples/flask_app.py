"""A Flask app whose view answers with ``request.remote_addr``.

``app`` is the WSGI app (gunicorn's workers); ``asgi`` wraps it for ASGI servers (uvicorn,
hypercorn) with a2wsgi, which uvicorn recommends (asgiref's ``WsgiToAsgi`` under uvicorn 0.55
answers 500 to the second request of a keep-alive connection, with or without a PROXY header).
Behind a PROXY balancer, served by one of the recipes in docs/backend.md,
``request.remote_addr`` is the real client: Flask needs no ``ProxyFix``.

    L4LB_TRUSTED_PROXIES=127.0.0.1/32 gunicorn -w 2 -b 127.0.0.1:8000 \\
        -k l4lb.backend.gunicorn.SyncProxyWorker examples.flask_app:app
    curl --haproxy-protocol http://127.0.0.1:8000/
"""

from __future__ import annotations

import os
from typing import Any

from a2wsgi import WSGIMiddleware
from flask import Flask, jsonify, request

app = Flask(__name__)


@app.get("/")
def client() -> Any:
    """Who Flask thinks the client is."""
    port = request.environ.get("REMOTE_PORT")
    return jsonify(
        server="flask", client=[request.remote_addr, int(port) if port else None], pid=os.getpid()
    )


asgi = WSGIMiddleware(app)
