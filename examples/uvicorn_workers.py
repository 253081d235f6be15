"""``uvicorn.run(..., workers=N)`` with the PROXY protocol class passed in code.

    python examples/uvicorn_workers.py --bind 127.0.0.1:8000 --trusted 127.0.0.1/32 --workers 2

The class that ``proxy_protocol_http()`` returns pickles by its policy, so uvicorn's spawned
workers each rebuild it; the app goes by name (``examples.django_app:asgi``), as uvicorn needs for
``workers``. ``request.META["REMOTE_ADDR"]`` is then the real client in every worker.
"""

from __future__ import annotations

import argparse

import uvicorn

from l4lb.backend.serve import parse_bind
from l4lb.backend.uvicorn import proxy_protocol_http

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bind", default="127.0.0.1:8000", help="HOST:PORT")
    parser.add_argument("--trusted", action="append", required=True, metavar="CIDR")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--app", default="examples.django_app:asgi", help="MODULE:APP")
    args = parser.parse_args()
    host, port = parse_bind(args.bind)
    uvicorn.run(
        args.app,
        host=host,
        port=port,
        workers=args.workers,
        proxy_headers=False,
        http=proxy_protocol_http(mode="required", trusted=args.trusted),
    )
