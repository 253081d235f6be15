"""An ``http.server`` handler that sees (and logs) the real client, behind a PROXY balancer.

Run it::

    python examples/http_server.py --bind 127.0.0.1:8080 --trusted 127.0.0.1/32

and put a balancer that sends the PROXY header in front, or let curl send one (naming itself)::

    curl --haproxy-protocol http://127.0.0.1:8080/

A log line reads ``127.0.0.1 - - [...] "GET / HTTP/1.1" 200 -`` with the address the header
gave: behind HAProxy or nginx, the client's, not the balancer's.
"""

from __future__ import annotations

import argparse
import http.server
import json
import logging

from l4lb.backend.serve import parse_bind
from l4lb.backend.socketserver import ProxyProtocolMixin
from l4lb.trust.policy import ProxyPolicy


class Handler(ProxyProtocolMixin, http.server.BaseHTTPRequestHandler):
    proxy_policy = ProxyPolicy(mode="required", trusted=["127.0.0.1/32"])

    def do_GET(self) -> None:
        header = self.proxy_header
        body = json.dumps(
            {
                "client": list(self.client_address),
                "via": list(self.proxy_peer),
                "version": header.version if header is not None else None,
            }
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bind", default="127.0.0.1:8080")
    parser.add_argument(
        "--accept-proxy", default="required", choices=["required", "optional", "off"]
    )
    parser.add_argument("--trusted", nargs="+", default=["127.0.0.1/32"])
    parser.add_argument("--header-timeout", type=float, default=5.0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    Handler.proxy_policy = ProxyPolicy(args.accept_proxy, args.trusted, args.header_timeout)
    server = http.server.ThreadingHTTPServer(parse_bind(args.bind), Handler)
    print(f"serving on {args.bind}, PROXY {args.accept_proxy}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
