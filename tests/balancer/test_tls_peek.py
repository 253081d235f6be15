"""The sans-IO ClientHello reader: real ClientHellos from Python's ssl, fed whole and in pieces."""

from __future__ import annotations

import ssl

import pytest

from l4lb.balancer.tls_peek import NEED_DATA, NOT_TLS, ClientHello, parse_client_hello


def client_hello(server_name: str | None, alpn: list[str] | None) -> bytes:
    ctx = ssl.create_default_context()
    if server_name is None:
        ctx.check_hostname = False
    if alpn:
        ctx.set_alpn_protocols(alpn)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


CASES = [
    ("example.test", ["h2", "http/1.1"], ClientHello("example.test", (b"h2", b"http/1.1"))),
    ("api.example.test", None, ClientHello("api.example.test", ())),
    (None, ["imap"], ClientHello(None, (b"imap",))),
]


@pytest.mark.parametrize(("name", "alpn", "expected"), CASES)
def test_real_client_hello_whole_and_every_prefix(
    name: str | None, alpn: list[str] | None, expected: ClientHello
) -> None:
    data = client_hello(name, alpn)
    assert parse_client_hello(data) == expected
    assert parse_client_hello(data + b"trailing bytes") == expected
    for cut in range(len(data)):
        assert parse_client_hello(data[:cut]) is NEED_DATA, cut


def test_handshake_split_over_two_records() -> None:
    data = client_hello("split.example.test", ["h2"])
    body = data[5:]
    first, second = body[:40], body[40:]
    records = (
        b"\x16\x03\x01"
        + len(first).to_bytes(2)
        + first
        + b"\x16\x03\x01"
        + len(second).to_bytes(2)
        + second
    )
    assert parse_client_hello(records) == ClientHello("split.example.test", (b"h2",))


@pytest.mark.parametrize(
    "data",
    [
        b"GET / HTTP/1.1\r\n",
        b"SSH-2.0-OpenSSH\r\n",
        b"\x16\x02\x00\x00\x05hello",  # not TLS 1.x record version
        b"\x16\x03\x01\x00\x00",  # empty record
        b"\x16\x03\x01\x00\x04\x02\x00\x00\x00",  # ServerHello, not ClientHello
        b"\x16\x03\x01\x00\x08\x01\x00\x00\x04\x03\x03\x00\x00",  # truncated body
    ],
)
def test_not_tls(data: bytes) -> None:
    assert parse_client_hello(data) is NOT_TLS


def test_malformed_extensions_are_not_tls_never_an_exception() -> None:
    data = bytearray(client_hello("example.test", ["h2"]))
    for i in range(9, len(data)):
        mutated = bytes(data[:i]) + bytes([data[i] ^ 0xFF]) + bytes(data[i + 1 :])
        result = parse_client_hello(mutated)
        assert result is NEED_DATA or result is NOT_TLS or isinstance(result, ClientHello)
