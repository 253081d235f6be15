"""A one-file Django project whose view answers with ``request.META["REMOTE_ADDR"]``.

``application`` is its WSGI app (gunicorn's workers), ``asgi`` its ASGI app (uvicorn, hypercorn,
gunicorn's uvicorn worker). Behind a PROXY balancer, served by one of the recipes in
docs/backend.md, ``REMOTE_ADDR`` and ``REMOTE_PORT`` are the real client's: nothing in Django is
configured for it (no ``X-Forwarded-For`` middleware), the server gave Django the address.

    L4LB_TRUSTED_PROXIES=127.0.0.1/32 gunicorn -w 2 -b 127.0.0.1:8000 \\
        -k l4lb.backend.gunicorn.ThreadProxyWorker examples.django_app:application
    curl --haproxy-protocol http://127.0.0.1:8000/
"""

from __future__ import annotations

import os

import django
from django.conf import settings
from django.http import HttpRequest, JsonResponse
from django.urls import path

settings.configure(
    DEBUG=False,
    SECRET_KEY="example-only-not-secret",
    ALLOWED_HOSTS=["*"],
    ROOT_URLCONF=__name__,
    MIDDLEWARE=["django.middleware.common.CommonMiddleware"],  # sets Content-Length
    INSTALLED_APPS=[],
    LOGGING_CONFIG=None,
)
django.setup()


def client(request: HttpRequest) -> JsonResponse:
    """Who Django thinks the client is."""
    port = request.META.get("REMOTE_PORT")
    return JsonResponse(
        {
            "server": "django",
            "client": [request.META["REMOTE_ADDR"], int(port) if port else None],
            "pid": os.getpid(),
        }
    )


urlpatterns = [path("", client)]

from django.core.asgi import get_asgi_application  # noqa: E402 - after settings.configure()
from django.core.wsgi import get_wsgi_application  # noqa: E402

application = get_wsgi_application()
asgi = get_asgi_application()
