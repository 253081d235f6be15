"""ProxyPolicy's header_timeout must be one every integration can wait for.

An infinite or huge timeout passed the policy, then every connection to a socketserver backend
died with ``OverflowError: timestamp out of range`` from ``socket.settimeout`` (and
``l4lb serve-asgi --header-timeout inf`` started). The policy now refuses it, as the config does
beyond '596h'.
"""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from l4lb.backend.socketserver import read_header
from l4lb.trust.policy import PolicyError, ProxyPolicy


@pytest.mark.parametrize("timeout", [float("inf"), 1e12, 2147484.0, -1.0, 0.0, float("nan")])
def test_header_timeout_out_of_range_is_refused(timeout: float) -> None:
    with pytest.raises(PolicyError, match="header_timeout"):
        ProxyPolicy("required", ["127.0.0.1/32"], header_timeout=timeout)


def test_the_largest_header_timeout_works_on_a_real_socket() -> None:
    policy = ProxyPolicy("required", ["127.0.0.1/32"], header_timeout=2147483.0)
    a, b = socket.socketpair(socket.AF_UNIX)
    with a, b:
        b.sendall(b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\r\nrest")
        decision = read_header(a, policy, ("127.0.0.1", 40000))
        assert decision.accepted and decision.client == ("192.0.2.1", 56324)


def test_serve_asgi_refuses_an_infinite_header_timeout() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "l4lb", "serve-asgi", "x:app", "--header-timeout", "inf"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and "header_timeout" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
